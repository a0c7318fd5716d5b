"""Shared fixtures: small configs and an in-process Flower grid.

:class:`~hetkd.simulations.local_grid.InProcessGrid` delivers every message to
the real hetkd ClientApp in this process (one Flower ``Context`` per node, as
the Simulation Runtime keeps them), records all traffic, and can make chosen
devices fail, time out or send corrupted replies. Protocol tests run on it in seconds; end-to-end
tests (marked ``slow``) go through Flower's real runtime instead.
"""

from __future__ import annotations

import fcntl
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from flwr.app import Message, MetricRecord, RecordDict

from hetkd.config import HetkdConfig, resolve_config
from hetkd.results import read_metrics
from hetkd.simulations.fleet import superlink_address_args
from hetkd.simulations.local_grid import InProcessGrid, Traffic  # noqa: F401  (re-exported for tests)

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
_PARTITION_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """One partition cache (:mod:`hetkd.data.partition_cache`) for the session and every process it
    starts, never the user's own; removed when the session ends. (A hook, not module code: test
    modules import this file again as ``tests.conftest``.)"""
    config.stash[_PARTITION_CACHE] = tempfile.mkdtemp(prefix="hetkd-test-cache-")
    os.environ["HETKD_CACHE_DIR"] = config.stash[_PARTITION_CACHE]
    # One torch thread per process (this one and every process it starts, unless the caller set
    # OMP_NUM_THREADS): two pytest workers, each with a torch thread per core beside the processes
    # their tests start, oversubscribe the cores and OpenMP's threads spin waiting on each other.
    # On 2 cores, `pytest -n 2 tests/test_ensemble_distill.py` took 314 s without this, 164 s with it.
    import torch

    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(config.stash[_PARTITION_CACHE], ignore_errors=True)


PROJECT_ROOT = Path(__file__).resolve().parents[1]


def copy_app(dst: Path) -> Path:
    """Copy the project to ``dst`` as git sees it: without ``.git`` and what ``.gitignore`` names
    (virtual environments, outputs, caches, build folders), so a test's ``flwr run`` gets a copy of
    the app it may rewrite and CI's disk never holds a copy of a venv."""
    ignored = [line.strip().rstrip("/") for line in (PROJECT_ROOT / ".gitignore").read_text().splitlines()]
    patterns = [pattern for pattern in ignored if pattern and not pattern.startswith("#")]
    shutil.copytree(PROJECT_ROOT, dst, ignore=shutil.ignore_patterns(".git", *patterns))
    return dst


def small_config(tmp_path, *overrides: str, devices: int = 4) -> HetkdConfig:
    """A quick digits config writing under ``tmp_path``."""
    return resolve_config(
        None,
        [
            f"simulation.num_devices={devices}",
            "strategy=local",
            "num-server-rounds=2",
            "reference.size=200",
            "partition.min_samples=5",
            "training.local_epochs=2",
            "output.plots=false",
            "output.progress=false",
            f"output.dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


#: the files every finished run folder holds (with output.plots on)
RUN_FILES = ("config.yaml", "federation.json", "metrics.jsonl", "summary.json", "accuracy.png")


def check_run_folder(out: Path, rounds: int) -> list[dict]:
    """Assert that ``out`` is a whole run folder of ``rounds`` rounds, with every headline figure of
    its last round; return its metrics rows."""
    for name in RUN_FILES:
        assert (out / name).is_file(), f"{name} missing from {out}"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for key in ("personalised_accuracy_mean", "personalised_accuracy_std", "personalised_accuracy_worst10",
                "global_accuracy_mean", "bytes_up_per_device", "bytes_down_per_device", "seconds"):
        assert rows[-1][key] is not None, key
    return rows


def corrupt_metric(key: str, value: float = math.nan) -> Callable[[Message], Message]:
    """A fault that overwrites one metric of a device's replies."""

    def fault(reply: Message) -> Message:
        if reply.has_error():
            return reply
        metrics = reply.content.metric_records.get("metrics")
        if metrics is not None and key in metrics:
            content = RecordDict(dict(reply.content.items()))
            patched = MetricRecord(dict(metrics))
            patched[key] = value
            content["metrics"] = patched
            return _with_content(reply, content)
        return reply

    return fault


def _with_content(reply: Message, content: RecordDict) -> Message:
    return Message(content=content, metadata=reply.metadata)


@pytest.fixture
def in_process_grid() -> Callable[..., InProcessGrid]:
    return InProcessGrid


def processes_mentioning(text: str) -> list[str]:
    """``pid: command line`` of every running process whose command line contains ``text``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])  # None where it could not be read (gone, a zombie)
        if text in cmd:
            found.append(f"{proc.info['pid']}: {cmd[:100]}")
    return found


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A folder for Ray's files (``RAY_TMPDIR``, ``ray start --temp-dir``), removed after the test.
    Short, under /tmp and not in ``tmp_path``: Ray's socket paths must stay under 107 bytes."""
    path = tempfile.mkdtemp(prefix="hetkd-ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def assert_every_process_ends(pgid: int, ray_dir: str, seconds: float = 30.0) -> None:
    """Within ``seconds`` no process is left in group ``pgid`` (a run started in a session of its
    own) nor mentions ``ray_dir`` (its ``RAY_TMPDIR``: Ray's processes end a moment after the driver)."""
    from hetkd.simulations.deploy import running_in_group

    deadline = time.monotonic() + seconds
    while (running_in_group(pgid) or processes_mentioning(ray_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_mentioning(ray_dir), "every Ray process the run started is gone"
    assert not running_in_group(pgid), "every process the run started is gone"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def superlink_lock(exclusive: bool) -> Iterator[None]:
    """Held, shared, while a test runs a ``flower-superlink --simulation`` and, exclusive, around
    ``make stop``, which stops the first such SuperLink it finds: `make test` runs tests in two
    pytest-xdist workers, and one's ``make stop`` must not meet the other's SuperLink."""
    with open(Path(tempfile.gettempdir()) / "hetkd-tests-simulation-superlink.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def simulation_superlink(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A SuperLink in simulation mode for ``flwr run`` (its own FLWR_HOME, free ports, stopped by PID).

    Yields the environment ``flwr run`` needs; the connection ``hetkd-test`` is its default.
    """
    with superlink_lock(exclusive=False), _started_simulation_superlink(tmp_path) as env:
        yield env


@contextmanager
def _started_simulation_superlink(tmp_path: Path) -> Iterator[dict[str, str]]:
    bin_dir = Path(sys.executable).parent
    home = tmp_path / "flwr-home"
    home.mkdir()
    http_port, fleet_port = free_port(), free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "hetkd-test"\n\n[superlink.hetkd-test]\naddress = "127.0.0.1:{http_port}"\n'
        "insecure = true\n"
    )
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    log_path = tmp_path / "superlink.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    link = subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         *superlink_address_args("127.0.0.1", http_port, fleet_port),
         # a file database: flwr 1.39's ':memory:' one races between threads (sqlite "no transaction")
         "--database", str(tmp_path / "state.db")],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", http_port)) == 0:
                    break
            assert link.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        os.killpg(link.pid, signal.SIGTERM)
        try:
            link.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(link.pid, signal.SIGKILL)
            link.wait(10)
        log.close()
