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

__all__ = ["QUERY_SOURCES", "QuerySpec", "query_latents", "generate_queries", "resolve_queries"]

QUERY_SOURCES: tuple[str, ...] = ("reference", "generator", "inputs")


@dataclass(frozen=True)
class QuerySpec:
    """Which public inputs to answer on (see the module docstring)."""

    source: str
    seed: int
    count: int
    batch_size: int = 64
    train_mode: bool = False

    def __post_init__(self) -> None:
        if self.source not in QUERY_SOURCES:
            raise ValueError(f"unknown query source {self.source!r}; valid choices: {', '.join(QUERY_SOURCES)}")
        if self.count < 1:
            raise ValueError(f"a query needs count >= 1, got {self.count}")
        if self.batch_size < 2:
            raise ValueError(f"query batch_size must be >= 2, got {self.batch_size}")

    def to_config(self, prefix: str = "query") -> dict[str, int | str | bool]:
        """Flat config entries (``<prefix>-source``, ...) for a Flower ConfigRecord."""
        return {
            f"{prefix}-source": self.source,
            f"{prefix}-seed": int(self.seed),
            f"{prefix}-count": int(self.count),
            f"{prefix}-batch-size": int(self.batch_size),
            f"{prefix}-train-mode": bool(self.train_mode),
        }

    @classmethod
    def from_config(cls, config: dict, prefix: str = "query") -> QuerySpec | None:
        """The spec stored by :meth:`to_config`, or ``None`` when there is none."""
        if f"{prefix}-source" not in config:
            return None
        try:
            return cls(
                source=str(config[f"{prefix}-source"]),
                seed=int(config[f"{prefix}-seed"]),
                count=int(config[f"{prefix}-count"]),
                batch_size=int(config.get(f"{prefix}-batch-size", 64)),
                train_mode=bool(config.get(f"{prefix}-train-mode", False)),
            )
        except KeyError as err:
            raise ValueError(f"query config lacks {err.args[0]!r}") from None


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
    was (a copy runs in train mode, so running statistics do not move).
    """
    if count < 1 or batch_size < 2:
        raise ValueError(f"need count >= 1 and batch_size >= 2, got count={count}, batch_size={batch_size}")
    if train_mode and count % batch_size:
        raise ValueError(f"in train mode count ({count}) must be a multiple of batch_size ({batch_size})")
    z = query_latents(seed, count, generator.latent_dim)
    model = copy.deepcopy(generator).train() if train_mode else generator
    was_training = generator.training
    if not train_mode:
        generator.eval()
    try:
        with torch.no_grad():
            return z, torch.cat([model(part) for part in z.split(batch_size)])
    finally:
        generator.train(was_training)


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
        if spec.count > len(reference_inputs):
            raise ValueError(f"query asks for {spec.count} reference rows, the reference set has {len(reference_inputs)}")
        order = torch.randperm(len(reference_inputs), generator=torch.Generator().manual_seed(spec.seed))
        return reference_inputs[order[: spec.count]]
    if spec.source == "generator":
        if generator is None:
            raise ValueError("a 'generator' query needs the generator's weights, and none are held here")
        return generate_queries(generator, spec.seed, spec.count, spec.batch_size, spec.train_mode)[1]
    if inputs is None or len(inputs) != spec.count:
        got = None if inputs is None else len(inputs)
        raise ValueError(f"an 'inputs' query must carry {spec.count} inputs, got {got}")
    return inputs
