"""The model zoo and the per-device architecture assignment."""

from hetkd.models.zoo import (
    ARCHITECTURES,
    MODEL_GROUPS,
    ModelError,
    assign_architectures,
    available_architectures,
    build_model,
    check_architecture,
    count_parameters,
    largest_architecture,
    state_bytes,
)

__all__ = [
    "ARCHITECTURES",
    "MODEL_GROUPS",
    "ModelError",
    "assign_architectures",
    "available_architectures",
    "build_model",
    "check_architecture",
    "count_parameters",
    "largest_architecture",
    "state_bytes",
]
