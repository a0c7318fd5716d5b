"""The run configuration: every part's settings, composed; three ways in.

A run is described by :class:`HetkdConfig`. Its groups are the settings
classes of the parts that use them — each written, with its defaults and its
checks, next to its code — composed here:

==================  ==============================================================
``dataset``         :class:`hetkd.data.DatasetConfig`
``reference``       :class:`hetkd.data.ReferenceConfig`
``partition``       :class:`hetkd.data.PartitionConfig`
``models``          :class:`hetkd.models.ModelsConfig`
``strategy``        :class:`StrategyConfig`: ``name`` plus :class:`hetkd.sampling.Sampling`;
                    ``kd`` :class:`hetkd.distill.exchange.ReferenceDistillSettings`,
                    ``sd_dist`` :class:`hetkd.distill.similarity.NeighbourSearch`,
                    ``ensemble`` :class:`hetkd.distill.ensemble.EnsembleSettings`
``training``        :class:`hetkd.training.TrainingConfig`
``simulation``      :class:`hetkd.runtime.SimulationConfig`
``output``          :class:`hetkd.results.OutputConfig`
``mekd``            :class:`hetkd.distill.emulation.MEKDSettings` (``response``, ``gan``, ``distill``)
``adversary``       :class:`hetkd.adversary.AdversarySettings` (poisoning devices, for measurements)
``privacy``         :class:`hetkd.privacy.PrivacySettings` (differentially private devices)
==================  ==============================================================

so a strategy built with no arguments runs with exactly the settings
``hetkd run strategy=NAME`` resolves. Values arrive, in increasing order of
precedence, from those defaults, an optional YAML file (``config=PATH``, which
may compose fragments listed under ``defaults:``) and dotted overrides (a
command-line dotlist ``partition.alpha=0.1`` or the Flower ``run_config`` of
``flwr run --run-config``). A command with settings of its own (``hetkd b2kd``,
``hetkd bench``) extends the schema with its group (``schema=``).

Flower's ``run_config`` holds only scalars, so lists travel as comma-separated
strings and ``None`` as the empty string; :func:`flower_run_config` encodes a
config that way (it is what ``[tool.flwr.app.config]`` in ``pyproject.toml``
holds) and :func:`resolve_config` decodes it. Two keys follow Flower's own
conventions: ``strategy`` names ``strategy.name`` and ``num-server-rounds``
names ``simulation.num_rounds``. Hyphens in keys are read as underscores.

Every error names the offending key (:class:`ConfigError`) and, where there is
a fixed set, the valid choices, so a typo stops a run before any device starts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from hetkd.adversary import AdversarySettings
from hetkd.data import DatasetConfig, PartitionConfig, ReferenceConfig
from hetkd.distill.emulation import MEKDSettings
from hetkd.distill.ensemble import EnsembleSettings
from hetkd.distill.exchange import ReferenceDistillSettings
from hetkd.distill.similarity import NeighbourSearch
from hetkd.models import ModelError, ModelsConfig
from hetkd.privacy import PrivacySettings
from hetkd.results import OutputConfig
from hetkd.runtime import SimulationConfig
from hetkd.sampling import Sampling
from hetkd.settings import SettingsError, build, did_you_mean, flatten
from hetkd.training import TrainingConfig

__all__ = [
    "ConfigError",
    "StrategyConfig",
    "SimulationConfig",
    "HetkdConfig",
    "TrainingConfig",
    "FLOWER_ALIASES",
    "CONFIG_FILE_KEY",
    "RENAMED_KEYS",
    "resolve_config",
    "override",
    "load_yaml",
    "apply_overrides",
    "validate_config",
    "flower_run_config",
    "schema_keys",
    "to_yaml",
    "from_yaml",
    "to_container",
]

C = TypeVar("C", bound="HetkdConfig")


class ConfigError(SettingsError):
    """A configuration value or key is invalid; the message names the key."""

    kind = "config key"


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True, kw_only=True)
class StrategyConfig(Sampling):
    """Which server-side algorithm runs (``name``), who takes part (the fields of
    :class:`~hetkd.sampling.Sampling`), and the algorithms' settings: ``kd`` and
    ``sd_dist`` for the logit-exchange strategies, ``ensemble`` for FedDF and MEKD."""

    name: str = "sd-dist"
    kd: ReferenceDistillSettings = field(default_factory=ReferenceDistillSettings)
    sd_dist: NeighbourSearch = field(default_factory=NeighbourSearch)
    ensemble: EnsembleSettings = field(default_factory=EnsembleSettings)


@dataclass(frozen=True, kw_only=True)
class HetkdConfig:
    """A whole run. ``seed`` fixes partitions, initial weights and sampling."""

    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    mekd: MEKDSettings = field(default_factory=MEKDSettings)
    adversary: AdversarySettings = field(default_factory=AdversarySettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)


#: Flower-style run-config keys and the schema keys they stand for.
FLOWER_ALIASES: dict[str, str] = {"strategy": "strategy.name", "num-server-rounds": "simulation.num_rounds"}
#: The run-config key that names a YAML file to load under the overrides.
CONFIG_FILE_KEY = "config"
#: Keys of earlier releases and where those settings live now.
RENAMED_KEYS: dict[str, str] = {
    "simulation.wait_for_devices": "strategy.wait_for_devices",
    **{f"mekd.gan_{k}": f"mekd.gan.{k}" for k in ("steps", "batch_size", "lr_generator", "lr_discriminator",
                                                   "beta1", "beta2")},
    **{f"mekd.{k}": f"mekd.gan.{k}" for k in ("w_info", "generator_width")},
    **{f"mekd.distill_{k}": f"mekd.distill.{k}" for k in ("steps", "batch_size", "lr", "momentum", "weight_decay")},
    "mekd.lr_milestones": "mekd.distill.milestones",
    "mekd.lr_gamma": "mekd.distill.gamma",
    **{f"mekd.{k}": f"mekd.distill.{k}" for k in ("temperature", "generator_temperature", "w_f", "w_kl",
                                                   "distance", "hard_margin")},
}


# --------------------------------------------------------------------------- keys


@functools.cache
def schema_keys(schema: type[HetkdConfig] = HetkdConfig) -> dict[str, Any]:
    """Flat ``{dotted.key: default}`` of a schema (do not modify: it is cached)."""
    return flatten(schema(), keep_none=True)


def _unknown_key_error(key: str, schema: type[HetkdConfig]) -> ConfigError:
    if key in RENAMED_KEYS:
        return ConfigError(key, f"renamed to '{RENAMED_KEYS[key]}'")
    keys = schema_keys(schema)
    group, _, name = key.rpartition(".")
    siblings = sorted({k[len(group) + 1:].split(".")[0] for k in keys if k.startswith(f"{group}.")} if group
                      else {k.split(".")[0] for k in keys})
    if not siblings:  # the group itself is unknown
        groups = sorted({k.split(".")[0] for k in keys})
        return ConfigError(key, f"unknown key{did_you_mean(key.split('.')[0], groups)}; valid groups: "
                                f"{', '.join(groups)}")
    close = did_you_mean(name, siblings)
    hint = close.replace("'", f"'{group}.", 1) if close and group else close
    where = f"'{group}'" if group else "the top level"
    return ConfigError(key, f"unknown key{hint}; valid keys in {where}: {', '.join(siblings)}")


def _canonical_key(key: str) -> str:
    key = key.strip()
    return FLOWER_ALIASES.get(key, key.replace("-", "_"))


# --------------------------------------------------------------------------- loading


def _merge(base: DictConfig, update: Any, source: str, schema: type[HetkdConfig]) -> DictConfig:
    """Merge ``update`` into ``base``, turning omegaconf errors into ConfigErrors."""
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except ConfigKeyError as err:
        raise _unknown_key_error(str(err.full_key), schema) from None
    except ValidationError as err:
        expected = schema_keys(schema).get(str(err.full_key))
        kind = type(expected).__name__ if expected is not None else "a valid value"
        raise ConfigError(str(err.full_key), f"invalid value {err.value!r} in {source}; expected {kind}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(getattr(err, "full_key", "?")), f"{err} (in {source})") from None


def _find_fragment(name: str, start: Path) -> Path:
    """Find ``configs/<name>.yaml`` by walking up from ``start``."""
    for directory in [start, *start.parents]:
        for candidate in (directory / f"{name}.yaml", directory / "configs" / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError("defaults", f"fragment '{name}' not found above {start}")


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    """Load a YAML config file, composing the fragments its ``defaults:`` lists.

    Fragments are named relative to the ``configs/`` folder (``dataset/mnist1d``)
    and merged in order before the file's own keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(CONFIG_FILE_KEY, f"file '{path}' does not exist")
    path = path.resolve()
    if path in _seen:
        raise ConfigError("defaults", f"'{path}' includes itself")
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise ConfigError(CONFIG_FILE_KEY, f"'{path}' must hold a mapping, not a list")
    composed: DictConfig = OmegaConf.create({})
    defaults = raw.pop("defaults", None) or []
    if not isinstance(defaults, (list, ListConfig)):
        raise ConfigError("defaults", f"in '{path}' must be a list of fragment names")
    for name in defaults:
        fragment = load_yaml(_find_fragment(str(name), path.parent), (*_seen, path))
        composed = OmegaConf.merge(composed, fragment)  # type: ignore[assignment]
    return OmegaConf.merge(composed, raw)  # type: ignore[return-value]


