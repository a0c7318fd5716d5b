"""From a config to a strategy: the names ``strategy.name`` accepts.

Strategies take their settings objects (so they plug into any ``ServerApp``,
where a constructor with no arguments runs with the same settings); this
registry is the one place that hands a :class:`~hetkd.config.HetkdConfig`'s
groups to them, with what the run's data forces (class count, reference set,
public inputs, global test set).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from flwr.app import ArrayRecord

from hetkd.config import ConfigError, HetkdConfig
from hetkd.data import Federation
from hetkd.distill.emulation import MEKDSettings
from hetkd.models import build_model
from hetkd.settings import did_you_mean
from hetkd.strategies import MEKD, DeviceStrategy, FedAvg, FedDF, FedMD, LocalOnly, SDDist
from hetkd.training import seeded

__all__ = [
    "CENTRAL",
    "ENSEMBLE_STRATEGIES",
    "STRATEGIES",
    "MEKD_SETTINGS",
    "STRATEGY_SETTINGS",
    "StrategySpec",
    "build_strategy",
    "check_strategy",
    "initial_arrays",
    "unread_settings",
]

#: the pooled-data upper bound: not a federated strategy, run in-process only
CENTRAL = "central"
#: strategies with a server-side global student (``strategy.ensemble.*``)
ENSEMBLE_STRATEGIES = ("feddf", "mekd")
#: MEKD's settings, one section per group or key: FedDF's student reads ``mekd.distill`` only
MEKD_SETTINGS = tuple(f"mekd.{f.name}" for f in fields(MEKDSettings))
#: config sections that only some strategies read (each spec names its own in ``settings``)
STRATEGY_SETTINGS = ("strategy.kd", "strategy.sd_dist", "strategy.ensemble", *MEKD_SETTINGS)


def _common(cfg: HetkdConfig, device_config: str) -> dict[str, Any]:
    """What every strategy takes from the run: who takes part, the seed, the devices' config."""
    s = cfg.strategy
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_devices": s.min_devices,
        "evaluate_every": s.evaluate_every,
        "wait_for_devices": s.wait_for_devices,
        "num_devices": cfg.simulation.num_devices,
        "seed": cfg.seed,
        "device_config": device_config,
    }


def _reference_labels(federation: Federation) -> torch.Tensor | None:
    """The reference set's labels when it is labelled (strategies score devices with them)."""
    return federation.reference.base.targets(federation.reference.indices) if federation.reference_labelled else None


def _exchange(cfg: HetkdConfig, federation: Federation, device_config: str) -> dict[str, Any]:
    return {
        **_common(cfg, device_config),
        "num_classes": federation.num_classes,
        "num_reference": len(federation.reference),
        "reference_labels": _reference_labels(federation),
        "exchange": cfg.strategy.kd,
    }


def _ensemble(cfg: HetkdConfig, federation: Federation, device_config: str) -> dict[str, Any]:
    """The arguments FedDF and MEKD share: the public and test sets, the ensemble settings."""
    test = federation.global_test
    return {
        **_common(cfg, device_config),
        "num_classes": federation.num_classes,
        "public_inputs": federation.reference.base.inputs(federation.reference.indices),
        "global_test": (test.base.inputs(test.indices), test.base.targets(test.indices)),
        "ensemble": cfg.strategy.ensemble,
    }


def _check_ensemble(cfg: HetkdConfig) -> None:
    if cfg.reference.size < 2:
        raise ConfigError("reference.size", f"strategy '{cfg.strategy.name}' needs a public set of at least "
                          f"2 samples, got {cfg.reference.size}")
    e = cfg.strategy.ensemble
    before = e.warmup_rounds + (e.deprivatize_rounds if cfg.strategy.name == "mekd" else 0)
    if cfg.simulation.num_rounds <= before:
        raise ConfigError("simulation.num_rounds", f"strategy '{cfg.strategy.name}' distils only after "
                          f"{before} round(s) of warm-up{' and deprivatization' if before > e.warmup_rounds else ''} "
                          f"(strategy.ensemble.*); got {cfg.simulation.num_rounds} rounds")
    if not e.student:
        raise ConfigError("strategy.ensemble.student", f"strategy '{cfg.strategy.name}' needs a global student "
                          "architecture (a zoo name or package.module:factory)")
    problem = cfg.mekd.reference_queries_problem(e.num_queries, cfg.reference.size)
    if cfg.strategy.name == "mekd" and problem:
        raise ConfigError("mekd.reference_queries", f"{problem} (reference.size)")


