"""The model zoo and the per-device architecture assignment.
"""

from hetkd._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hetkd.models.assignment": (
        "ASSIGNMENTS", "ModelsConfig", "assign_architectures",
    ),
    "hetkd.models.zoo": (
        "ARCHITECTURES", "MODEL_GROUPS", "ModelError", "available_architectures", "build_model",
        "check_architecture", "count_parameters", "largest_architecture", "state_bytes",
    ),
})
