"""Query inputs: the public inputs a server asks every device to answer on.

Ensemble distillation (FedDF, MEKD) needs every device and the server to look
at the *same* inputs without shipping them when that can be avoided. A
:class:`QuerySpec` names them compactly:

* ``source="reference"``: ``count`` rows of the reference set every device
  already holds, chosen by a seeded permutation (FedDF);
* ``source="generator"``: ``count`` samples ``G(z)`` with ``z`` drawn from the
  seed, for a generator whose weights the device holds (MEKD); ``train_mode``
  says whether G's BatchNorm runs on batch statistics (chunks of
  ``batch_size``), as during deprivatization;
* ``source="inputs"``: the inputs themselves travel with the message (when
  that is smaller than G's weights).

A generator query may also start with ``reference_count`` reference rows
(chosen by the same seed) before its ``count - reference_count`` samples of
G: MEKD mixes real public inputs into the transfer set that way, at the cost
of a few integers on the wire.

:func:`resolve_queries` turns a spec into the input tensor, on the server and
on a device alike, so both see bit-identical inputs on the same platform. A
generator query's latent codes come from :func:`query_latents` and its inputs
from :func:`generate_queries`, so a seed stands for the whole batch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from hetkd.distill.generative import Generator
from hetkd.settings import require, require_choice, require_types
from hetkd.training import module_device

__all__ = [
    "QUERY_SOURCES", "QuerySpec", "GeneratorSpec", "query_latents", "generate_queries", "reference_rows",
    "resolve_queries",
]

QUERY_SOURCES: tuple[str, ...] = ("reference", "generator", "inputs")


@dataclass(frozen=True)
class QuerySpec:
    """Which public inputs to answer on (see the module docstring); it travels in
    :class:`hetkd.protocol.EnsembleDistill` as its fields.

    ``count`` inputs in all; a ``generator`` query's first ``reference_count``
    of them are reference rows, the rest G's samples.
    """

    source: str
    seed: int
    count: int
    batch_size: int = 64
    train_mode: bool = False
    reference_count: int = 0

    def __post_init__(self) -> None:
        require_types(self)
        require_choice(self.source, "source", QUERY_SOURCES)
        require(self.count >= 1, "count", f"a query needs count >= 1, got {self.count}")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        require(0 <= self.reference_count < self.count, "reference_count",
                f"must be in [0, count = {self.count}), got {self.reference_count}")
        require(self.reference_count == 0 or self.source == "generator", "reference_count",
                f"only a 'generator' query mixes in reference rows, this one's source is {self.source!r}")

    @property
    def reference_row_count(self) -> int:
        """How many of the query's inputs are reference rows: all of a ``reference`` query's, the
        first ``reference_count`` of a ``generator`` query's, none of an ``inputs`` query's."""
        return self.count if self.source == "reference" else self.reference_count

    @property
    def source_sizes(self) -> tuple[int, ...]:
        """The sizes of the query's runs of inputs from one source: ``(reference_count,
        generated_count)`` for a mixed query, else ``(count,)``."""
        return (self.reference_count, self.generated_count) if self.reference_count else (self.count,)

    @property
    def generated_count(self) -> int:
        """How many of the query's inputs a generator draws (``count`` less the reference rows)."""
        return self.count - self.reference_count

    def generated_rows(self) -> torch.Tensor:
        """Which of the query's inputs are a generator's samples, ``(count,)`` booleans: those after
        a ``generator`` query's reference rows, all of an ``inputs`` query's (G's samples, shipped
        when smaller than G), none of a ``reference`` query's."""
        return torch.arange(self.count) >= self.reference_row_count


