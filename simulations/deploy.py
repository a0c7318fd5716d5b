"""A whole federation on this machine's loopback: Flower's Deployment Engine for trying it out.

:class:`LocalFederation` starts, as real processes talking over
``127.0.0.1``, one ``flower-superlink`` and one ``flower-supernode`` per device
(``--node-config "partition-id=i num-partitions=N"``; the Fleet API on the
SuperLink's HTTP port from Flower 1.40, on a gRPC port of its own up to 1.39,
see :mod:`hetkd.simulations.fleet`), writes a SuperLink
connection to ``$FLWR_HOME/config.toml`` and submits the app with
``flwr run APP CONNECTION``: the same commands one runs on real machines (see
the README's "Deployment" section). Ports are picked free, ``FLWR_HOME`` is a
folder of its own, and every process it started is stopped by its process
group (the SuperNode's SuperExec and ClientApp processes with it) when the
federation is stopped, also after an error.

``hetkd deploy [CONFIG] [key=value ...]`` runs one experiment this way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hetkd.config import CONFIG_FILE_KEY, FLOWER_ALIASES, HetkdConfig, flower_run_config
from hetkd.simulations.cli import add_items_arguments, config_from_args
from hetkd.simulations.experiment import prepare
from hetkd.simulations.fleet import FLEET_ON_SUPERLINK_PORT, FLOWER_VERSION, fleet_address, superlink_address_args

__all__ = ["LocalFederation", "ManagedProcess", "free_port", "run_config_overrides", "running_in_group", "add_parser"]

#: the connection name written to ``$FLWR_HOME/config.toml``
CONNECTION = "hetkd-local"
HOST = "127.0.0.1"
#: where the repository (the Flower App) is: ``flwr run`` builds it from here
APP_DIR = Path(__file__).resolve().parents[1]


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _executable(name: str) -> str:
    """A Flower command beside this Python (the venv), else on ``PATH``."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found beside {sys.executable} or on PATH; install flwr")
    return found


@dataclass
class ManagedProcess:
    """A process this module started, in a process group of its own, with its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    _log: IO[str] = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def group_alive(self) -> bool:
        """Whether any process of its group still runs (zombies left to a parent that does not reap them excepted)."""
        return bool(running_in_group(self.pid))

    def stopped(self) -> bool:
        """The leader has exited and been reaped, and nothing of its group still runs."""
        return not self.alive() and not self.group_alive()  # alive() reaps the leader once it exits

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group (graceful: a SuperNode deregisters), SIGKILL what is left.

        Returns once the leader is reaped too, so :meth:`alive` is false after it:
        the group can be empty a moment before the leader's exit is collected.
        """
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass  # the group is gone; the leader may still wait to be reaped
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and not self.stopped():
                time.sleep(0.1)
            if self.stopped():
                break
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10.0)
        if self._log is not None and not self._log.closed:
            self._log.close()