def _decode_value(key: str, value: Any, schema: type[HetkdConfig]) -> Any:
    """Decode a Flower run-config scalar into the schema's type for ``key``."""
    default = schema_keys(schema).get(key)
    if isinstance(default, list) and isinstance(value, str):
        items = [item.strip().strip("'\"") for item in value.strip().strip("[]").split(",") if item.strip()]
        if default and isinstance(default[0], float) or key.endswith("tiers"):
            try:
                return [float(item) for item in items]
            except ValueError:
                raise ConfigError(key, f"expected comma-separated numbers, got {value!r}") from None
        return items
    return value


def _encode_value(value: Any) -> Any:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def _reconcile_aliases(run_config: Mapping[str, Any], schema: type[HetkdConfig]) -> dict[str, Any]:
    """Keep one of a Flower alias and the key it stands for when a run config holds both.

    The app's run config carries both ``strategy`` and ``strategy.name`` (on
    ``flwr run``'s command line ``strategy='x'`` cannot sit beside
    ``strategy.kd.rho=...``: TOML would need ``strategy`` to be a string and a
    table). A full run config holds both at their defaults plus what the user
    changed: the one that differs from the schema default wins; two different
    non-default values are an error naming both keys.
    """
    out = dict(run_config)
    for alias, key in FLOWER_ALIASES.items():
        if alias not in out or key not in out:
            continue
        default = _encode_value(schema_keys(schema)[key])
        a, b = out[alias], out.pop(key)
        if a == b or b == default:
            continue
        if a != default:
            raise ConfigError(key, f"given twice with different values: '{alias}'={a!r} and '{key}'={b!r}; set one")
        out[alias] = b
    return out


