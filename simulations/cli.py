"""The ``hetkd`` command line.

    hetkd run [CONFIG] [key=value ...] [--out DIR]     one simulation, in-process
    hetkd config [CONFIG] [key=value ...] [--flower]   print the resolved config (--out: also save it)
    hetkd compare CONFIG --strategies a,b --seeds N    strategies side by side
    hetkd deploy [CONFIG] [key=value ...] [--devices N]  one run on a local SuperLink + SuperNodes (real processes)

``CONFIG`` is a YAML file (none: the defaults); ``key=value`` are dotted
overrides (``partition.alpha=0.1``, ``models.architectures=[cnn_s,mlp_m]``,
``strategy=fedavg``, ``num-server-rounds=5``). Every subcommand that writes
results takes ``--out DIR`` (default ``outputs/<run-name>/``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from hetkd.config import ConfigError, HetkdConfig, pyproject_table, resolve_config, to_yaml
from hetkd.interrupt import RunInterrupted
from hetkd.simulations.experiment import USER_ERRORS, RunFailedError
from hetkd.simulations.registry import check_strategy

__all__ = ["main", "config_from_args"]

C = TypeVar("C", bound=HetkdConfig)


def _split(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """Separate an optional leading CONFIG path from ``key=value`` overrides."""
    config, overrides = None, []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0 and config is None:
            config = item
        else:
            raise ConfigError(item, "expected key=value (only the first argument may be a CONFIG file)")
    return config, overrides


def config_from_args(items: Sequence[str], out: str | None = None, schema: type[C] = HetkdConfig) -> C:  # type: ignore[assignment]
    """Resolve ``[CONFIG] [key=value ...]`` (and ``--out``) into a checked config of ``schema``
    (a command's extension of the run config, e.g. ``hetkd b2kd``'s)."""
    config, overrides = _split(items)
    if out:
        overrides.append(f"output.dir={out}")
    return resolve_config(config, overrides, schema)


def _cmd_run(args: argparse.Namespace) -> int:
    from hetkd.simulations.checkpoint import resumed_config
    from hetkd.simulations.runner import run

    if args.resume:
        if args.out:
            raise ConfigError("--out", "not with --resume: a resumed run goes on in its own folder")
        cfg = resumed_config(args.resume, _split(args.items))
    else:
        cfg = config_from_args(args.items, args.out)
        if cfg.output.dir:
            _refuse_to_overwrite(Path(cfg.output.dir))
    run(cfg, verbose=args.verbose, resume=bool(args.resume))
    return 0


def _refuse_to_overwrite(out: Path) -> None:
    """A folder that holds a run's rounds is not started over by accident."""
    metrics = out.expanduser() / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        raise ConfigError("output.dir", f"'{out}' holds a run already (its metrics.jsonl): `hetkd run --resume {out}` "
                          "goes on with it; remove it or choose another folder to start over")


def _cmd_config(args: argparse.Namespace) -> int:
    if args.flower:
        print(pyproject_table())
        return 0
    cfg = config_from_args(args.items)
    check_strategy(cfg)
    text = to_yaml(cfg)
    print(text, end="")
    if args.out:
        out = Path(args.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(text)
    return 0


#: modules that add a subcommand: each defines ``add_parser(subparsers)``
COMMAND_MODULES: tuple[str, ...] = (
    "hetkd.simulations.compare",
    "hetkd.simulations.b2kd",
    "hetkd.simulations.bench",
    "hetkd.simulations.deploy",
)


def add_items_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``[CONFIG] [key=value ...]`` and ``--out DIR`` arguments every command shares."""
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]", help="YAML file and dotted overrides")
    parser.add_argument("--out", metavar="DIR", help="results folder (default outputs/<run-name>/)")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="hetkd",
        description="Federated learning across heterogeneous devices by knowledge distillation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one simulation in this process (Flower + Ray)")
    add_items_arguments(p)
    p.add_argument("--verbose", action="store_true", help="show Flower's own log lines")
    p.add_argument("--resume", metavar="DIR", help="go on with the interrupted run in DIR from its last completed round")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("config", help="print the resolved config (or the pyproject run-config table)")
    add_items_arguments(p)
    p.add_argument("--flower", action="store_true", help="print [tool.flwr.app.config] for pyproject.toml")
    p.set_defaults(func=_cmd_config)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except USER_ERRORS as err:
        print(f"hetkd: error: {err}", file=sys.stderr)
        return 2
    except RunFailedError as err:
        print(f"hetkd: error: the run failed: {err}", file=sys.stderr)
        return 1
    except RunInterrupted as err:
        print(f"hetkd: stopped: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
