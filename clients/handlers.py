"""What a device does with each request: one handler per action.

============================  ==============================================  =========================
request (message type)        what the device does                            reply
============================  ==============================================  =========================
``SetupRequest``              store the run config, initialise the model      ``SetupReply``: architecture, sizes
``LocalTrainRequest``         train on private data (cross-entropy)           ``TrainReply``
``ReferenceDistill``          train on private data + distil towards the      ``ReferencePredictions``
                              targets it received (or picked itself) on the
                              reference set; predict on the reference set
``EnsembleDistill``           train on private data + distil towards the      ``QueryAnswers``
                              ensemble's answers on an earlier query; answer
                              this round's query (reference rows or
                              generator samples: FedDF, MEKD)
``FedAvgRequest``             FedAvg baseline: load global weights, train     ``FedAvgReply``: weights
``EvaluateRequest``           own model (or given weights) on own test split  ``EvaluateReply``
                              and on the global test set
============================  ==============================================  =========================

A handler gets the request already decoded (:func:`handles`): it reads the
fields its type declares and nothing else. A message that lacks a field,
carries one its type does not declare, or holds a value of the wrong type is
answered with an error reply naming the field, and the server books it as
that device's failure. Every handler opens the device's state from its store,
works, and saves it back, so the device keeps learning across rounds although
its weights never leave it (except in the FedAvg baseline).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

from hetkd import protocol as P
from hetkd.clients.device import DistillClient, peak_rss_mb
from hetkd.clients.session import CONFIG_STATE_KEY, DeviceSource, cached_config, device_session
from hetkd.distill.codec import decode_answers, decode_logits, encode_answers, encode_logits
from hetkd.distill.emulation import freeze
from hetkd.distill.ensemble import teacher_logits
from hetkd.distill.exchange import teacher_targets
from hetkd.distill.generative import Generator, make_generator
from hetkd.distill.queries import resolve_queries
from hetkd.training import derive_seed

__all__ = ["HANDLERS", "handles"]

R = TypeVar("R", bound=P.Request)
Handler = Callable[[Message, Context, DeviceSource], Message]


def handles(request_type: type[R]) -> Callable[[Callable[[R, Context, DeviceSource], P.Reply]], Handler]:
    """Wrap ``handler(request, context, devices) -> reply`` as a Flower message handler.

    The message is decoded as ``request_type`` first (a malformed one gets an
    error reply naming the field); the reply gets the handler's wall time and
    the process's peak memory, and goes back addressed to the sender.
    """

    def wrap(handler: Callable[[R, Context, DeviceSource], P.Reply]) -> Handler:
        @functools.wraps(handler)
        def handle(message: Message, context: Context, devices: DeviceSource) -> Message:
            started = time.perf_counter()
            try:
                request = request_type.from_record(message.content)
            except P.ProtocolError as err:
                reason = f"malformed {request_type.__name__} ({message.metadata.message_type}): {err}"
                return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            reply = handler(request, context, devices)
            reply = replace(reply, handler_seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
            return reply.message(message)

        handle.request_type = request_type  # type: ignore[attr-defined]
        return handle

    return wrap


# --------------------------------------------------------------------------- set-up, local, FedAvg, evaluation


@handles(P.SetupRequest)
def setup(request: P.SetupRequest, context: Context, devices: DeviceSource) -> P.SetupReply:
    """Store the run config sent by the server (validated first) and initialise the device."""
    if request.run_config is not None:
        cached_config(request.run_config)  # parsed once per process, not once per device
        context.state[CONFIG_STATE_KEY] = ConfigRecord({"yaml": request.run_config})
    with device_session(context, devices) as client:
        return P.SetupReply(**client.describe())


@handles(P.LocalTrainRequest)
def train_local(request: P.LocalTrainRequest, context: Context, devices: DeviceSource) -> P.TrainReply:
    """Local-only training: cross-entropy on the private data."""
    with device_session(context, devices, training=request.training,
                        server_round=request.server_round) as client:
        return P.TrainReply(**client.fit(request.server_round))


@handles(P.FedAvgRequest)
def train_fedavg(request: P.FedAvgRequest, context: Context, devices: DeviceSource) -> P.FedAvgReply:
    """FedAvg baseline: start from the global weights, train, send the weights back."""
    with device_session(context, devices, training=request.training,
                        server_round=request.server_round) as client:
        client.set_weights(request.weights)
        metrics = client.fit(request.server_round)
        return P.FedAvgReply(**metrics, weights=client.get_weights())


@handles(P.EvaluateRequest)
def evaluate(request: P.EvaluateRequest, context: Context, devices: DeviceSource) -> P.EvaluateReply:
    """Evaluate the device's own model, or the weights the request carries (FedAvg)."""
    with device_session(context, devices, save=False) as client:
        if request.weights:
            client.set_weights(request.weights)
        return P.EvaluateReply(**client.evaluate())


