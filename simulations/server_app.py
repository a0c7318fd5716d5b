"""The hetkd ``ServerApp`` (``hetkd.simulations.server_app:app``).

Under ``flwr run`` it reads the run configuration Flower hands it: the keys of
``[tool.flwr.app.config]`` in ``pyproject.toml`` overridden by
``--run-config``, where ``config='PATH.yaml'`` loads a YAML file under the
explicit overrides. In-process runs (:func:`hetkd.simulations.run`) build the
app around a config they already resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from hetkd.config import CONFIG_FILE_KEY, HetkdConfig, flower_run_config, resolve_config
from hetkd.interrupt import RunInterrupted
from hetkd.simulations.experiment import USER_ERRORS, RunFailedError, prepare, run_on_grid

__all__ = ["app", "make_server_app", "config_from_flower"]


def _explicit_overrides(grid: Grid, context: Context) -> dict[str, Any]:
    """What the user set with ``--run-config`` (not pyproject's defaults)."""
    run = getattr(grid, "run", None)
    overrides = dict(getattr(run, "override_config", {}) or {})
    if overrides or run is not None and getattr(run, "fab_id", ""):
        return overrides
    # no Run record (e.g. an older runtime): keep values that differ from the defaults
    defaults = flower_run_config()
    return {k: v for k, v in context.run_config.items() if defaults.get(k) != v}


def _app_dir(grid: Grid) -> Path | None:
    run = getattr(grid, "run", None)
    if run is None or not getattr(run, "fab_id", ""):
        return None
    from flwr.common.config import get_project_dir

    return Path(get_project_dir(run.fab_id, run.fab_version, run.fab_hash))


def config_from_flower(grid: Grid, context: Context) -> HetkdConfig:
    """Resolve the run config from Flower's run config (YAML paths: cwd, then the app)."""
    overrides = _explicit_overrides(grid, context)
    config_file = str(overrides.get(CONFIG_FILE_KEY) or "")
    if config_file and not Path(config_file).expanduser().is_absolute() and not Path(config_file).exists():
        app_dir = _app_dir(grid)
        if app_dir is not None and (app_dir / config_file).exists():
            config_file = str(app_dir / config_file)
    return resolve_config(config_file or None, {k: v for k, v in overrides.items() if k != CONFIG_FILE_KEY})


def make_server_app(
    cfg: HetkdConfig | None = None,
    on_finish: Callable[[dict[str, Any]], None] | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    shared_output: bool = False,
    resume: bool = False,
) -> ServerApp:
    """A ServerApp running ``cfg`` (or the config Flower passes when ``None``).

    ``on_finish`` receives the run summary, ``on_failure`` the error a run that
    started could not go on with (in-process runs use both: Flower's runtime
    only logs what a ServerApp raises). ``shared_output`` and ``resume`` are
    :func:`~hetkd.simulations.experiment.prepare`'s.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_cfg = cfg if cfg is not None else config_from_flower(grid, context)
            prepared = prepare(run_cfg, shared_output=shared_output, resume=resume)
        except USER_ERRORS as err:  # one clear line before Flower's traceback
            log(ERROR, "hetkd: the run cannot start: %s", err)
            raise
        try:
            summary = run_on_grid(grid, prepared)
        except (RunFailedError, RunInterrupted) as err:
            stopped = isinstance(err, RunInterrupted)
            log(WARNING if stopped else ERROR, "hetkd: the run %s: %s", "stopped" if stopped else "failed", err)
            if on_failure is not None:
                on_failure(err)
            raise
        if on_finish is not None:
            on_finish(summary)

    return app


app = make_server_app()
