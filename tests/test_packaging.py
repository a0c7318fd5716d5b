"""Packaging: one import package `hetkd`, and a Flower App whose run config is the schema."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from hetkd.config import flower_run_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"src/hetkd": "hetkd", "clients": "hetkd/clients", "strategies": "hetkd/strategies",
           "simulations": "hetkd/simulations"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_flower_run_config_in_pyproject_equals_the_schema_defaults():
    table = _pyproject()["tool"]["flwr"]["app"]["config"]
    assert table == flower_run_config(), "regenerate it with `hetkd config --flower`"


def test_flower_components_point_at_the_apps():
    components = _pyproject()["tool"]["flwr"]["app"]["components"]
    from hetkd.clients.app import app as client_app
    from hetkd.simulations.server_app import app as server_app

    assert components == {"serverapp": "hetkd.simulations.server_app:app", "clientapp": "hetkd.clients.app:app"}
    assert client_app is not None and server_app is not None


def test_subpackages_import_under_hetkd_from_their_top_level_folders():
    import hetkd.clients
    import hetkd.simulations
    import hetkd.strategies

    for module, folder in [(hetkd.clients, "clients"), (hetkd.strategies, "strategies"),
                           (hetkd.simulations, "simulations")]:
        assert Path(module.__file__).resolve().parent == ROOT / folder


def test_no_generic_top_level_modules_are_importable(tmp_path):
    code = "import importlib.util as u; print([m for m in ('strategies','clients','simulations','configs') if u.find_spec(m)])"
    # -I: only what the installation provides (no PYTHONPATH, no working directory)
    out = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_wheel_holds_only_the_hetkd_package_with_every_module(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{result.stderr[-2000:]}")
    wheel = next(tmp_path.glob("hetkd-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hetkd", next(t for t in tops if t.endswith(".dist-info"))}
    for folder, package in SOURCES.items():
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder).as_posix()
            assert f"{package}/{rel}" in names, f"{folder}/{rel} is missing from the wheel (add its package)"