# --------------------------------------------------------------------------- logit exchange

def train_round(client: DistillClient, server_round: int, private: bool,
                distil: Callable[[], dict[str, Any]] | None, rho: float, min_steps: int = 0) -> dict[str, Any]:
    """One round's training of a distilling device: ``distil()`` when the server sent targets,
    its private data alone otherwise (``min_steps`` per epoch). With a private answer model
    (``private``) the device forks it before its model first learns from the others (one of
    another architecture exists from the first round) and trains it on the private data
    alone every round after; that model trains last, so its privacy report is the round's.
    Once it exists, with ``rho = 1`` (the distillation term alone) the device's own model
    learns from the others only: a round without targets leaves it as it is, so under DP
    one model reads the private data, as the budget plans."""
    if private and (distil is not None or client.private_model_init is not None):
        client.fork_private_model()  # before the device's model first learns from the others
    if distil is not None:
        metrics = distil()
    elif private and client.private_model is not None and rho == 1:
        metrics = client.untrained_report()
    else:
        metrics = client.fit(server_round, min_steps=min_steps)
    if private and client.private_model is not None:
        metrics |= client.fit_private(server_round, min_steps=min_steps)
    return metrics


NEIGHBOURS_STATE_KEY = "hetkd.neighbours"


def pick_own_target(
    client: DistillClient, request: P.ReferenceDistill, context: Context
) -> tuple[torch.Tensor | None, dict[str, float | bool]]:
    """Device-side SD-Dist: choose neighbours from the relayed predictions, locally.

    The device puts its own current predictions first, runs the same
    :class:`~hetkd.distill.similarity.NeighbourSearch` the server would, and
    keeps its neighbour list to itself (only their mean distance and whether
    they changed are reported).
    """
    population = request.population
    assert population is not None
    ids = population.device_ids.astype(int).tolist()
    keep = [k for k, d in enumerate(ids) if d != client.device_id]
    if not keep:
        return None, {}
    others = decode_logits(population.reference_logits)
    own = client.reference_logits(private=request.answer_model == "private").log_softmax(-1)  # what it sends
    logits = torch.cat([own[None], others[keep]])
    quality = None
    if population.quality is not None:
        q = torch.from_numpy(population.quality.astype("float32"))
        quality = torch.cat([torch.tensor([float("inf")]), q[keep]])
    plan = population.search.plan(
        logits, [0], temperature=request.kl.temperature, quality=quality,
        generator=torch.Generator().manual_seed(
            derive_seed(client.seed, "neighbours", client.device_id, request.server_round)),
    )
    chosen = sorted(ids[keep[j - 1]] for j in plan.neighbours[0])
    previous = context.state.get(NEIGHBOURS_STATE_KEY)
    changed = previous is None or list(previous["ids"]) != chosen  # type: ignore[index]
    context.state[NEIGHBOURS_STATE_KEY] = ConfigRecord({"ids": chosen or [-1]})
    made = teacher_targets(plan.weights, logits, space=request.mix, temperature=request.kl.temperature,
                           aggregate=population.aggregate, trim_fraction=population.trim_fraction, quality=quality)
    target = made.targets[0] if bool(made.taught[0]) else None
    distance = float(plan.distance[0, plan.neighbours[0]].mean()) if plan.neighbours[0] else float("nan")
    return target, {"neighbour_distance": distance, "neighbours_changed": changed}