def apply_overrides(cfg: DictConfig, overrides: Mapping[str, Any] | Sequence[str],
                    schema: type[HetkdConfig] = HetkdConfig) -> DictConfig:
    """Apply dotted overrides: a mapping (Flower run_config) or ``key=value`` strings."""
    if isinstance(overrides, Mapping):
        parsed = [(_canonical_key(k), v) for k, v in _reconcile_aliases(overrides, schema).items()]
    else:
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "an override must look like key=value")
            key, _, text = item.partition("=")
            try:
                value = OmegaConf.from_dotlist([f"_={text}"])["_"]
            except OmegaConfBaseException:
                value = text
            parsed.append((_canonical_key(key), OmegaConf.to_container(value) if isinstance(value, ListConfig)
                           else value))
    keys = schema_keys(schema)
    for key, value in parsed:
        if key == CONFIG_FILE_KEY:
            continue
        if key not in keys:
            raise _unknown_key_error(key, schema)
        update = OmegaConf.create({})
        value = _decode_value(key, value, schema)
        OmegaConf.update(update, key, value, force_add=True)
        cfg = _merge(cfg, update, f"override {key}={value!r}", schema)
    return cfg


def _instantiate(node: DictConfig, schema: type[C]) -> C:
    """The validated config object a merged omegaconf tree describes."""
    try:
        cfg = build(schema, OmegaConf.to_container(node, resolve=True))  # type: ignore[arg-type]
    except ModelError:
        raise
    except SettingsError as err:
        raise ConfigError(err.key, err.message) from None
    validate_config(cfg)
    return cfg


