"""``hetkd bench``'s ``startup`` part: what a fresh process pays before its device can answer.

Flower starts a fresh process for devices more often than for anything else:
every Ray worker of a simulation, and on a deployed SuperNode a ClientApp
process for every message. Before such a process can answer it imports
hetkd's ClientApp (PyTorch and Flower) and builds its device: the data and
the partition (:mod:`hetkd.data.partition_cache`), the model and its
optimizer. :func:`bench_startup` starts that process for device 0 of the
config, first with an empty partition cache ("cold", as on a node's first
message) and then with the entry the first one left ("warm", every later
message), and reports the seconds of each stage and which heavy modules the
process imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from typing import Any

from hetkd.config import HetkdConfig, to_yaml
from hetkd.data.partition_cache import CACHE_DIR_ENV

__all__ = ["bench_startup", "STARTUP_SCRIPT"]

#: what the measured process runs: the ClientApp's imports, then device 0 of the config on stdin
STARTUP_SCRIPT = """
import json, sys, time
started = time.perf_counter()
import hetkd.clients.app
imported = time.perf_counter()
from hetkd.clients.device import DistillClient
from hetkd.config import from_yaml
DistillClient.from_config(from_yaml(sys.stdin.read()), 0)
built = time.perf_counter()
print(json.dumps({"import_seconds": imported - started, "device_seconds": built - imported,
                  "imported": {m: m in sys.modules for m in ("datasets", "sklearn.datasets", "opacus")}}))
"""


def bench_startup(cfg: HetkdConfig, *, repeats: int) -> dict[str, Any]:
    """``repeats`` cold and ``repeats`` warm starts of a process building device 0 of ``cfg``:
    per start, the seconds to import the ClientApp, to build the device, and of the whole process
    (the interpreter's start and exit included), and which of ``datasets`` (Hugging Face, needed
    only to make a partition), ``sklearn.datasets`` and ``opacus`` it imported."""
    if repeats < 1:
        raise ValueError(f"bench.startup_repeats must be >= 1, got {repeats}")
    run_config = to_yaml(HetkdConfig(**{f.name: getattr(cfg, f.name) for f in fields(HetkdConfig)}))
    rows = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory(prefix="hetkd-bench-cache-") as cache:
            for start in ("cold", "warm"):
                rows.append({"start": start, "repeat": repeat, **_one_start(run_config, cache)})
                print(f"[bench] startup {start}: {rows[-1]['process_seconds']:.2f} s", flush=True)
    summary = {start: {key: sum(r[key] for r in rows if r["start"] == start) / repeats
                       for key in ("import_seconds", "device_seconds", "process_seconds")}
               for start in ("cold", "warm")}
    return {"device": 0, "dataset": cfg.dataset.name, "partition": cfg.partition.method, "rows": rows,
            "mean": summary}


def _one_start(run_config: str, cache: str) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STARTUP_SCRIPT], input=run_config, capture_output=True, text=True,
                          env=dict(os.environ, **{CACHE_DIR_ENV: cache}), timeout=600)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"the measured process failed (exit code {done.returncode}): {done.stderr[-2000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": seconds}
