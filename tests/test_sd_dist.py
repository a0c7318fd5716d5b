"""SD-Dist and FedMD as Flower strategies: the protocol, failures, late joiners."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from hetkd import protocol as P
from hetkd.config import ConfigError, resolve_config, to_yaml
from hetkd.data import build_federation
from hetkd.distill.exchange import ReferenceDistillSettings
from hetkd.distill.similarity import NeighbourSearch
from hetkd.simulations.registry import build_strategy
from hetkd.strategies import FedMD, SDDist
from tests.conftest import InProcessGrid, small_config

SD = ("strategy=sd-dist", "strategy.sd_dist.num_neighbours=2", "strategy.sd_dist.num_candidates=3",
      "training.local_epochs=1", "reference.size=100", "strategy.kd.min_steps=0")


def _start(cfg, grid, rounds=2, strategy=None):
    strategy = strategy or build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=rounds, on_round_end=reports.append)
    return strategy, reports




def test_only_reference_predictions_and_scalars_leave_a_device(tmp_path):
    cfg = small_config(tmp_path, *SD)
    grid = InProcessGrid(4)
    strategy, reports = _start(cfg, grid, rounds=2)
    fed = build_federation(cfg)
    r, c = len(fed.reference), fed.num_classes
    kinds = {t.message.metadata.message_type for t in grid.traffic}
    assert kinds == {P.SetupRequest.message_type, P.ReferenceDistill.message_type, P.EvaluateRequest.message_type}
    for t in grid.traffic:
        assert t.reply is not None and not t.reply.has_error(), t.reply.error if t.reply else "no reply"
        content = t.reply.content
        kind = t.message.metadata.message_type
        assert set(content.keys()) <= P.DEVICE_TO_SERVER[kind]
        if kind == P.SetupRequest.message_type:
            assert set(content.keys()) == {P.METRICS, P.CONFIG}
            assert set(content[P.CONFIG].keys()) == {"architecture"}
        elif kind == P.EvaluateRequest.message_type:
            assert set(content.keys()) == {P.METRICS}
        else:
            assert set(content.keys()) == {P.METRICS, P.CONFIG, P.ARRAYS}
            arrays = content[P.ARRAYS]
            assert list(arrays.keys()) == ["reference_logits"]
            assert tuple(arrays["reference_logits"].shape) == (r, c), "one row per reference sample, nothing else"
            assert set(content[P.CONFIG].keys()) == {"distilled"}
        for record in content.metric_records.values():
            assert all(isinstance(v, (int, float)) for v in record.values())
    # and what goes down: a config and, after warm-up, R x C targets
    for t in grid.traffic:
        if t.message.metadata.message_type == P.ReferenceDistill.message_type:
            keys = set(t.message.content.keys())
            assert keys <= {P.CONFIG, P.ARRAYS}
            request = P.ReferenceDistill.from_record(t.message.content)
            assert request.population is None
            if request.targets is not None:
                assert tuple(request.targets.shape) == (r, c)
    # second round distils: targets went to every device
    assert reports[1].metrics["distilled_devices"] == 4
    assert reports[1].metrics["bytes_up_per_device"] < 2 * r * c + 1000


@pytest.mark.parametrize("selection", ["server", "device"])
def test_private_answers_never_echo_what_the_device_distils(tmp_path, selection):
    """With answer_model=private the reference predictions a device sends come from a model
    trained on its private data alone: the same whatever it distils (rho); with its own
    model they follow the targets."""

    def sent(answer_model, rho):
        cfg = small_config(tmp_path, *SD, f"strategy.kd.answer_model={answer_model}", f"strategy.kd.rho={rho}",
                           f"strategy.sd_dist.neighbour_selection={selection}")
        grid = InProcessGrid(4)
        _start(cfg, grid, rounds=3)
        replies = [t for t in grid.traffic if t.message.metadata.message_type == P.ReferenceDistill.message_type]
        assert all(P.ReferenceDistill.from_record(t.message.content).answer_model == answer_model for t in replies)
        return [P.ReferencePredictions.from_record(t.reply.content) for t in replies]

    private_low, private_high = sent("private", 0.2), sent("private", 0.9)
    assert all(np.array_equal(a.reference_logits, b.reference_logits) for a, b in zip(private_low, private_high))
    assert all(r.private_train_loss > 0 for r in private_low if r.distilled)  # the private model trained too
    own_low, own_high = sent("personal", 0.2), sent("personal", 0.9)
    assert not np.array_equal(own_low[-1].reference_logits, own_high[-1].reference_logits)
    assert all(r.private_train_loss is None for r in own_low)


def test_distillation_rounds_report_neighbours_and_churn(tmp_path):
    cfg = small_config(tmp_path, *SD)
    strategy, reports = _start(cfg, InProcessGrid(4), rounds=3)
    assert isinstance(strategy, SDDist)
    assert reports[0].metrics.get("neighbour_distance_mean") is None  # warm-up
    for report in reports[1:]:
        assert report.metrics["neighbour_distance_mean"] > 0
        assert 0.0 <= report.metrics["neighbour_churn"] <= 1.0
        for device, row in report.devices.items():
            assert device not in row["neighbours"] and 1 <= len(row["neighbours"]) <= 2
    assert reports[1].metrics["neighbour_churn"] == 1.0  # first choice counts as a change
    files = strategy.write_artifacts(tmp_path)
    assert [f.name for f in files] == ["similarity.png"] and files[0].is_file()


def _replace_predictions(value):
    def fault(reply: Message) -> Message:
        if reply.has_error() or reply.metadata.message_type != P.ReferenceDistill.message_type:
            return reply
        content = RecordDict(dict(reply.content.items()))
        content[P.ARRAYS] = ArrayRecord({"reference_logits": Array(value(reply))})
        return Message(content=content, metadata=reply.metadata)

    return fault


def _nan(reply):
    a = P.ReferencePredictions.from_record(reply.content).reference_logits.astype(np.float32)
    a[0, 0] = np.nan
    return a


def _wrong_shape(reply):
    return P.ReferencePredictions.from_record(reply.content).reference_logits[:-1]


@pytest.mark.parametrize(("fault", "reason"), [(_nan, "NaN"), (_wrong_shape, "shape"), ("drop", "no reply"),
                                               ("error", "crash")])
def test_a_bad_device_is_left_out_and_never_corrupts_others(tmp_path, fault, reason):
    cfg = small_config(tmp_path, *SD)
    grid = InProcessGrid(4)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    strategy.setup_devices(grid, block=True)
    bad = grid.node_ids[2]
    grid.faults[bad] = "drop" if fault == "drop" else "error" if fault == "error" else _replace_predictions(fault)
    _, reports = _start(cfg, grid, rounds=3, strategy=strategy)
    assert 2 not in strategy.predictions, "a bad reply never enters the record"
    for report in reports:
        assert any(f["device"] == 2 and reason in f["reason"] for f in report.failures)
        assert report.trained == 3
    for row in reports[-1].devices.values():
        assert 2 not in row.get("neighbours", []), "nobody learns from the bad device"
    for t in grid.traffic:
        if t.message.metadata.message_type != P.ReferenceDistill.message_type:
            continue
        targets = P.ReferenceDistill.from_record(t.message.content).targets
        if targets is not None:
            assert np.isfinite(targets).all()
    assert not math.isnan(reports[-1].metrics["personalised_accuracy_mean"])


def test_late_joiner_gets_targets_once_it_has_predictions_on_record(tmp_path):
    cfg = small_config(tmp_path, *SD, "strategy.wait_for_devices=1")  # start without the late one
    grid = InProcessGrid(4)
    late = grid.node_ids[3]
    grid.connected.discard(late)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    strategy.setup_devices(grid, block=True)  # starts with 3 of 4
    strategy.num_devices = 3
    state = {"round": 0}

    def join(report):
        state["round"] = report.round
        if report.round == 1:
            grid.connected.add(late)

    strategy.start(grid=grid, num_rounds=3, on_round_end=join)
    to_late = [t.message for t in grid.traffic
               if t.message.metadata.dst_node_id == late and t.message.metadata.message_type == P.ReferenceDistill.message_type]
    assert len(to_late) == 2  # rounds 2 and 3
    # round 2: nothing on record yet, trains locally
    assert P.ReferenceDistill.from_record(to_late[0].content).targets is None
    # round 3: has predictions on record
    assert P.ReferenceDistill.from_record(to_late[1].content).targets is not None


def test_unsampled_devices_keep_their_predictions_on_record(tmp_path):
    cfg = small_config(tmp_path, *SD, "strategy.fraction_train=0.5")
    strategy, reports = _start(cfg, InProcessGrid(4), rounds=3)
    assert all(r.trained == 2 for r in reports)
    assert len(strategy.predictions) == 4  # sampled at different rounds, all still on record


def test_device_side_selection_keeps_the_graph_off_the_server(tmp_path):
    cfg = small_config(tmp_path, *SD, "strategy.sd_dist.neighbour_selection=device")
    grid = InProcessGrid(4)
    strategy, reports = _start(cfg, grid, rounds=3)
    assert strategy.neighbours == {} and strategy.last_distance is None
    assert strategy.write_artifacts(tmp_path) == []
    round3 = [t.message for t in grid.traffic
              if t.message.metadata.message_type == P.ReferenceDistill.message_type][-4:]
    for message in round3:
        request = P.ReferenceDistill.from_record(message.content)
        assert request.targets is None and request.population is not None
        ids = request.population.device_ids
        assert sorted(ids.tolist()) == [0, 1, 2, 3]
    assert reports[-1].metrics["neighbour_distance_mean"] > 0
    assert reports[-1].metrics["distilled_devices"] == 4


def test_fedmd_targets_are_the_population_average(tmp_path):
    cfg = small_config(tmp_path, *SD, "strategy=fedmd", "strategy.kd.mix=logits", devices=3)
    grid = InProcessGrid(3)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    assert isinstance(strategy, FedMD)
    _start(cfg, grid, rounds=1, strategy=strategy)
    ids, logits = strategy.population()
    targets, _ = strategy.targets(2, [strategy.device_id(n) for n in strategy.devices])
    expected = logits.mean(0)
    for device in ids:
        assert torch.allclose(targets[device], expected, atol=1e-5)


def test_with_a_self_weight_each_target_mixes_the_device_itself_beside_its_neighbours(tmp_path):
    """strategy.sd_dist.self_weight = s: a device's target is (1 - s) x its neighbours' mean + s x its
    own predictions (in the mix space), so what its private answer model knows reaches its own model."""
    cfg = small_config(tmp_path, *SD, "strategy.kd.mix=logits", "strategy.sd_dist.self_weight=0.25")
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    _start(cfg, InProcessGrid(4), rounds=1, strategy=strategy)
    ids, logits = strategy.population()
    targets, _ = strategy.targets(2, [strategy.device_id(n) for n in strategy.devices])
    row = {device: k for k, device in enumerate(ids)}
    for device in ids:
        neighbours = [row[d] for d in strategy.neighbours[device]]
        assert len(neighbours) == 2
        expected = 0.75 * logits[neighbours].mean(0) + 0.25 * logits[row[device]]
        assert torch.allclose(targets[device], expected, atol=1e-5)
    with pytest.raises(ConfigError, match=r"strategy\.sd_dist\.self_weight"):
        resolve_config(None, ["strategy.sd_dist.self_weight=1"])


def test_strategy_rejects_bad_arguments_by_name():
    with pytest.raises(ValueError, match="neighbour_rule"):
        SDDist(num_reference=10, num_classes=3, search=NeighbourSearch(neighbour_rule="closest"))
    with pytest.raises(ValueError, match="precision"):
        SDDist(num_reference=10, num_classes=3, exchange=ReferenceDistillSettings(precision="int4"))
    with pytest.raises(ValueError, match="reference_labels"):
        SDDist(num_reference=10, num_classes=3, reference_labels=torch.zeros(9, dtype=torch.long))


def test_an_unknown_answer_model_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"strategy\.kd\.answer_model.*'public'"):
        resolve_config(None, ["strategy.kd.answer_model=public"])
