"""The hetkd ``ClientApp``: routes Flower messages to a device's :class:`DistillClient`.

Actions (message type -> what the device does -> what it replies):

============================  ==============================================  =========================
``query.setup``               store the run config, initialise the model      architecture, sizes
``train.local``               train on private data (cross-entropy)           scalar metrics
``train.reference_distill``   train on private data + distil towards the      reference predictions
                              targets it received (or picked itself) on the   + scalar metrics
                              reference set; predict on the reference set
``train.ensemble_distill``    train on private data + distil towards the      answers on the query
                              ensemble's answers on last round's query;       + scalar metrics
                              answer this round's query (reference rows or
                              generator samples: FedDF, MEKD)
``train``                     FedAvg baseline: load global weights, train     weights + scalar metrics
``evaluate``                  own model (or given weights) on own test split  scalar metrics
                              and on the global test set
============================  ==============================================  =========================

Record and action names live in :mod:`hetkd.protocol`. Every handler opens the
device's state from its store, works, and saves it back, so the device keeps
learning across rounds although its weights never leave it (except in the
FedAvg baseline).

The device learns the run's configuration from the server's ``query.setup``
message; without one (a ServerApp of the user's own), it reads the run config
Flower gives it. Which device a node is (and, optionally, which model it holds
and where it keeps its state) comes from its node config, checked by
:func:`hetkd.clients.node_config.parse_node_config`.

Where a device's model and data come from is a :class:`DeviceSource`:
:data:`app` builds them from hetkd's data and model zoo (:class:`ZooDevices`);
:func:`hetkd.clients.make_client_app` from a model and data of the user's own.
:func:`build_client_app` wires any source to the handlers below.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import DEFAULT_ACTION

from hetkd import protocol as P
from hetkd.clients.device import DistillClient, peak_rss_mb
from hetkd.clients.node_config import MODEL, PARTITION_ID, NodeConfigError, parse_node_config
from hetkd.clients.state import DiskStateStore, StateStore, make_store
from hetkd.config import HetkdConfig, from_yaml, resolve_config
from hetkd.distill.codec import decode_answers, decode_logits, encode_answers, encode_logits
from hetkd.distill.emulation import freeze, mapping_emulation_loss
from hetkd.distill.ensemble import teacher_logits
from hetkd.distill.generative import Generator, make_generator
from hetkd.distill.queries import QuerySpec, resolve_queries
from hetkd.distill.similarity import mix_targets, neighbour_plan
from hetkd.models import ModelError
from hetkd.training import derive_seed

__all__ = [
    "app",
    "build_client_app",
    "DeviceSource",
    "ZooDevices",
    "HANDLERS",
    "device_config",
    "device_id_of",
    "device_session",
    "reply",
    "message_config",
    "CONFIG_STATE_KEY",
]

CONFIG_STATE_KEY = "hetkd.config"
PARTITION_ID_KEY = PARTITION_ID


# --------------------------------------------------------------------------- plumbing


def device_config(context: Context) -> HetkdConfig:
    """The run config this device was set up with (or Flower's run config)."""
    record = context.state.get(CONFIG_STATE_KEY)
    if record is not None:
        return _cached_config(str(record["yaml"]))  # type: ignore[index]
    return resolve_config(overrides=dict(context.run_config))


_CONFIG_CACHE: dict[str, HetkdConfig] = {}


def _cached_config(text: str) -> HetkdConfig:
    if text not in _CONFIG_CACHE:
        _CONFIG_CACHE.clear()
        _CONFIG_CACHE[text] = from_yaml(text)
    return _CONFIG_CACHE[text]


def device_id_of(context: Context, cfg: HetkdConfig) -> int:
    """The device's index, from the node config's ``partition-id`` (checked with the rest of it)."""
    return parse_node_config(context.node_config, cfg.simulation.num_devices).partition_id


def _state_root(cfg: HetkdConfig) -> Path:
    return Path(cfg.output.dir or cfg.output.root).expanduser() / "device-state"


class DeviceSource(Protocol):
    """Where a node's device comes from: its model, its data and its state store."""

    def open(self, context: Context) -> tuple[DistillClient, StateStore]:
        """This node's device, freshly initialised, and the store that holds its learnt state."""
        ...


class ZooDevices:
    """Devices from hetkd's data and model zoo, as the run config describes them.

    The node config's ``partition-id`` picks the device (its data partition and,
    through ``models.assignment``, its model); ``model`` replaces the
    architecture and ``state-dir`` keeps the state on disk there.
    """

    def open(self, context: Context) -> tuple[DistillClient, StateStore]:
        cfg = device_config(context)
        torch.set_num_threads(cfg.training.num_threads)
        node = parse_node_config(context.node_config, cfg.simulation.num_devices)
        try:
            client = DistillClient.from_config(cfg, node.partition_id, architecture=node.model)
        except ModelError as err:
            if node.model is None:
                raise
            raise NodeConfigError(MODEL, f": {err}") from None
        if node.state_dir is not None:
            return client, DiskStateStore(node.state_dir, node.partition_id)
        return client, make_store(cfg.simulation.state_store, context, node.partition_id, _state_root(cfg))


ZOO_DEVICES = ZooDevices()


@contextmanager
def device_session(context: Context, devices: DeviceSource = ZOO_DEVICES, save: bool = True) -> Iterator[DistillClient]:
    """Open this node's device with its stored state; save it back afterwards."""
    client, store = devices.open(context)
    state = store.load()
    if state is not None:
        client.load_state_dict(state)
    yield client
    if save:
        store.save(client.state_dict())


def message_config(message: Message) -> ConfigRecord:
    """The message's ConfigRecord (``config``), empty if it has none."""
    record = message.content.config_records.get(P.CONFIG)
    return record if record is not None else ConfigRecord()


def reply(
    message: Message,
    metrics: dict[str, Any],
    *,
    arrays: dict[str, ArrayRecord] | None = None,
    configs: dict[str, ConfigRecord] | None = None,
    started: float | None = None,
) -> Message:
    """A reply carrying scalar ``metrics`` (plus any named records)."""
    values = {k: (float(v) if isinstance(v, float) else v) for k, v in metrics.items() if isinstance(v, (int, float))}
    values["peak-rss-mb"] = peak_rss_mb()
    if started is not None:
        values["handler-seconds"] = time.perf_counter() - started
    content = RecordDict({P.METRICS: MetricRecord(values)})
    for key, record in (arrays or {}).items():
        content[key] = record
    for key, record in (configs or {}).items():
        content[key] = record
    return Message(content, reply_to=message)


# --------------------------------------------------------------------------- actions


def setup(message: Message, context: Context, devices: DeviceSource = ZOO_DEVICES) -> Message:
    """Store the run config sent by the server and initialise the device."""
    started = time.perf_counter()
    text = message_config(message).get(P.RUN_CONFIG_YAML)
    if text:
        _cached_config(str(text))  # validate before storing (parsed once per process, not once per device)
        context.state[CONFIG_STATE_KEY] = ConfigRecord({"yaml": str(text)})
    with device_session(context, devices) as client:
        info = client.describe()
    architecture = info.pop("architecture")
    return reply(
        message,
        info,
        configs={P.DEVICE: ConfigRecord({"architecture": architecture})},
        started=started,
    )


def train_local(message: Message, context: Context, devices: DeviceSource = ZOO_DEVICES) -> Message:
    """Local-only training: cross-entropy on the private data."""
    started = time.perf_counter()
    config = message_config(message)
    with device_session(context, devices) as client:
        epochs = int(config.get("local-epochs", client.training.local_epochs))  # type: ignore[arg-type]
        metrics = client.fit(int(config.get(P.SERVER_ROUND, 0)), epochs)  # type: ignore[arg-type]
    return reply(message, metrics, started=started)


def train_fedavg(message: Message, context: Context, devices: DeviceSource = ZOO_DEVICES) -> Message:
    """FedAvg baseline: start from the global weights, train, send the weights back."""
    started = time.perf_counter()
    config = message_config(message)
    arrays = message.content.array_records.get(P.ARRAYS)
    if arrays is None:
        raise ValueError(f"a '{P.TRAIN_FEDAVG}' message must carry the global weights under '{P.ARRAYS}'")
    with device_session(context, devices) as client:
        client.set_weights(arrays.to_torch_state_dict())
        metrics = client.fit(int(config.get(P.SERVER_ROUND, 0)))  # type: ignore[arg-type]
        weights = ArrayRecord(client.get_weights())
    return reply(message, metrics, arrays={P.ARRAYS: weights}, started=started)


def evaluate(message: Message, context: Context, devices: DeviceSource = ZOO_DEVICES) -> Message:
    """Evaluate the device's own model, or the weights the message carries (FedAvg)."""
    started = time.perf_counter()
    arrays = message.content.array_records.get(P.ARRAYS)
    with device_session(context, devices, save=False) as client:
        if arrays is not None and len(arrays) > 0:
            client.set_weights(arrays.to_torch_state_dict())
        metrics = client.evaluate()
    return reply(message, metrics, started=started)


NEIGHBOURS_STATE_KEY = "hetkd.neighbours"


def _pick_own_target(
    client: DistillClient, population: ArrayRecord, config: ConfigRecord, context: Context
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Device-side SD-Dist: choose neighbours from the relayed predictions, locally.

    The device puts its own current predictions first, runs the same
    selection rule the server would, and keeps its neighbour list to itself
    (only their mean distance and whether they changed are reported).
    """
    others = decode_logits(population[P.REFERENCE_LOGITS].numpy())
    ids = population[P.DEVICE_IDS].numpy().astype(int).tolist()
    keep = [k for k, d in enumerate(ids) if d != client.device_id]
    if not keep:
        return None, {}
    own = client.reference_logits().log_softmax(-1)
    logits = torch.cat([own[None], others[keep]])
    quality = None
    if P.QUALITY in population:
        q = torch.from_numpy(population[P.QUALITY].numpy().astype("float32"))
        quality = torch.cat([torch.tensor([float("inf")]), q[keep]])
    weights, distance, neighbours = neighbour_plan(
        logits,
        [0],
        num_neighbours=int(config["num-neighbours"]),  # type: ignore[arg-type]
        num_candidates=int(config["num-candidates"]),  # type: ignore[arg-type]
        rule=str(config["neighbour-rule"]),
        similarity=str(config["similarity"]),
        weighting=str(config["weighting"]),
        temperature=float(config["temperature"]),  # type: ignore[arg-type]
        quality=quality,
        generator=torch.Generator().manual_seed(
            derive_seed(client.seed, "neighbours", client.device_id, config.get(P.SERVER_ROUND, 0))
        ),
    )
    chosen = sorted(ids[keep[j - 1]] for j in neighbours[0])
    previous = context.state.get(NEIGHBOURS_STATE_KEY)
    changed = previous is None or list(previous["ids"]) != chosen  # type: ignore[index]
    context.state[NEIGHBOURS_STATE_KEY] = ConfigRecord({"ids": chosen or [-1]})
    target = mix_targets(weights, logits, str(config.get("mix", "logits")), float(config["temperature"]))[0]
    stats = {
        "neighbour-distance": float(distance[0, neighbours[0]].mean()) if neighbours[0] else float("nan"),
        "neighbours-changed": float(changed),
    }
    return target, stats


def train_reference_distill(message: Message, context: Context, devices: DeviceSource = ZOO_DEVICES) -> Message:
    """Logit exchange (FedMD, SD-Dist): distil towards targets on the reference set,
    then send back predictions on the reference set and nothing else."""
    started = time.perf_counter()
    config = message_config(message)
    server_round = int(config.get(P.SERVER_ROUND, 0))  # type: ignore[arg-type]
    precision = str(config.get("precision", "float32"))
    with device_session(context, devices) as client:
        extra: dict[str, float] = {}
        targets = message.content.array_records.get(P.TARGETS)
        population = message.content.array_records.get(P.POPULATION)
        target = decode_logits(targets[P.REFERENCE_LOGITS].numpy()) if targets is not None else None
        if target is None and population is not None:
            target, extra = _pick_own_target(client, population, config, context)
        if target is None:
            metrics = client.fit(server_round)
        else:
            metrics = client.fit_towards(
                server_round,
                target,
                rho=float(config.get("rho", 0.9)),  # type: ignore[arg-type]
                temperature=float(config.get("temperature", 3.0)),  # type: ignore[arg-type]
                reference_batch_size=int(config.get("reference-batch-size", 0)),  # type: ignore[arg-type]
                kd_scale=float(config.get("kd-scale", 1.0)),  # type: ignore[arg-type]
                min_steps=int(config.get("min-steps", 0)),  # type: ignore[arg-type]
            )
        metrics.update(extra)
        metrics["distilled"] = float(target is not None)
        predictions = ArrayRecord({P.REFERENCE_LOGITS: Array(encode_logits(client.reference_logits(), precision))})
    return reply(message, metrics, arrays={P.PREDICTIONS: predictions}, started=started)


GENERATOR_STATE_KEY = "hetkd.generator"
GENERATOR_VERSION_STATE_KEY = "hetkd.generator-version"


def _held_generator(message: Message, config: ConfigRecord, context: Context, client: DistillClient) -> Generator | None:
    """The generator this round uses (MEKD): the weights the message carries, kept
    in the node's state for later rounds, or the kept copy of the version the
    server names. ``None`` when the server names no generator."""
    version = config.get("generator-version")
    if version is None:
        return None
    record = message.content.array_records.get(P.GENERATOR)
    if record is not None:
        context.state[GENERATOR_STATE_KEY] = record
        context.state[GENERATOR_VERSION_STATE_KEY] = ConfigRecord({"version": int(version)})  # type: ignore[arg-type]
    else:
        held = context.state.get(GENERATOR_VERSION_STATE_KEY)
        held_version = int(held["version"]) if held is not None else None  # type: ignore[index, arg-type]
        if held_version != int(version):  # type: ignore[arg-type]
            raise ValueError(
                f"the server refers to generator version {version} without sending it, and this device holds "
                f"{'none' if held_version is None else f'version {held_version}'}; it will be sent again"
            )
        record = context.state[GENERATOR_STATE_KEY]  # type: ignore[assignment]
    generator = make_generator(
        client.global_test.input_shape,
        client.global_test.num_classes,
        (float(config["generator-low"]), float(config["generator-high"])),  # type: ignore[arg-type]
        int(config["generator-width"]),  # type: ignore[arg-type]
    )
    generator.load_state_dict(record.to_torch_state_dict())  # type: ignore[union-attr]
    return freeze(generator)


def train_ensemble_distill(message: Message, context: Context, devices: DeviceSource = ZOO_DEVICES) -> Message:
    """Ensemble distillation (FedDF, MEKD): distil towards the ensemble's answers on the
    previous query, then answer this round's query, and send back those answers only."""
    started = time.perf_counter()
    config = message_config(message)
    server_round = int(config.get(P.SERVER_ROUND, 0))  # type: ignore[arg-type]
    with device_session(context, devices) as client:
        generator = _held_generator(message, config, context, client)
        held = {"reference_inputs": client.reference_inputs() if client.reference is not None else None,
                "generator": generator}
        query = QuerySpec.from_config(config, P.QUERY)
        target_query = QuerySpec.from_config(config, P.TARGET_QUERY)
        targets = message.content.array_records.get(P.TARGETS)
        answer_model = str(config.get(P.ANSWER_MODEL, "personal"))
        if answer_model not in P.ANSWER_MODELS:
            raise ValueError(f"unknown {P.ANSWER_MODEL} {answer_model!r}; valid choices: {', '.join(P.ANSWER_MODELS)}")
        private = answer_model == "private"
        min_steps = int(config.get("min-steps", 0))  # type: ignore[arg-type]
        if targets is not None and target_query is not None:
            if private:
                client.fork_private_model()  # before the device's model first learns from the others
            kind = str(config["target-kind"])
            answers = decode_answers(targets[P.TARGET_RESPONSES].numpy(), kind, client.global_test.num_classes)
            w_f = float(config.get("w-f", 0.0))  # type: ignore[arg-type]
            settings = {
                "temperature": float(config["temperature"]),  # type: ignore[arg-type]
                "generator_temperature": float(config.get("generator-temperature", 1.0)),  # type: ignore[arg-type]
                "w_f": w_f,
                "w_kl": float(config.get("w-kl", 1.0)),  # type: ignore[arg-type]
                "distance": str(config.get("distance", "l1")),
            }
            loss_generator = generator if w_f > 0 else None

            def distill_loss(student_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
                return mapping_emulation_loss(student_logits, target_logits, loss_generator, **settings)

            metrics = client.fit_towards(
                server_round,
                teacher_logits(answers, kind, hard_margin=float(config.get("hard-margin", 1.0))),  # type: ignore[arg-type]
                rho=float(config.get("rho", 0.5)),  # type: ignore[arg-type]
                temperature=settings["temperature"],  # type: ignore[arg-type]
                reference_batch_size=int(config.get("query-batch-size", 0)),  # type: ignore[arg-type]
                min_steps=min_steps,
                inputs=resolve_queries(target_query, **held),
                distill_loss=distill_loss,
            )
            metrics["distilled"] = 1.0
        else:
            metrics = client.fit(server_round, min_steps=min_steps)
            metrics["distilled"] = 0.0
        if private and client.private_model is not None:
            metrics.update(client.fit_private(server_round, min_steps=min_steps))
        arrays: dict[str, ArrayRecord] = {}
        if query is not None:
            shipped = message.content.array_records.get(P.QUERY_INPUTS)
            inputs = torch.from_numpy(shipped[P.INPUTS].numpy().copy()) if shipped is not None else None
            answers_now = encode_answers(
                client.predict(resolve_queries(query, inputs=inputs, **held), private=private),
                str(config.get("response", "soft")),
                str(config.get("precision", "float32")),
            )
            arrays[P.PREDICTIONS] = ArrayRecord({P.RESPONSES: Array(answers_now)})
    return reply(message, metrics, arrays=arrays, started=started)


# --------------------------------------------------------------------------- the app

#: message type -> handler(message, context, devices): every action a hetkd device answers
HANDLERS: dict[str, Callable[..., Message]] = {
    P.SETUP: setup,
    P.TRAIN_LOCAL: train_local,
    P.TRAIN_FEDAVG: train_fedavg,
    P.EVALUATE: evaluate,
    P.TRAIN_REFERENCE_DISTILL: train_reference_distill,
    P.TRAIN_ENSEMBLE_DISTILL: train_ensemble_distill,
}


def build_client_app(devices: DeviceSource) -> ClientApp:
    """A ``ClientApp`` answering every hetkd action with the devices ``devices`` opens."""
    client_app = ClientApp()
    for message_type, handler in HANDLERS.items():
        category, _, action = message_type.partition(".")
        if category not in (MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY):
            raise ValueError(f"message type {message_type!r} is not train, evaluate or query")
        getattr(client_app, category)(action or DEFAULT_ACTION)(functools.partial(handler, devices=devices))
    return client_app


#: the hetkd ClientApp: devices from the data and model zoo the run config names
app = build_client_app(ZOO_DEVICES)
