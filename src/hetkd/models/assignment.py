"""Which architecture each device holds: the ``models`` settings and the assignment policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hetkd.models.zoo import MODEL_GROUPS, ModelError, check_architecture
from hetkd.settings import require, require_choice, require_types

__all__ = ["ASSIGNMENTS", "ModelsConfig", "assign_architectures"]

ASSIGNMENTS = ("homogeneous", "round_robin", "per_device", "tiers")


@dataclass(frozen=True, kw_only=True)
class ModelsConfig:
    """Which architecture each device holds.

    ``assignment``: ``homogeneous`` (``architectures[0]`` everywhere),
    ``round_robin`` (device i gets ``architectures[i % len]``), ``per_device``
    (``architectures`` lists one per device) or ``tiers`` (``tiers`` gives the
    fraction of devices per architecture, in order). An architecture is a name
    from :func:`hetkd.models.available_architectures`, a group of
    :data:`hetkd.models.MODEL_GROUPS`, or a dotted path ``package.module:factory``
    to ``factory(input_shape, num_classes)``.

    ``private_architecture``: the architecture of every device's private answer
    model (``strategy.kd.answer_model`` / ``strategy.ensemble.answer_model`` =
    ``private``), the one model that trains on the device's private data alone;
    empty: a copy of the device's own model, forked when it first distils. Under
    differential privacy a small model learns far more per unit of ε than a deep
    one (DP-SGD's noise grows with the parameter count; Tramèr & Boneh, ICLR 2021):
    ``linear`` there lets the devices' own models, of any architecture, learn from
    answers worth having.
    """

    assignment: str = "round_robin"
    architectures: list[str] = field(default_factory=lambda: ["cnn_s", "cnn_m", "resnet8", "mlp_s", "mlp_m"])
    tiers: list[float] = field(default_factory=list)
    private_architecture: str = ""

    def __post_init__(self) -> None:
        require_types(self)
        require_choice(self.assignment, "assignment", ASSIGNMENTS)
        require(len(self.architectures) > 0, "architectures", "must list at least one architecture")
        for i, arch in enumerate(self.architectures):
            check_architecture(arch, f"architectures[{i}]")
        if self.private_architecture:
            require(self.private_architecture not in MODEL_GROUPS, "private_architecture",
                    f"must name one architecture, not the group {self.private_architecture!r}")
            check_architecture(self.private_architecture, "private_architecture")
        if self.assignment == "tiers":
            require(len(self.tiers) == len(self.architectures), "tiers",
                    f"needs one fraction per architecture ({len(self.architectures)}), got {len(self.tiers)}")
            require(all(t >= 0 for t in self.tiers) and abs(sum(self.tiers) - 1.0) < 1e-6, "tiers",
                    f"fractions must be >= 0 and sum to 1, got {list(self.tiers)}")

    def assign(self, num_devices: int) -> list[str]:
        """The architecture of each of ``num_devices`` devices."""
        return assign_architectures(self.assignment, self.architectures, num_devices, self.tiers)


def assign_architectures(
    assignment: str, architectures: Sequence[str], num_devices: int, tiers: Sequence[float] = ()
) -> list[str]:
    """Which architecture each device holds, by the ``models.assignment`` policy.

    A single entry naming a group of :data:`MODEL_GROUPS` expands to its list.
    """
    archs = list(architectures)
    if len(archs) == 1 and archs[0] in MODEL_GROUPS:
        archs = MODEL_GROUPS[archs[0]]
    if not archs:
        raise ModelError("models.architectures must list at least one architecture")
    if assignment == "homogeneous":
        return [archs[0]] * num_devices
    if assignment == "round_robin":
        return [archs[i % len(archs)] for i in range(num_devices)]
    if assignment == "per_device":
        if len(archs) != num_devices:
            raise ModelError(
                f"models.assignment=per_device needs {num_devices} architectures, got {len(archs)}"
            )
        return archs
    if assignment == "tiers":
        if len(tiers) != len(archs):
            raise ModelError(f"models.tiers needs {len(archs)} fractions, got {len(tiers)}")
        out: list[str] = []
        bounds = torch.tensor(list(tiers), dtype=torch.float64).cumsum(0) * num_devices
        for i in range(num_devices):
            tier = int((bounds <= i + 1e-9).sum().item())
            out.append(archs[min(tier, len(archs) - 1)])
        return out
    raise ModelError(f"unknown models.assignment {assignment!r}; valid choices: {', '.join(ASSIGNMENTS)}")
