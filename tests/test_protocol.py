"""The wire protocol: typed messages with required fields and no fallbacks, on both sides.

A device that receives a message lacking a field, carrying one its type does not
declare, or holding a value of the wrong type answers with an error naming the field,
and the server books it as that device's failure; a reply the server cannot decode is
booked the same way. What a device may send is derived from the reply types.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from hetkd import protocol as P
from hetkd.clients.app import app as client_app
from hetkd.config import to_yaml
from hetkd.data import build_federation
from hetkd.distill.emulation import DistillSettings
from hetkd.distill.exchange import ReferenceDistillSettings
from hetkd.distill.losses import KDTerm, KLLoss
from hetkd.distill.queries import GeneratorSpec, QuerySpec
from hetkd.distill.similarity import NeighbourSearch
from hetkd.simulations.registry import build_strategy
from tests.conftest import InProcessGrid, small_config

ROOT = Path(__file__).resolve().parents[1]
KD = KDTerm(rho=0.3, batch_size=0, min_steps=2)
KL = KLLoss(temperature=3.0, scale=9.0)

#: one filled-in example of every message type
EXAMPLES: list[P.WireMessage] = [
    P.SetupRequest(run_config="seed: 1\n"),
    P.SetupRequest(),
    P.SetupReply(device_id=2, architecture="cnn_s", num_train=10, num_test=3, num_params=100, model_bytes=400,
                 num_reference=30, handler_seconds=0.5, peak_rss_mb=10.0),
    P.LocalTrainRequest(server_round=4),
    P.TrainReply(num_examples=10, train_loss=math.nan, samples_seen=0, train_seconds=0.0),
    P.ReferenceDistill(server_round=2, kd=KD, kl=KL, mix="probs", precision="float16", answer_model="personal",
                       targets=np.zeros((5, 3), np.float16),
                       population=P.Population(reference_logits=np.zeros((2, 5, 3), np.float16),
                                               device_ids=np.arange(2), quality=np.ones(2, np.float32),
                                               search=NeighbourSearch(num_neighbours=1), aggregate="median",
                                               trim_fraction=0.2)),
    P.ReferencePredictions(num_examples=10, train_loss=0.5, samples_seen=20, train_seconds=1.0,
                           reference_logits=np.zeros((5, 3), np.float32), distilled=False,
                           neighbour_distance=0.2, neighbours_changed=True),
    P.EnsembleDistill(server_round=3, kd=KD, loss=DistillSettings().loss(), response="hard", answer_model="private",
                      precision="float16", query=QuerySpec("generator", 2**62, 8, 4, True),
                      query_inputs=np.zeros((8, 1, 2, 2), np.float32),
                      targets=P.Targets(query=QuerySpec("reference", 1, 4), kind="hard", answers=np.arange(4)),
                      generator=GeneratorSpec(version=3, width=8, low=-1.0, high=1.0),
                      generator_weights={"w": torch.arange(3.0)}),
    P.QueryAnswers(num_examples=10, train_loss=0.5, samples_seen=20, train_seconds=1.0,
                   answers=np.zeros(8, np.uint8), distilled=True, private_train_loss=0.4, private_train_seconds=0.1),
    P.FedAvgRequest(server_round=1, weights={"w": torch.ones(2, 2)}),
    P.FedAvgReply(num_examples=3, train_loss=0.1, samples_seen=3, train_seconds=0.1, weights={"w": torch.ones(2)}),
    P.EvaluateRequest(server_round=1),
    P.EvaluateReply(personalised_accuracy=0.5, personalised_loss=1.0, num_test=4, global_accuracy=None),
]


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__") and isinstance(a, P.WireMessage | P.Population | P.Targets):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_wire_exactly(message):
    record = message.to_record()
    assert set(record.keys()) <= type(message).record_names()
    assert _same(type(message).from_record(record), message)


def test_what_a_device_may_send_derives_from_the_reply_types():
    assert P.DEVICE_TO_SERVER["train.reference_distill"] == {"metrics", "config", "arrays"}
    assert P.DEVICE_TO_SERVER["train.local"] == {"metrics", "config"}  # config: a DP device's privacy_exhausted
    assert P.DEVICE_TO_SERVER["evaluate"] == {"metrics"}
    assert P.DEVICE_TO_SERVER["query.setup"] == {"metrics", "config"}
    assert "weights" in P.DEVICE_TO_SERVER["train"]  # the FedAvg baseline, and only it, sends weights
    assert all("weights" not in names for kind, names in P.DEVICE_TO_SERVER.items() if kind != "train")


def _broken(record: RecordDict, how: str, key: str) -> RecordDict:
    config = ConfigRecord(dict(record["config"]))
    if how == "missing":
        del config[key]
    elif how == "unknown":
        config[key] = 1
    elif how == "wrong type":
        config[key] = "three"
    elif how == "bad value":
        config[key] = -4.0
    content = RecordDict(dict(record.items()))
    content["config"] = config
    return content


@pytest.mark.parametrize(
    ("how", "key", "named"),
    [
        ("missing", "kd.rho", "kd.rho"),
        ("missing", "server_round", "server_round"),
        ("unknown", "rho", "rho"),  # a fallback-era string key
        ("wrong type", "kl.temperature", "kl.temperature"),
        ("bad value", "kd.rho", "kd.rho"),
    ],
)
def test_a_device_refuses_a_malformed_request_naming_the_field(tmp_path, how, key, named):
    grid = InProcessGrid(num_devices=2)
    node = grid.node_ids[0]
    cfg = small_config(tmp_path, "strategy=sd-dist", devices=2)
    setup = client_app(P.SetupRequest(run_config=to_yaml(cfg)).message(node), grid.contexts[node])
    assert not setup.has_error()
    good = P.ReferenceDistill(server_round=1, kd=KD, kl=KL, mix="probs", precision="float16", answer_model="personal")
    message = Message(_broken(good.to_record(), how, key), node, good.message_type)
    reply = client_app(message, grid.contexts[node])
    assert reply.has_error()
    assert f"'{named}'" in reply.error.reason and "ReferenceDistill" in reply.error.reason


def test_every_request_type_is_checked_before_the_device_works(tmp_path):
    grid = InProcessGrid(num_devices=1)
    node = grid.node_ids[0]
    for request_type in P.REQUESTS.values():
        content = RecordDict({"config": ConfigRecord({"not_a_field": 1})})
        reply = client_app(Message(content, node, request_type.message_type), grid.contexts[node])
        assert reply.has_error() and "'not_a_field'" in reply.error.reason, request_type.__name__


def test_the_server_books_a_malformed_request_as_that_devices_failure(tmp_path):
    cfg = small_config(tmp_path, "strategy=sd-dist", devices=3)
    grid = InProcessGrid(3)
    bad = grid.node_ids[1]

    def drop_rho(message: Message) -> Message:
        if message.metadata.message_type != P.ReferenceDistill.message_type:
            return message
        return Message(_broken(message.content, "missing", "kd.rho"), bad, message.metadata.message_type)

    grid.tamper[bad] = drop_rho
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=2, on_round_end=reports.append)
    for report in reports:
        assert [f["device"] for f in report.failures] == [1]
        assert "'kd.rho'" in report.failures[0]["reason"] and "required" in report.failures[0]["reason"]
        assert report.trained == 2  # the others are unharmed
    assert 1 not in strategy.predictions  # nothing of the failed device entered anyone's targets


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (lambda c: c["metrics"].__delitem__("num_examples"), "'num_examples': required field is missing"),
        (lambda c: c["metrics"].__setitem__("lr", 0.1), "'lr': unknown field"),
        (lambda c: c.__setitem__("weights", ArrayRecord({"w": torch.ones(2)})), "'weights': unexpected record"),
        (lambda c: c["config"].__setitem__("distilled", "yes"), "'distilled': must be bool"),
        (lambda c: c["config"].__setitem__("num_examples", 5), "'num_examples': travels in the 'metrics' record"),
    ],
)
def test_the_server_books_a_malformed_reply_as_that_devices_failure(tmp_path, corrupt, fragment):
    cfg = small_config(tmp_path, "strategy=fedmd", devices=3)
    grid = InProcessGrid(3)
    bad = grid.node_ids[2]

    def fault(reply: Message) -> Message:
        if reply.has_error() or reply.metadata.message_type != P.ReferenceDistill.message_type:
            return reply
        content = RecordDict({k: (MetricRecord(dict(v)) if isinstance(v, MetricRecord) else
                                  ConfigRecord(dict(v)) if isinstance(v, ConfigRecord) else v)
                              for k, v in reply.content.items()})
        corrupt(content)
        return Message(content=content, metadata=reply.metadata)

    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    strategy.setup_devices(grid, block=True)
    grid.faults[bad] = fault
    reports = []
    strategy.start(grid=grid, num_rounds=1, on_round_end=reports.append)
    (failure,) = reports[0].failures
    assert failure["device"] == 2 and fragment in failure["reason"] and "ReferencePredictions" in failure["reason"]
    assert sorted(strategy.predictions) == [0, 1]


def test_device_handlers_read_only_the_fields_their_request_type_declares():
    """By construction: a handler gets the decoded request; only the decoding wrapper touches the records."""
    tree = ast.parse((ROOT / "clients" / "handlers.py").read_text())
    handlers = [f for f in tree.body if isinstance(f, ast.FunctionDef)
                and any(isinstance(d, ast.Call) and getattr(d.func, "id", "") == "handles" for d in f.decorator_list)]
    assert len(handlers) == len(P.REQUESTS)
    for function in handlers:
        declared = function.decorator_list[0].args[0]  # type: ignore[attr-defined]
        annotation = function.args.args[0].annotation
        assert ast.unparse(annotation) == ast.unparse(declared), function.name
    record_access = ("content", "config_records", "metric_records", "array_records")
    for path in sorted((ROOT / "clients").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in record_access:
                assert path.name == "handlers.py" and ast.unparse(node) == "message.content", (path.name, node.lineno)
    # the server side likewise reads replies only by decoding them (rounds.decode_reply; metering counts their bytes)
    for path in sorted((ROOT / "strategies").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in record_access and path.name != "metering.py":
                assert (path.name, ast.unparse(node)) == ("rounds.py", "reply.content"), (path.name, node.lineno)


def test_settings_travel_as_the_settings_objects_of_the_code_that_uses_them():
    """The wire form of a setting is its field: a strategy's settings reach the device unchanged."""
    exchange = ReferenceDistillSettings(rho=0.45, temperature=2.5, reference_batch_size=7, min_steps=3,
                                        answer_model="private")
    request = P.ReferenceDistill(server_round=1, kd=exchange.kd_term(), kl=exchange.kl_loss(), mix=exchange.mix,
                                 precision=exchange.precision, answer_model=exchange.answer_model)
    config = dict(request.to_record()["config"])
    assert config["kd.rho"] == 0.45 and config["kd.batch_size"] == 7 and config["kd.min_steps"] == 3
    assert config["kl.temperature"] == 2.5 and config["kl.scale"] == 2.5**2 and config["answer_model"] == "private"
    decoded = P.ReferenceDistill.from_record(request.to_record())
    assert decoded.kd == exchange.kd_term() and decoded.kl == exchange.kl_loss()