def _check_reference(cfg: HetkdConfig) -> None:
    if cfg.reference.size < 1:
        raise ConfigError("reference.size", f"strategy '{cfg.strategy.name}' exchanges predictions on a reference set; "
                          f"it must hold at least 1 sample, got {cfg.reference.size}")


def _check_homogeneous(cfg: HetkdConfig) -> None:
    archs = cfg.models.assign(cfg.simulation.num_devices)
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
    #: the sections of :data:`STRATEGY_SETTINGS` the strategy reads; the others cannot change its runs
    settings: tuple[str, ...] = ()


STRATEGIES: dict[str, StrategySpec] = {
    "local": StrategySpec(
        lambda cfg, fed, text: LocalOnly(**_common(cfg, text)),
        "devices train alone (lower bound)",
    ),
    "fedavg": StrategySpec(
        lambda cfg, fed, text: FedAvg(**_common(cfg, text)),
        "weight averaging, homogeneous models only (reference point)",
        _check_homogeneous,
        global_model=True,
    ),
    "fedmd": StrategySpec(
        lambda cfg, fed, text: FedMD(**_exchange(cfg, fed, text)),
        "FedMD-style: everyone distils from the plain average of all devices' reference predictions",
        _check_reference,
        settings=("strategy.kd",),
    ),
    "sd-dist": StrategySpec(
        lambda cfg, fed, text: SDDist(search=cfg.strategy.sd_dist, **_exchange(cfg, fed, text)),
        "SD-Dist: each device distils from its most similar, best-scoring neighbours",
        _check_reference,
        settings=("strategy.kd", "strategy.sd_dist"),
    ),
    "feddf": StrategySpec(
        lambda cfg, fed, text: FedDF(distill=cfg.mekd.distill, reference_labels=_reference_labels(fed),
                                      **_ensemble(cfg, fed, text)),
        "FedDF-style: the server's student and the devices distil the devices' ensemble on reference rows",
        _check_ensemble,
        settings=("strategy.ensemble", "mekd.distill"),  # the server's student steps use mekd.distill.*
    ),
    "mekd": StrategySpec(
        lambda cfg, fed, text: MEKD(mekd=cfg.mekd, input_shape=fed.input_shape, **_ensemble(cfg, fed, text)),
        "MEKD: a generator emulates the devices' inverse mapping; student and devices distil through it",
        _check_ensemble,
        settings=("strategy.ensemble", *MEKD_SETTINGS),
    ),
}


def unread_settings(name: str) -> tuple[str, ...]:
    """The sections of :data:`STRATEGY_SETTINGS` strategy ``name`` never reads.

    A run of ``name`` does not depend on them, so ``hetkd compare --resume``
    reuses it when only they changed. ``central`` reads the student
    architecture (``strategy.ensemble.student``) and nothing else of them.
    """
    if name == CENTRAL:
        read: tuple[str, ...] = ("strategy.ensemble",)
    elif name in STRATEGIES:
        read = STRATEGIES[name].settings
    else:
        raise ConfigError("strategy.name", f"unknown strategy {name!r}; valid choices: {', '.join([*STRATEGIES, CENTRAL])}")
    return tuple(section for section in STRATEGY_SETTINGS if section not in read)


def check_strategy(cfg: HetkdConfig) -> None:
    """Reject an unknown ``strategy.name`` or a config the strategy cannot run."""
    name = cfg.strategy.name
    if name == CENTRAL:
        return
    if name not in STRATEGIES:
        choices = [*STRATEGIES, CENTRAL]
        raise ConfigError(
            "strategy.name", f"unknown strategy {name!r}{did_you_mean(name, choices)}; valid choices: {', '.join(choices)}"
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
    arch = cfg.models.assign(1)[0]
    with seeded(cfg.seed, "global-init"):
        model = build_model(arch, federation.input_shape, federation.num_classes)
    return ArrayRecord(model.state_dict())
