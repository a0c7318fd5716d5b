"""One device: state that survives rounds, stores that survive crashes, and its ClientApp."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import time

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from hetkd import protocol as P
from hetkd.clients import ContextStateStore, DiskStateStore, DistillClient
from hetkd.clients.app import app as client_app
from hetkd.config import to_yaml
from hetkd.distill.emulation import DistillSettings
from hetkd.distill.losses import KDTerm, KLLoss
from tests.conftest import InProcessGrid, small_config


def _same_state(a: dict, b: dict) -> bool:
    flat_a, flat_b = [], []
    for state, flat in ((a, flat_a), (b, flat_b)):
        for value in state["model"].values():
            flat.append(value)
        for s in state["optimizer"]["state"].values():
            flat.extend(v for v in s.values() if isinstance(v, torch.Tensor))
    return len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))


def test_device_state_persists_across_rounds_through_the_context_store(tmp_path):
    cfg = small_config(tmp_path, "training.optimizer=sgd", "training.momentum=0.9")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    device = DistillClient.from_config(cfg, 1)
    initial = {k: v.clone() for k, v in device.model.state_dict().items()}
    device.fit(server_round=1)
    ContextStateStore(context).save(device.state_dict())

    # round 2: a fresh object (as in a new process) picks up exactly where round 1 ended
    again = DistillClient.from_config(cfg, 1)
    assert all(torch.equal(initial[k], v) for k, v in again.model.state_dict().items())
    again.load_state_dict(ContextStateStore(context).load())
    assert _same_state(again.state_dict(), device.state_dict())
    assert again.rounds_trained == 1
    assert any(len(s) for s in again.optimizer.state_dict()["state"].values()), "momentum must persist"
    again.fit(server_round=2)
    assert not _same_state(again.state_dict(), device.state_dict())


def test_training_is_reproducible_for_a_seed(tmp_path):
    cfg = small_config(tmp_path)
    a, b = DistillClient.from_config(cfg, 0), DistillClient.from_config(cfg, 0)
    torch.manual_seed(1)  # the global RNG state must not matter
    loss_a = a.fit(1)["train_loss"]
    torch.manual_seed(2)
    loss_b = b.fit(1)["train_loss"]
    assert loss_a == loss_b
    assert _same_state(a.state_dict(), b.state_dict())


def test_the_private_model_is_the_device_trained_alone(tmp_path):
    cfg = small_config(tmp_path, "training.optimizer=sgd", "training.momentum=0.9")
    alone, distilling = DistillClient.from_config(cfg, 1), DistillClient.from_config(cfg, 1)
    alone.fit(1)
    distilling.fit(1)
    assert distilling.private_model is None and "private_model" not in distilling.state_dict()
    distilling.fork_private_model()  # before the device's model learns from others
    inputs = distilling.reference_inputs()
    distilling.fit_towards(2, torch.randn(len(inputs), 10), KDTerm(rho=0.8, batch_size=0, min_steps=0),
                           KLLoss(temperature=2.0, scale=1.0))
    metrics = distilling.fit_private(2)
    alone.fit(2)
    assert metrics["private_train_loss"] > 0
    # the private model followed exactly the trajectory of the device training by itself ...
    assert _same_state({"model": distilling.private_model.state_dict(),
                        "optimizer": distilling.private_optimizer.state_dict()}, alone.state_dict())
    assert torch.equal(distilling.predict(inputs, private=True), alone.predict(inputs))
    # ... while the device's own model distilled
    assert not torch.equal(distilling.predict(inputs), alone.predict(inputs))
    # and both survive the state store
    again = DistillClient.from_config(cfg, 1)
    again.load_state_dict(distilling.state_dict())
    assert torch.equal(again.predict(inputs, private=True), alone.predict(inputs))
    assert torch.equal(again.predict(inputs), distilling.predict(inputs))


def test_disk_store_round_trips_exactly(tmp_path):
    cfg = small_config(tmp_path)
    device = DistillClient.from_config(cfg, 2)
    device.fit(1)
    store = DiskStateStore(tmp_path / "states", 2)
    assert store.load() is None
    store.save(device.state_dict())
    restored = DistillClient.from_config(cfg, 2)
    restored.load_state_dict(store.load())
    assert _same_state(restored.state_dict(), device.state_dict())


def _write_forever(path: str, ready) -> None:  # runs in a child process
    store = DiskStateStore(path, 0)
    big = {"model": {"w": torch.randn(2_000_000)}, "optimizer": {"state": {}, "param_groups": []}}
    ready.set()
    while True:
        store.save(big)


def test_disk_store_survives_a_killed_writer(tmp_path):
    store = DiskStateStore(tmp_path, 0)
    good = {"model": {"w": torch.arange(5.0)}, "optimizer": {"state": {}, "param_groups": []}}
    store.save(good)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    writer = ctx.Process(target=_write_forever, args=(str(tmp_path), ready))
    writer.start()
    try:
        assert ready.wait(60)
        time.sleep(0.5)  # let it be in the middle of writing
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.join(10)
    state = store.load()  # either the old or a complete new state, never a torn file
    assert state["model"]["w"].shape in {(5,), (2_000_000,)}
    if state["model"]["w"].shape == (5,):
        assert torch.equal(state["model"]["w"], good["model"]["w"]), "the previous state must be intact"
    # the next save clears what the killed writer left and is read back exactly
    store.save(good)
    assert store.stray_files() == []
    assert torch.equal(store.load()["model"]["w"], good["model"]["w"])


def _setup(node: int, cfg) -> Message:
    return P.SetupRequest(run_config=to_yaml(cfg)).message(node)


def test_client_app_setup_train_evaluate(tmp_path):
    grid = InProcessGrid(num_devices=3)  # sets Flower's task identity for messages
    cfg = small_config(tmp_path, devices=3)
    node = grid.node_ids[2]
    context = grid.contexts[node]
    reply = client_app(_setup(node, cfg), context)
    assert not reply.has_error()
    setup = P.SetupReply.from_record(reply.content)
    assert setup.architecture == "resnet8"  # round robin: device 2
    assert setup.device_id == 2
    first = client_app(P.LocalTrainRequest(server_round=1).message(node), context)
    second = client_app(P.LocalTrainRequest(server_round=2).message(node), context)
    assert P.TrainReply.from_record(second.content).train_loss < P.TrainReply.from_record(first.content).train_loss
    ev = client_app(P.EvaluateRequest(server_round=2).message(node), context)
    metrics = P.EvaluateReply.from_record(ev.content)
    assert 0.0 <= metrics.personalised_accuracy <= 1.0 and 0.0 <= metrics.global_accuracy <= 1.0
    assert set(ev.content.keys()) == {"metrics"}  # evaluation sends back numbers only


def test_an_unknown_answer_model_is_refused_by_name(tmp_path):
    grid = InProcessGrid(num_devices=2)
    cfg = small_config(tmp_path, "strategy=feddf", devices=2)
    node = grid.node_ids[0]
    context = grid.contexts[node]
    assert not client_app(_setup(node, cfg), context).has_error()
    request = P.EnsembleDistill(server_round=1, kd=KDTerm(rho=0.5, batch_size=0, min_steps=0),
                                loss=DistillSettings().loss(), response="soft", answer_model="personal",
                                precision="float32")
    message = request.message(node)
    message.content["config"]["answer_model"] = "shared"  # no typed request can hold it: forge the wire form
    reply = client_app(message, context)
    assert reply.has_error()
    assert re.search(r"'answer_model': unknown value 'shared'; valid choices: personal, private", reply.error.reason)


def test_node_without_partition_id_gets_an_error_naming_the_key(tmp_path):
    InProcessGrid(num_devices=1)
    cfg = small_config(tmp_path, devices=2)
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="partition-id"):
        client_app(_setup(5, cfg), context)
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 9}, state=RecordDict(), run_config={})
    with pytest.raises(Exception, match="partition-id'=9 is outside 0..1"):
        client_app(_setup(5, cfg), context)


def test_clip_grad_norm_bounds_every_step_a_device_takes(tmp_path):
    """With plain SGD (no momentum, no weight decay) and one step a round, a step moves the
    weights by lr x the gradient's norm: with ``training.clip_grad_norm`` by at most lr x that
    norm, and the same device unclipped moves further (its gradient is larger than the bound)."""
    moves = {}
    for clip in (0.0, 0.01):
        cfg = small_config(tmp_path, "training.optimizer=sgd", "training.momentum=0.0", "training.weight_decay=0.0",
                           "training.lr=0.5", "training.max_steps=1", f"training.clip_grad_norm={clip}")
        device = DistillClient.from_config(cfg, 0)
        before = torch.cat([p.detach().flatten().clone() for p in device.model.parameters()])
        device.fit(server_round=1)
        after = torch.cat([p.detach().flatten() for p in device.model.parameters()])
        moves[clip] = float((after - before).norm())
    assert moves[0.01] <= 0.5 * 0.01 * (1 + 1e-4)
    assert moves[0.0] > 0.5 * 0.01 * 2
    with pytest.raises(ValueError, match="training.clip_grad_norm"):
        small_config(tmp_path, "training.clip_grad_norm=-1")
    with pytest.raises(ValueError, match="training.clip_grad_norm.*privacy.max_grad_norm"):
        small_config(tmp_path, "training.clip_grad_norm=5", "privacy.enabled=true")
