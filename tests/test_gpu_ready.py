"""Where the tensors live: devices, the server's student, MEKD's G and D, and what leaves them.

These run on the CPU. ``strategy.ensemble.device=auto`` is the CPU on a machine
without CUDA, and must then change nothing; on a machine with CUDA the same
tests check that the models live on the GPU and that everything the server
sends or saves is on the CPU.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch

from hetkd import protocol as P
from hetkd.config import ConfigError, resolve_config, to_yaml
from hetkd.data import build_federation
from hetkd.distill.ensemble import EnsembleSettings
from hetkd.distill.generative import make_generator
from hetkd.distill.queries import generate_queries
from hetkd.simulations.bench import BenchRunConfig
from hetkd.simulations.cli import main
from hetkd.simulations.registry import build_strategy
from hetkd.strategies import MEKD
from hetkd.training import module_device, resolve_device, to_cpu, torch_threads
from tests.conftest import InProcessGrid, small_config

CUDA = torch.cuda.is_available()
#: a federation small enough for a test: 2 devices, 4 rounds (warm-up, deprivatize, distill x 2)
TINY = ("strategy=mekd", "models.assignment=homogeneous", "models.architectures=[mlp_s]",
        "strategy.ensemble.student=mlp_s", "dataset.num_samples=300", "reference.size=40", "training.max_steps=2",
        "training.local_epochs=1", "strategy.ensemble.warmup_rounds=1", "strategy.ensemble.deprivatize_rounds=1",
        "mekd.gan.steps=2", "mekd.gan.batch_size=8", "mekd.gan.generator_width=8", "mekd.distill.batch_size=8",
        "strategy.ensemble.server_steps=2", "strategy.ensemble.num_queries=16", "strategy.ensemble.min_steps=0",
        "strategy.fraction_evaluate=0.0", "num-server-rounds=4")


def _federate(tmp_path, *overrides: str) -> tuple[MEKD, InProcessGrid]:
    cfg = small_config(tmp_path, *TINY, *overrides, devices=2)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    grid = InProcessGrid(2)
    with torch_threads(1):  # a tiny run: threads only contend
        strategy.start(grid=grid, num_rounds=4, on_round_end=lambda report: None)
    return strategy, grid


def _answers(grid: InProcessGrid) -> list[bytes]:
    """Every answer the devices sent, as bytes."""
    out = []
    for t in grid.traffic:
        if t.message.metadata.message_type == P.EnsembleDistill.message_type:
            answers = P.QueryAnswers.from_record(t.reply.content).answers
            out.append(b"" if answers is None else answers.tobytes())
    return out


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny MEKD federation with the server on ``cpu`` and on ``auto``."""
    root = tmp_path_factory.mktemp("gpu-ready")
    return {device: _federate(root / device, f"strategy.ensemble.device={device}") for device in ("cpu", "auto")}


# --------------------------------------------------------------------------- the setting


def test_the_servers_device_is_checked_naming_its_key(tmp_path):
    for bad in ("gpu", "cuda:x", "cuda0"):
        with pytest.raises(ConfigError, match="strategy.ensemble.device.*valid choices: cpu, auto, cuda, cuda:N"):
            small_config(tmp_path, "strategy=mekd", f"strategy.ensemble.device={bad}")
    assert small_config(tmp_path, "strategy.ensemble.device=cuda:1").strategy.ensemble.device == "cuda:1"
    with pytest.raises(ConfigError, match="training.device"):
        small_config(tmp_path, "training.device=gpu")


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_naming_the_key():
    with pytest.raises(RuntimeError, match="strategy.ensemble.device='cuda' but CUDA is not available"):
        MEKD(num_classes=10, public_inputs=torch.rand(20, 1, 8, 8), ensemble=EnsembleSettings(device="cuda"))
    with pytest.raises(RuntimeError, match="training.device='cuda:0' but CUDA is not available"):
        resolve_device("cuda:0")


def test_auto_is_cuda_where_there_is_one_and_the_cpu_elsewhere():
    assert resolve_device("auto", "strategy.ensemble.device").type == ("cuda" if CUDA else "cpu")
    assert resolve_device("cpu").type == "cpu"


# --------------------------------------------------------------------------- a federation


