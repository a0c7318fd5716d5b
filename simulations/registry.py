"""From a config to a strategy: the names ``strategy.name`` accepts.

Strategies take explicit keyword arguments (so they plug into any
``ServerApp``); this registry is the one place that maps a
:class:`~hetkd.config.HetkdConfig` onto those arguments.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from flwr.app import ArrayRecord

from hetkd.config import ConfigError, HetkdConfig
from hetkd.data import Federation
from hetkd.models import assign_architectures, build_model
from hetkd.strategies import DeviceStrategy, FedAvg, FedMD, LocalOnly, SDDist
from hetkd.training import seeded

__all__ = ["CENTRAL", "STRATEGIES", "StrategySpec", "build_strategy", "check_strategy", "initial_arrays"]

#: the pooled-data upper bound: not a federated strategy, run in-process only
CENTRAL = "central"


def _common(cfg: HetkdConfig, device_config: str) -> dict[str, object]:
    s = cfg.strategy
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_devices": s.min_devices,
        "num_devices": cfg.simulation.num_devices,
        "evaluate_every": s.evaluate_every,
        "seed": cfg.seed,
        "device_config": device_config,
        "wait_for_devices": cfg.simulation.wait_for_devices,
    }


def _exchange(cfg: HetkdConfig, federation: Federation, device_config: str) -> dict[str, object]:
    kd = cfg.strategy.kd
    labels = federation.reference.base.targets(federation.reference.indices) if federation.reference_labelled else None
    return {
        **_common(cfg, device_config),
        "num_reference": len(federation.reference),
        "num_classes": federation.num_classes,
        "reference_labels": labels,
        "rho": kd.rho,
        "temperature": kd.temperature,
        "reference_batch_size": kd.reference_batch_size,
        "precision": kd.precision,
        "warmup_rounds": kd.warmup_rounds,
        "mix": kd.mix,
        "t_squared": kd.t_squared,
        "min_steps": kd.min_steps,
    }


def _sd_dist(cfg: HetkdConfig, federation: Federation, device_config: str) -> SDDist:
    sd = cfg.strategy.sd_dist
    return SDDist(
        num_neighbours=sd.num_neighbours,
        num_candidates=sd.num_candidates,
        neighbour_rule=sd.neighbour_rule,
        similarity=sd.similarity,
        weighting=sd.weighting,
        neighbour_selection=sd.neighbour_selection,
        **_exchange(cfg, federation, device_config),  # type: ignore[arg-type]
    )


def _check_reference(cfg: HetkdConfig) -> None:
    if cfg.reference.size < 1:
        raise ConfigError("reference.size", f"strategy '{cfg.strategy.name}' exchanges predictions on a reference set; "
                          f"it must hold at least 1 sample, got {cfg.reference.size}")


def _check_homogeneous(cfg: HetkdConfig) -> None:
    archs = assign_architectures(
        cfg.models.assignment, cfg.models.architectures, cfg.simulation.num_devices, cfg.models.tiers
    )
    if len(set(archs)) > 1:
        raise ConfigError(
            "models.assignment",
            f"strategy 'fedavg' averages weights and needs one architecture on every device, but "
            f"assignment={cfg.models.assignment!r} gives {sorted(set(archs))}; set "
            "models.assignment=homogeneous (or models.architectures=[<one name>])",
        )


@dataclass(frozen=True)
class StrategySpec:
    """How to build one named strategy from a config."""

    build: Callable[[HetkdConfig, Federation, str], DeviceStrategy]
    description: str
    check: Callable[[HetkdConfig], None] | None = None
    #: the server holds a global model of the (single) architecture (FedAvg)
    global_model: bool = False


STRATEGIES: dict[str, StrategySpec] = {
    "local": StrategySpec(
        lambda cfg, fed, text: LocalOnly(**_common(cfg, text)),  # type: ignore[arg-type]
        "devices train alone (lower bound)",
    ),
    "fedavg": StrategySpec(
        lambda cfg, fed, text: FedAvg(**_common(cfg, text)),
        "weight averaging, homogeneous models only (reference point)",
        _check_homogeneous,
        global_model=True,
    ),
    "fedmd": StrategySpec(
        lambda cfg, fed, text: FedMD(**_exchange(cfg, fed, text)),  # type: ignore[arg-type]
        "FedMD-style: everyone distils from the plain average of all devices' reference predictions",
        _check_reference,
    ),
    "sd-dist": StrategySpec(
        _sd_dist,
        "SD-Dist: each device distils from its most similar, best-scoring neighbours",
        _check_reference,
    ),
}


def check_strategy(cfg: HetkdConfig) -> None:
    """Reject an unknown ``strategy.name`` or a config the strategy cannot run."""
    name = cfg.strategy.name
    if name == CENTRAL:
        return
    if name not in STRATEGIES:
        choices = [*STRATEGIES, CENTRAL]
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(
            "strategy.name", f"unknown strategy {name!r}{hint}; valid choices: {', '.join(choices)}"
        )
    spec = STRATEGIES[name]
    if spec.check is not None:
        spec.check(cfg)


def build_strategy(cfg: HetkdConfig, federation: Federation, device_config: str) -> DeviceStrategy:
    """The strategy ``cfg.strategy.name`` configured from ``cfg``."""
    if cfg.strategy.name == CENTRAL:
        raise ConfigError("strategy.name", "'central' trains one model per architecture on pooled data, in this "
                          "process; run it with `hetkd run` or `hetkd compare`, not on a Flower grid")
    check_strategy(cfg)
    return STRATEGIES[cfg.strategy.name].build(cfg, federation, device_config)


def initial_arrays(cfg: HetkdConfig, federation: Federation) -> ArrayRecord:
    """Initial global weights for weight-averaging strategies; empty otherwise."""
    if not STRATEGIES[cfg.strategy.name].global_model:
        return ArrayRecord()
    arch = assign_architectures(cfg.models.assignment, cfg.models.architectures, 1, cfg.models.tiers)[0]
    with seeded(cfg.seed, "global-init"):
        model = build_model(arch, federation.input_shape, federation.num_classes)
    return ArrayRecord(model.state_dict())