def running_in_group(pgid: int) -> list[int]:
    """Running (not zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether the group exists
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_config_overrides(cfg: HetkdConfig) -> str:
    """``cfg`` as ``flwr run --run-config`` TOML: the keys that differ from the defaults."""
    defaults = flower_run_config()
    aliases = set(FLOWER_ALIASES)
    pairs = [
        f"{key}={_toml_value(value)}"
        for key, value in flower_run_config(cfg).items()
        if key not in aliases and key != CONFIG_FILE_KEY and defaults.get(key) != value
    ]
    return " ".join(pairs)


class LocalFederation:
    """A SuperLink and ``num_devices`` SuperNodes on loopback, started and stopped as processes.

    Parameters
    ----------
    num_devices : int
        SuperNodes to start, with ``partition-id`` 0..num_devices-1.
    home : Path
        The ``FLWR_HOME`` of every process (``config.toml``, installed apps,
        logs and the SuperLink's database go here).
    node_configs : Sequence[Mapping[str, Any]] | None
        Extra node-config entries per device (e.g. ``model``, ``state-dir``).
    ready_timeout : float
        Seconds to wait for the SuperLink to listen and each SuperNode to connect.
    """

    def __init__(
        self,
        num_devices: int,
        home: str | Path,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        if num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {num_devices}")
        if node_configs is not None and len(node_configs) != num_devices:
            raise ValueError(f"node_configs has {len(node_configs)} entries for {num_devices} devices")
        self.num_devices = num_devices
        self.home = Path(home).expanduser().resolve()
        self.node_configs = [dict(c) for c in node_configs] if node_configs else [{} for _ in range(num_devices)]
        self.ready_timeout = ready_timeout
        self.http_port = 0
        #: the Fleet API's own port (Flower up to 1.39; from 1.40 it is the SuperLink's HTTP port)
        self.fleet_port: int | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[int, ManagedProcess] = {}
        #: every process ever started (restarted SuperNodes included), for stop() and for tests
        self.started: list[ManagedProcess] = []
        self._restarts: dict[int, int] = {}

    # ------------------------------------------------------------------ environment

    @property
    def env(self) -> dict[str, str]:
        """The environment of every process: own FLWR_HOME, no runtime dependency installs."""
        bin_dir = str(Path(sys.executable).parent)
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        )
        return env

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with the connection :data:`CONNECTION` to the SuperLink."""
        path = self.home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{HOST}:{self.http_port}"\ninsecure = true\n'
        )
        return path

    def _spawn(self, name: str, command: list[str]) -> ManagedProcess:
        log_path = self.home / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a")  # noqa: SIM115 - closed by ManagedProcess.stop
        popen = subprocess.Popen(command, env=self.env, cwd=self.home, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        proc = ManagedProcess(name, popen, log_path, log)
        self.started.append(proc)
        return proc

    # ------------------------------------------------------------------ commands

    def superlink_command(self) -> list[str]:
        return [
            _executable("flower-superlink"), "--insecure", *superlink_address_args(HOST, self.http_port, self.fleet_port),
            # a file database: flwr 1.39's in-memory one races between threads
            "--database", str(self.home / "superlink.db"),
        ]

    def node_config_text(self, device: int) -> str:
        """The ``--node-config`` of SuperNode ``device``."""
        entries = {"partition-id": device, "num-partitions": self.num_devices, **self.node_configs[device]}
        return " ".join(f"{k}={_toml_value(v)}" for k, v in entries.items())

    def supernode_command(self, device: int, port: int) -> list[str]:
        return [
            _executable("flower-supernode"), "--insecure", "--superlink", fleet_address(HOST, self.http_port, self.fleet_port),
            "--host", HOST, "--port", str(port), "--node-config", self.node_config_text(device),
        ]

    def run_command(self, app_dir: str | Path, run_config: str = "") -> list[str]:
        command = [_executable("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        return command + (["--run-config", run_config] if run_config else [])

    # ------------------------------------------------------------------ lifecycle

    def _wait(self, what: str, ready, proc: ManagedProcess, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while not ready():
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode} before {what}:\n"
                                   f"{proc.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name}: no {what} within {timeout or self.ready_timeout:.0f}s:\n"
                                   f"{proc.log_text()[-3000:]}")
            time.sleep(0.2)

    def start(self) -> LocalFederation:
        """Start the SuperLink, then every SuperNode; return once all are connected."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.fleet_port = None if FLEET_ON_SUPERLINK_PORT else free_port()
        ports = [p for p in (self.http_port, self.fleet_port) if p is not None]
        self.write_connection()
        try:
            self.superlink = self._spawn("superlink", self.superlink_command())
            self._wait("Fleet API", lambda: all(_listening(p) for p in ports), self.superlink)
            for device in range(self.num_devices):
                self.start_supernode(device, wait=False)
            for device in range(self.num_devices):
                self.wait_for_supernode(device)
        except BaseException:
            self.stop()
            raise
        return self

    def start_supernode(self, device: int, wait: bool = True) -> ManagedProcess:
        """Start (or restart) the SuperNode holding ``device``."""
        if not 0 <= device < self.num_devices:
            raise ValueError(f"device must be in 0..{self.num_devices - 1}, got {device}")
        if device in self.supernodes and self.supernodes[device].alive():
            raise RuntimeError(f"the SuperNode of device {device} is running (pid {self.supernodes[device].pid})")
        n = self._restarts[device] = self._restarts.get(device, -1) + 1
        proc = self._spawn(f"supernode-{device}" + (f"-restart{n}" if n else ""),
                           self.supernode_command(device, free_port()))
        self.supernodes[device] = proc
        if wait:
            self.wait_for_supernode(device)
        return proc

    def wait_for_supernode(self, device: int) -> int:
        """Wait until SuperNode ``device`` is connected; return its node id."""
        proc = self.supernodes[device]
        self._wait("connection to the SuperLink", lambda: self.node_id(device) is not None, proc)
        return int(self.node_id(device))  # type: ignore[arg-type]

    def node_id(self, device: int) -> int | None:
        """The node id SuperNode ``device`` got from the SuperLink (``None`` until connected)."""
        found = re.search(r"SuperNode ID: (\d+)", self.supernodes[device].log_text())
        return int(found.group(1)) if found else None

    def stop_supernode(self, device: int) -> None:
        """Stop the SuperNode of ``device`` (SIGTERM: it deregisters, the server sees it leave)."""
        self.supernodes[device].stop()

    def wait_for_log(self, device: int, pattern: str, timeout: float = 120.0) -> None:
        """Wait until SuperNode ``device``'s log matches ``pattern`` (a regular expression)."""
        proc = self.supernodes[device]
        self._wait(f"log line /{pattern}/", lambda: re.search(pattern, proc.log_text()) is not None, proc, timeout)

    def submit(self, app_dir: str | Path = APP_DIR, run_config: str = "") -> ManagedProcess:
        """Start ``flwr run APP CONNECTION --stream`` in the background (output in ``logs/flwr-run*.log``)."""
        runs = sum(p.name.startswith("flwr-run") for p in self.started)
        return self._spawn(f"flwr-run{runs or ''}", self.run_command(app_dir, run_config))

    def stop(self) -> None:
        """Stop every process this federation started, SuperNodes before the SuperLink."""
        for proc in sorted(self.started, key=lambda p: p.name == "superlink"):
            proc.stop()

    def pids(self) -> list[int]:
        """Process ids of everything started (also the ones already stopped)."""
        return [p.pid for p in self.started]

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) == 0


# --------------------------------------------------------------------------- hetkd deploy


def _cmd_deploy(args: argparse.Namespace) -> int:
    import tempfile


    items = list(args.items)
    if args.devices is not None:
        items.append(f"simulation.num_devices={args.devices}")
    cfg = prepare(config_from_args(items, args.out)).cfg  # checked before anything starts; output.dir absolute
    home = Path(args.home).expanduser() if args.home else Path(tempfile.mkdtemp(prefix="hetkd-flwr-home-"))
    run_config = run_config_overrides(cfg)
    federation = LocalFederation(cfg.simulation.num_devices, home)
    print(f"hetkd deploy: FLWR_HOME={federation.home} (logs in {federation.home / 'logs'})", flush=True)
    code = 1
    try:
        federation.start()
        fleet = fleet_address(HOST, federation.http_port, federation.fleet_port)
        print(f"SuperLink on {HOST}:{federation.http_port} (Fleet API {'HTTP' if FLEET_ON_SUPERLINK_PORT else 'gRPC'} "
              f"{fleet}, Flower {FLOWER_VERSION}); {cfg.simulation.num_devices} SuperNodes connected", flush=True)
        command = federation.run_command(args.app, run_config)
        print("$ FLWR_HOME=" + shlex.quote(str(federation.home)) + " " + shlex.join(command), flush=True)
        code = subprocess.run(command, env=federation.env, cwd=Path(args.app).resolve()).returncode
    except KeyboardInterrupt:
        print("hetkd deploy: interrupted", file=sys.stderr)
    finally:
        if args.keep:
            print(f"--keep: processes left running: {federation.pids()}; stop them with "
                  f"kill -TERM -- -PID (one per process group)", flush=True)
        else:
            federation.stop()
    if code == 0:
        print(f"results: {cfg.output.dir}")
    return code


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hetkd deploy``."""

    p = subparsers.add_parser(
        "deploy",
        help="run one experiment on a local Deployment Engine: a SuperLink and one SuperNode per device on 127.0.0.1",
    )
    add_items_arguments(p)
    p.add_argument("--devices", type=int, help="number of SuperNodes (sets simulation.num_devices)")
    p.add_argument("--home", help="FLWR_HOME for every process (default: a fresh temporary folder)")
    p.add_argument("--app", default=str(APP_DIR), help="the Flower App to run (default: this repository)")
    p.add_argument("--keep", action="store_true", help="leave the SuperLink and SuperNodes running afterwards")
    p.set_defaults(func=_cmd_deploy)