@handles(P.ReferenceDistill)
def train_reference_distill(
    request: P.ReferenceDistill, context: Context, devices: DeviceSource
) -> P.ReferencePredictions:
    """Logit exchange (FedMD, SD-Dist): distil towards targets on the reference set,
    then send back predictions on the reference set (of the model ``answer_model``
    names) and nothing else."""
    round_ = request.server_round
    private = request.answer_model == "private"
    with device_session(context, devices, training=request.training, server_round=round_) as client:
        target, picked = None, {}
        if request.targets is not None:
            target = decode_logits(request.targets)
        elif request.population is not None:
            target, picked = pick_own_target(client, request, context)
        distil = None if target is None else lambda: client.fit_towards(round_, target, request.kd, request.kl)
        metrics = train_round(client, round_, private, distil, request.kd.rho)
        predictions = encode_logits(client.outgoing(client.reference_logits(private=private), round_),
                                    request.precision)
        return P.ReferencePredictions(**metrics, reference_logits=predictions, distilled=target is not None,
                                      **picked)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- ensemble distillation

GENERATOR_STATE_KEY = "hetkd.generator"
GENERATOR_VERSION_STATE_KEY = "hetkd.generator-version"


def held_generator(request: P.EnsembleDistill, context: Context, client: DistillClient) -> Generator | None:
    """The generator this round uses (MEKD): the weights the request carries, kept in the
    node's state for later rounds, or the kept copy of the version the server names, on the
    device's ``training.device`` (the distillation loss runs it on the model's logits; the
    query inputs it generates come back on the CPU). ``None`` when the request names no generator."""
    spec = request.generator
    if spec is None:
        return None
    if request.generator_weights is not None:
        record = ArrayRecord(request.generator_weights)
        context.state[GENERATOR_STATE_KEY] = record
        context.state[GENERATOR_VERSION_STATE_KEY] = ConfigRecord({"version": spec.version})
    else:
        held = context.state.get(GENERATOR_VERSION_STATE_KEY)
        held_version = int(held["version"]) if held is not None else None  # type: ignore[index, arg-type]
        if held_version != spec.version:
            raise ValueError(
                f"the server refers to generator version {spec.version} without sending it, and this device holds "
                f"{'none' if held_version is None else f'version {held_version}'}; it will be sent again"
            )
        record = context.state[GENERATOR_STATE_KEY]  # type: ignore[assignment]
    generator = make_generator(client.global_test.input_shape, client.global_test.num_classes,
                               (spec.low, spec.high), spec.width)
    generator.load_state_dict(record.to_torch_state_dict())  # type: ignore[union-attr]
    return freeze(generator.to(client.torch_device))


@handles(P.EnsembleDistill)
def train_ensemble_distill(request: P.EnsembleDistill, context: Context, devices: DeviceSource) -> P.QueryAnswers:
    """Ensemble distillation (FedDF, MEKD): distil towards the ensemble's answers on an
    earlier query, then answer this round's query, and send back those answers only."""
    round_ = request.server_round
    with device_session(context, devices, training=request.training,
                        server_round=request.server_round) as client:
        generator = held_generator(request, context, client)
        held = {"reference_inputs": client.reference_inputs() if client.reference is not None else None,
                "generator": generator}
        private = request.answer_model == "private"
        targets = request.targets

        def distil() -> dict[str, Any]:
            assert targets is not None
            answers = decode_answers(targets.answers, targets.kind, client.global_test.num_classes)
            loss = request.loss.bind(generator if request.loss.w_f > 0 else None)
            return client.fit_towards(
                round_, teacher_logits(answers, targets.kind, hard_margin=request.loss.hard_margin), request.kd, loss,
                inputs=resolve_queries(targets.query, **held),
                generated=targets.query.generated_rows() if request.loss.generated_only else None,
            )

        metrics = train_round(client, round_, private, None if targets is None else distil, request.kd.rho,
                              request.kd.min_steps)
        answers_now = None
        if request.query is not None:
            shipped = None if request.query_inputs is None else torch.from_numpy(request.query_inputs.copy())
            inputs = resolve_queries(request.query, inputs=shipped, **held)
            mine = client.outgoing(client.predict(inputs, private=private), round_)
            answers_now = encode_answers(mine, request.response, request.precision)
        return P.QueryAnswers(**metrics, answers=answers_now, distilled=targets is not None)


#: Flower message type -> handler(message, context, devices): every action a hetkd device answers
HANDLERS: dict[str, Handler] = {
    handler.request_type.message_type: handler  # type: ignore[attr-defined]
    for handler in (setup, train_local, train_fedavg, evaluate, train_reference_distill, train_ensemble_distill)
}
