"""Black-box teachers: a teacher is only a function from an input batch to answers.

Everything that needs a teacher takes a *responder*: a callable from an input
batch to responses (:data:`~hetkd.distill.ensemble.RESPONSE_KINDS`), always
called under ``torch.no_grad()`` on detached inputs. :class:`BlackBoxTeacher`
wraps a model into one and refuses every attribute access but the forward
call; a plain ``nn.Module`` passed as a teacher is wrapped that way
(:func:`as_responder`). Any other callable (e.g. one that sends the batch to
devices over the network and averages their replies) is used as is, with
``response=`` naming what it returns. :func:`query_teacher` asks a responder
about many inputs and checks its answers; :func:`proxy_inputs` takes the
unlabelled public inputs a black-box method may use.

The step classes (:class:`~hetkd.distill.deprivatization.Deprivatizer`,
:class:`~hetkd.distill.emulation.MappingEmulationDistiller`) also accept
responses computed elsewhere, so a Flower strategy can send inputs out,
collect replies, and call ``step`` when they arrive. Whole black-box runs
(:func:`~hetkd.distill.blackbox.deprivatize`,
:func:`~hetkd.distill.blackbox.distill` and the baselines) live in
:mod:`hetkd.distill.blackbox`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hetkd.distill.ensemble import RESPONSE_KINDS, check_kind, check_responses, responses_from_logits

__all__ = [
    "Responder",
    "BlackBoxError",
    "BlackBoxTeacher",
    "as_responder",
    "query_teacher",
    "proxy_inputs",
]

#: a black-box teacher: input batch -> responses (N x C)
Responder = Callable[[torch.Tensor], torch.Tensor]


class BlackBoxError(AttributeError):
    """Something other than a forward query was asked of a black-box teacher."""


def _forward_only(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A closure that runs ``model`` (in eval mode if it is a module) and nothing else."""
    is_module = isinstance(model, nn.Module)

    def answer(inputs: torch.Tensor) -> torch.Tensor:
        if is_module:
            model.eval()  # type: ignore[union-attr]
        return model(inputs)

    return answer


class BlackBoxTeacher:
    """A teacher seen only through its answers: call it on a batch, get responses.

    Wraps any callable from inputs to logits (a ``torch.nn.Module``, a user's
    function). Calls run under ``torch.no_grad()`` on detached inputs, and the
    answer is turned into the ``response`` kind: ``"logits"``, ``"soft"``
    (softmax probabilities) or ``"hard"`` (one-hot argmax). ``queries`` counts
    the inputs answered so far. Reading anything else — parameters, state,
    gradients, the wrapped model — raises :class:`BlackBoxError`.
    """

    __slots__ = ("_answer", "response", "num_classes", "queries")

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], response: str = "soft") -> None:
        if not callable(model):
            raise TypeError(f"a teacher must be callable on a batch of inputs, got {type(model).__name__}")
        self._answer = _forward_only(model)
        self.response = check_kind(response)
        self.num_classes: int | None = None
        self.queries = 0

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"a teacher answers float input batches (N, ...), got {shape}")
        with torch.no_grad():
            logits = self._answer(inputs.detach())
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"the wrapped teacher must return logits of shape ({inputs.shape[0]}, C), got {got}")
        if not torch.isfinite(logits).all():
            raise ValueError("the wrapped teacher returned non-finite logits")
        if self.num_classes is None:
            self.num_classes = int(logits.shape[1])
        elif logits.shape[1] != self.num_classes:
            raise ValueError(f"the teacher answered with {logits.shape[1]} classes after {self.num_classes}")
        self.queries += int(inputs.shape[0])
        return responses_from_logits(logits.detach().float(), self.response)

    def __getattr__(self, name: str) -> Any:
        raise BlackBoxError(
            f"a black-box teacher answers forward queries only; '{name}' (parameters, gradients, "
            "state, the model itself) is not available"
        )

    def __repr__(self) -> str:
        return f"BlackBoxTeacher(response={self.response!r}, queries={self.queries})"


def as_responder(teacher: Any, response: str | None = None) -> tuple[Responder, str]:
    """``(responder, response kind)`` for any accepted teacher.

    * a :class:`BlackBoxTeacher`: used as is (``response``, if given, must match);
    * a ``torch.nn.Module`` (a model returning logits): wrapped in a
      :class:`BlackBoxTeacher` answering with ``response`` (default ``"soft"``);
    * any other callable: a responder that already returns ``response``-kind
      answers (``response`` is then required).
    """
    if isinstance(teacher, BlackBoxTeacher):
        if response is not None and check_kind(response) != teacher.response:
            raise ValueError(f"response={response!r} but the black-box teacher answers {teacher.response!r}")
        return teacher, teacher.response
    if isinstance(teacher, nn.Module):
        kind = check_kind(response or "soft")
        return BlackBoxTeacher(teacher, kind), kind
    if not callable(teacher):
        raise TypeError(f"a teacher must be callable on a batch of inputs, got {type(teacher).__name__}")
    if response is None:
        raise ValueError(
            f"response= must say what the callable teacher returns ({', '.join(RESPONSE_KINDS)})"
        )
    return teacher, check_kind(response)


def query_teacher(
    teacher: Responder, inputs: torch.Tensor, kind: str, num_classes: int | None = None, chunk: int = 1024
) -> torch.Tensor:
    """Ask ``teacher`` about ``inputs`` (in chunks, under ``no_grad``); checked float32 responses."""
    answers = []
    with torch.no_grad():
        for part in inputs.detach().split(chunk):
            answers.append(check_responses(teacher(part), kind, len(part), num_classes))
            num_classes = answers[-1].shape[1]
    return torch.cat(answers)


def proxy_inputs(proxy_data: Any) -> torch.Tensor:
    """The unlabelled inputs of a tensor, a ``DataView`` or an ``ArrayDataset`` (labels are dropped)."""
    if isinstance(proxy_data, torch.Tensor):
        x = proxy_data
    elif hasattr(proxy_data, "tensors"):
        x = proxy_data.tensors()[0]
    elif hasattr(proxy_data, "inputs"):
        x = proxy_data.inputs()
    else:
        raise TypeError(f"proxy data must be a tensor, DataView or ArrayDataset, got {type(proxy_data).__name__}")
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"proxy inputs must be a float batch (N, ...), got dtype {x.dtype} shape {tuple(x.shape)}")
    if len(x) < 2:
        raise ValueError(f"proxy data must hold at least 2 inputs, got {len(x)}")
    return x.detach().float()