def override(cfg: C, overrides: Mapping[str, Any] | Sequence[str]) -> C:
    """``cfg`` with dotted ``overrides`` applied, validated (its schema is its own class)."""
    schema = type(cfg)
    base = _merge(OmegaConf.structured(schema), OmegaConf.create(to_container(cfg)), "the config", schema)
    return _instantiate(apply_overrides(base, overrides, schema), schema)


def resolve_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    schema: type[C] = HetkdConfig,  # type: ignore[assignment]
) -> C:
    """Build and validate a run's config: defaults ← YAML file ← overrides.

    ``overrides`` may itself name the YAML file under the key ``config`` (that
    is how ``flwr run --run-config "config='x.yaml'"`` arrives); an explicit
    ``config_file`` wins. Empty strings mean "no file". ``schema`` is the root
    class (a command's extension of :class:`HetkdConfig`).
    """
    if not config_file:
        if isinstance(overrides, Mapping):
            config_file = overrides.get(CONFIG_FILE_KEY) or None
        else:
            named = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "config"]
            config_file = named[-1].strip("'\"") if named and named[-1] else None
    cfg = OmegaConf.structured(schema)
    if config_file:
        cfg = _merge(cfg, load_yaml(config_file), f"'{config_file}'", schema)
    return _instantiate(apply_overrides(cfg, overrides, schema), schema)


# --------------------------------------------------------------------------- validation


def validate_config(cfg: HetkdConfig) -> None:
    """Check what no single group can: settings that must agree across groups.

    Each group checked its own values when it was built; strategy names are
    checked by the simulation layer, which owns the strategy registry.
    """
    n = cfg.simulation.num_devices
    m = cfg.models
    if m.assignment == "per_device" and len(m.architectures) != n:
        raise ConfigError("models.architectures", f"assignment=per_device needs one architecture per device ({n}), "
                          f"got {len(m.architectures)}")
    if cfg.strategy.min_devices > n:
        raise ConfigError("strategy.min_devices",
                          f"must be <= simulation.num_devices ({n}), got {cfg.strategy.min_devices}")
    if cfg.adversary.count(n) >= n:
        raise ConfigError("adversary.fraction", f"would make all {n} devices adversarial; leave at least one "
                          f"honest device, got {cfg.adversary.fraction}")
    if cfg.privacy.enabled and cfg.training.clip_grad_norm:
        raise ConfigError("training.clip_grad_norm",
                          f"is {cfg.training.clip_grad_norm} but has no effect with privacy.enabled=true: DP-SGD "
                          "clips each example's gradient to privacy.max_grad_norm; set it to 0")
    if cfg.simulation.gpus_per_device and cfg.training.device == "cpu":
        raise ConfigError("simulation.gpus_per_device",
                          f"is {cfg.simulation.gpus_per_device} but training.device=cpu would leave the GPU unused; "
                          "set training.device=auto (or cuda) or gpus_per_device=0")


# --------------------------------------------------------------------------- output


def to_container(cfg: HetkdConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (JSON/YAML friendly)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_yaml(cfg: HetkdConfig) -> str:
    """The config as YAML; :func:`from_yaml` reads it back exactly (with its schema)."""
    return OmegaConf.to_yaml(OmegaConf.create(to_container(cfg)))


def from_yaml(text: str, schema: type[C] = HetkdConfig) -> C:  # type: ignore[assignment]
    """Read a config written by :func:`to_yaml` (validated)."""
    return _instantiate(_merge(OmegaConf.structured(schema), OmegaConf.create(text), "YAML text", schema), schema)


def flower_run_config(cfg: HetkdConfig | None = None) -> dict[str, Any]:
    """The config as a flat Flower ``run_config`` (what pyproject.toml holds)."""
    reverse = {v: k for k, v in FLOWER_ALIASES.items()}
    out: dict[str, Any] = {CONFIG_FILE_KEY: ""}
    for key, value in flatten(cfg if cfg is not None else HetkdConfig()).items():
        out[key] = _encode_value(value)
        if key in reverse:  # the Flower-style name as well (see _reconcile_aliases)
            out[reverse[key]] = out[key]
    return out


def pyproject_table() -> str:
    """Render :func:`flower_run_config` as the TOML of ``[tool.flwr.app.config]``."""
    lines = ["[tool.flwr.app.config]"]
    for key, value in flower_run_config().items():
        rendered = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f"{key if '.' not in key else json.dumps(key)} = {rendered}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hetkd.config  -> the pyproject table
    print(pyproject_table())