@dataclass(frozen=True, kw_only=True)
class GeneratorSpec:
    """What a device needs to rebuild the server's generator before loading its weights:
    G's first feature-map ``width``, its output range ``(low, high)``, and the
    ``version`` of the weights (bumped whenever they change)."""

    version: int
    width: int
    low: float
    high: float

    def __post_init__(self) -> None:
        require_types(self)
        require(self.version >= 0, "version", f"must be >= 0, got {self.version}")
        require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        require(self.low < self.high, "high", f"must exceed low ({self.low}), got {self.high}")


def query_latents(seed: int, count: int, latent_dim: int) -> torch.Tensor:
    """The ``count`` latent codes ``z ~ N(0, I)`` a query with ``seed`` stands for."""
    return torch.randn(count, latent_dim, generator=torch.Generator().manual_seed(int(seed)))


def generate_queries(
    generator: Generator, seed: int, count: int, batch_size: int, train_mode: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, G(z))`` for ``count`` latent codes ``z ~ N(0, I)`` drawn from ``seed``: the same on every machine.

    A server and a device that hold the same G weights call this with the same
    arguments and get the same inputs, so the server can send a seed instead
    of the inputs. ``train_mode`` runs G's BatchNorm on batch statistics (as
    G sees its samples during deprivatization), in chunks of ``batch_size``;
    otherwise on its running statistics (a frozen G). G itself is left as it
    was (a copy runs in train mode, so running statistics do not move). G may
    be on any device: ``z`` is drawn on the CPU and moved to G, and both come
    back on the CPU.
    """
    if count < 1 or batch_size < 2:
        raise ValueError(f"need count >= 1 and batch_size >= 2, got count={count}, batch_size={batch_size}")
    if train_mode and count % batch_size:
        raise ValueError(f"in train mode count ({count}) must be a multiple of batch_size ({batch_size})")
    z = query_latents(seed, count, generator.latent_dim)
    device = module_device(generator)
    model = copy.deepcopy(generator).train() if train_mode else generator
    was_training = generator.training
    if not train_mode:
        generator.eval()
    try:
        with torch.no_grad():
            return z, torch.cat([model(part.to(device)) for part in z.split(batch_size)]).cpu()
    finally:
        generator.train(was_training)


def reference_rows(spec: QuerySpec, num_reference: int) -> torch.Tensor:
    """The reference-set row indices a query names, for a reference set of ``num_reference`` rows:
    the first ``count`` (a ``reference`` query) or ``reference_count`` (a generator query that mixes
    reference rows in) of a permutation seeded by the query's seed."""
    count = spec.reference_row_count
    if count == 0:
        raise ValueError(f"this {spec.source!r} query names no reference rows")
    if count > num_reference:
        raise ValueError(f"query asks for {count} reference rows, the reference set has {num_reference}")
    return torch.randperm(num_reference, generator=torch.Generator().manual_seed(spec.seed))[:count]


def resolve_queries(
    spec: QuerySpec,
    *,
    reference_inputs: torch.Tensor | None = None,
    generator: Generator | None = None,
    inputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The query inputs ``spec`` names, from what the caller holds."""
    if spec.source == "reference":
        if reference_inputs is None or len(reference_inputs) == 0:
            raise ValueError("a 'reference' query needs the reference set, and none is held here")
        return reference_inputs[reference_rows(spec, len(reference_inputs))]
    if spec.source == "generator":
        if generator is None:
            raise ValueError("a 'generator' query needs the generator's weights, and none are held here")
        generated = generate_queries(generator, spec.seed, spec.generated_count, spec.batch_size, spec.train_mode)[1]
        if spec.reference_count == 0:
            return generated
        if reference_inputs is None or len(reference_inputs) == 0:
            raise ValueError(f"this query mixes in {spec.reference_count} reference rows and no reference set is "
                             "held here")
        return torch.cat([reference_inputs[reference_rows(spec, len(reference_inputs))].to(generated.dtype),
                          generated])
    if inputs is None or len(inputs) != spec.count:
        got = None if inputs is None else len(inputs)
        raise ValueError(f"an 'inputs' query must carry {spec.count} inputs, got {got}")
    return inputs
