"""Flower's PyTorch quickstart, with only the strategy line changed, under `flwr run`.

The test writes a Flower App shaped like ``flwr new``'s PyTorch template — ``task.py``
(a model and data loaders of the user's own), ``client_app.py``, and a ``server_app.py``
whose last lines save ``result.arrays`` as the final model — swaps the ``FedAvg(...)``
line for a hetkd strategy, and runs it on a local simulation. FedDF's saved model must be
the trained global student (its own ``Net`` loads it and scores what the log printed);
SD-Dist, which keeps no global model, must say so in the log instead of handing back
untrained weights.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import simulation_superlink

PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "quickstart-hetkd"
version = "1.0.0"
dependencies = ["hetkd"]

[tool.flwr.app]
publisher = "quickstart"

[tool.flwr.app.components]
serverapp = "quickstart.server_app:app"
clientapp = "quickstart.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 4
fraction-train = 1.0
local-epochs = 3
lr = 0.05
"""

TASK = '''
"""The user's model and data (8x8 digits from scikit-learn), written without hetkd."""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.body(x)


def _digits():
    bunch = load_digits()
    return torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0, torch.tensor(bunch.target)


def load_public():
    return _digits()[0][:200]


def load_test():
    x, y = _digits()
    return x[-300:], y[-300:]


def load_data(partition_id, num_partitions):
    x, y = _digits()
    rows = list(range(200, len(y) - 300))[partition_id::num_partitions]
    cut = int(0.8 * len(rows))
    train = TensorDataset(x[rows[:cut]], y[rows[:cut]])
    test = TensorDataset(x[rows[cut:]], y[rows[cut:]])
    return DataLoader(train, batch_size=32, shuffle=True), DataLoader(test, batch_size=32)
'''

CLIENT = '''
from hetkd.clients import DeviceDataset, make_client_app
from quickstart.task import Net, load_data, load_public


def data_fn(context):
    train, test = load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]))
    return DeviceDataset(train=train, test=test, reference=load_public())


app = make_client_app(lambda context: Net(), data_fn, num_classes=10)
'''

SERVER = '''
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from hetkd.strategies import FedDF, SDDist
from quickstart.task import Net, load_public, load_test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    strategy = FedAvg(fraction_train=fraction_train)

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )

    print("\\nSaving final model to disk...")
    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, "final_model.pt")
'''

FEDAVG_LINE = "    strategy = FedAvg(fraction_train=fraction_train)\n"


def _write_app(root: Path, strategy_line: str) -> Path:
    app = root / "app"
    package = app / "quickstart"
    package.mkdir(parents=True)
    (app / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (package / "__init__.py").write_text("")
    (package / "task.py").write_text(TASK)
    (package / "client_app.py").write_text(CLIENT)
    assert FEDAVG_LINE in SERVER
    (package / "server_app.py").write_text(SERVER.replace(FEDAVG_LINE, strategy_line))
    return app


def _flwr_run(tmp_path: Path, strategy_line: str) -> tuple[str, list[Path]]:
    flwr = Path(sys.executable).parent / "flwr"
    if not flwr.exists():
        pytest.skip("flwr CLI not installed beside this Python")
    app = _write_app(tmp_path, strategy_line)
    with simulation_superlink(tmp_path) as env:
        result = subprocess.run([str(flwr), "run", str(app), "--stream", "--federation-config",
                                 "num-supernodes=3 client-resources-num-cpus=1"],
                                env=env, capture_output=True, text=True, timeout=500)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output, sorted(tmp_path.rglob("final_model.pt"))


@pytest.mark.slow
def test_feddf_in_the_quickstart_saves_the_trained_student_its_own_net_loads(tmp_path):
    output, saved = _flwr_run(tmp_path, "    strategy = FedDF(fraction_train=fraction_train, num_classes=10, "
                                        "public_inputs=load_public(), student=Net(), global_test=load_test())\n")
    logged = [float(m) for m in re.findall(r"'student_accuracy': ([0-9.]+)", output)]
    assert len(logged) == 4 and len(saved) == 1, output[-3000:]
    sys.path.insert(0, str(tmp_path / "app"))
    try:
        from quickstart.task import Net, load_test
    finally:
        sys.path.remove(str(tmp_path / "app"))
        for name in [m for m in sys.modules if m == "quickstart" or m.startswith("quickstart.")]:
            del sys.modules[name]
    model = Net()
    model.load_state_dict(torch.load(saved[0], weights_only=True))
    x, y = load_test()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(logged[-1], abs=0.01), "the saved model is the student the log scored"
    assert accuracy > 0.5  # ten classes: chance is 0.1


@pytest.mark.slow
def test_sd_dist_in_the_quickstart_says_where_the_models_are(tmp_path):
    output, saved = _flwr_run(tmp_path, "    strategy = SDDist(fraction_train=fraction_train, num_classes=10)\n")
    assert "SDDist keeps no global model: result.arrays is empty" in output, output[-3000:]
    assert "the initial_arrays handed to start() were not trained" in output
    assert len(saved) == 1 and torch.load(saved[0], weights_only=True) == {}, "no untrained model passed off as final"
    assert re.search(r"round 4: \{'personalised_accuracy_mean': 0\.[5-9]", output), output[-3000:]