@pytest.mark.skipif(CUDA, reason="auto is CUDA here: float results differ from the CPU's")
def test_auto_on_a_cpu_machine_gives_bit_identical_students_generators_and_answers(runs):
    (on_cpu, cpu_grid), (on_auto, auto_grid) = runs["cpu"], runs["auto"]
    assert on_auto.torch_device == torch.device("cpu")
    for name in ("student", "generator"):
        a, b = getattr(on_cpu, name).state_dict(), getattr(on_auto, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    answers = _answers(cpu_grid)
    assert answers == _answers(auto_grid) and sum(1 for a in answers if a) >= 4


def test_the_models_live_on_the_servers_device_and_whatever_leaves_it_is_on_the_cpu(runs, tmp_path):
    strategy, grid = runs["auto"]
    device = torch.device("cuda" if CUDA else "cpu")
    assert strategy.torch_device.type == device.type and strategy.deprivatizer.device.type == device.type
    for model in (strategy.student, strategy.generator, strategy.deprivatizer.discriminator):
        assert {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()} == {device.type}
    sent = [P.EnsembleDistill.from_record(t.message.content) for t in grid.traffic
            if t.message.metadata.message_type == P.EnsembleDistill.message_type]
    assert any(r.generator_weights is not None for r in sent), "G's weights were sent"
    assert all(t.device.type == "cpu" for r in sent if r.generator_weights for t in r.generator_weights.values())
    arrays = strategy.global_arrays().to_torch_state_dict()
    assert set(arrays) == set(strategy.student.state_dict())
    state = strategy.state_dict()
    for key in ("student", "student_optimizer", "generator", "discriminator", "generator_optimizer",
                "discriminator_optimizer", "student_memory"):
        assert _tensors(state[key]) and all(t.device.type == "cpu" for t in _tensors(state[key])), key
    query = strategy.make_query(4, "distill")
    assert strategy.query_inputs(query).device.type == "cpu"
    paths = strategy.write_artifacts(tmp_path / "artifacts")
    saved = torch.load(tmp_path / "artifacts" / "generator.pt", weights_only=False)["state_dict"]
    assert {p.name for p in paths} == {"student.pt", "generator.pt", "samples.png"}
    assert all(t.device.type == "cpu" for t in saved.values())
    strategy.load_state_dict(state)  # a checkpoint taken on the CPU loads back onto the server's device
    assert module_device(strategy.student).type == device.type


def test_a_generator_on_any_device_gives_cpu_inputs_and_cpu_latents():
    g = make_generator((1, 8, 8), 10, width=8).to("cuda" if CUDA else "cpu")
    z, x = generate_queries(g, 3, 16, 8, train_mode=True)
    assert z.device.type == x.device.type == "cpu" and x.shape == (16, 1, 8, 8)


def test_to_cpu_keeps_the_structure_of_a_state_dict():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    state = model.state_dict()
    moved = to_cpu({"model": state, "steps": [1, (torch.ones(1), "x")]})
    assert isinstance(moved["model"], OrderedDict) and moved["model"]._metadata == state._metadata
    assert moved["model"]["0.weight"].data_ptr() == state["0.weight"].data_ptr(), "a CPU tensor is not copied"
    assert moved["steps"][0] == 1 and moved["steps"][1][1] == "x" and isinstance(moved["steps"][1], tuple)
    assert module_device(torch.nn.ReLU()).type == "cpu"


# --------------------------------------------------------------------------- the benchmark


def test_bench_gpu_part_writes_cpu_rows_and_says_whether_a_gpu_was_present(tmp_path):
    items = ["bench.parts=[gpu]", "bench.gpu_steps=2", "bench.gpu_warmup_steps=1", "models.architectures=[mlp_s,cnn_s]",
             "strategy.ensemble.student=mlp_s", "dataset.num_samples=300", "reference.size=40",
             "mekd.gan.generator_width=8", "mekd.gan.batch_size=8", "mekd.distill.batch_size=8", "training.batch_size=8"]
    with torch_threads(1):
        assert main(["bench", *items, "--out", str(tmp_path)]) == 0  # the command reads bench.* settings
    gpu = json.loads((tmp_path / "bench.json").read_text())["gpu"]
    assert (tmp_path / "bench.png").is_file()
    assert [(r["workload"], r["model"]) for r in gpu["rows"]] == [
        ("device_training", "mlp_s"), ("device_training", "cnn_s"), ("server_student", "mlp_s"),
        ("mekd_gan", "G+D (G width 8)")]
    assert all(r["cpu_seconds_per_step"] > 0 and r["steps"] == 2 for r in gpu["rows"])
    assert gpu["gpu_present"] is CUDA
    if CUDA:
        assert all(r["cuda_seconds_per_step"] > 0 and r["speedup"] > 0 for r in gpu["rows"])
    else:
        assert "no GPU" in gpu["note"]
        assert all(r["cuda_seconds_per_step"] is None and r["speedup"] is None for r in gpu["rows"])
    with pytest.raises(ConfigError, match="bench.gpu_steps"):
        resolve_config(None, ["bench.gpu_steps=0"], schema=BenchRunConfig)
