"""The run configuration: one structured schema, three ways in.

A run is described by :class:`HetkdConfig`, an omegaconf structured config whose
groups are ``dataset``, ``reference``, ``partition``, ``models``, ``strategy``,
``training``, ``simulation`` and ``output``. Values arrive, in increasing order
of precedence, from

1. the dataclass defaults below (the only place defaults are written),
2. an optional YAML file (``config=PATH``), which may compose fragments listed
   under ``defaults:`` (e.g. ``defaults: [dataset/mnist1d]``),
3. dotted overrides: a command-line dotlist (``partition.alpha=0.1``) or the
   Flower ``run_config`` of ``flwr run --run-config``.

Flower's ``run_config`` holds only scalars, so lists travel as comma-separated
strings and ``None`` as the empty string; :func:`flower_run_config` encodes a
config that way (it is what ``[tool.flwr.app.config]`` in ``pyproject.toml``
holds) and :func:`resolve_config` decodes it. Two keys follow Flower's own
conventions: ``strategy`` names ``strategy.name`` and ``num-server-rounds``
names ``simulation.num_rounds``. Hyphens in keys are read as underscores.

Every error names the offending key and, where there is a fixed set, the valid
choices, so a typo stops a run before any device is started.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "ReferenceConfig",
    "PartitionConfig",
    "ModelsConfig",
    "StrategyConfig",
    "TrainingConfig",
    "SimulationConfig",
    "OutputConfig",
    "EnsembleConfig",
    "MEKDConfig",
    "B2KDConfig",
    "BenchConfig",
    "HetkdConfig",
    "FLOWER_ALIASES",
    "resolve_config",
    "load_yaml",
    "apply_overrides",
    "validate_config",
    "flower_run_config",
    "to_yaml",
    "from_yaml",
    "to_container",
]


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"config key '{key}': {message}")


# --------------------------------------------------------------------------- schema


@dataclass
class DatasetConfig:
    """Where the labelled data comes from.

    ``name`` is a key of :data:`hetkd.data.DATASETS`. ``root`` is where
    downloadable datasets live (``download`` fetches them there when missing).
    ``path`` is the ``.npz`` file for ``name=npz`` (relative paths are taken
    from the working directory where the run starts). ``test_fraction`` of the
    pool is held out as the global test set, which no device trains on; with
    ``partition.method=given`` it is that fraction of the clients' pooled test
    parts (see :func:`hetkd.data.given_partition`).
    ``num_samples`` bounds how many samples are generated or used (0 = all).
    """

    name: str = "digits"
    root: str = "~/.cache/hetkd/data"
    download: bool = True
    path: str = ""
    test_fraction: float = 0.2
    num_samples: int = 0


@dataclass
class ReferenceConfig:
    """The public reference set (SD-Dist) / proxy set (MEKD) every party holds.

    ``source`` is ``pool`` (carved out of the training pool, so it is disjoint
    from every device's private data) or the name of another dataset with the
    same input shape. ``size`` samples are used. ``labelled`` says whether its
    labels may be used for the quality score (never as training targets).
    """

    source: str = "pool"
    size: int = 300
    labelled: bool = True


@dataclass
class PartitionConfig:
    """How the training pool is split over devices.

    ``method``: ``iid``, ``dirichlet`` (label skew, concentration ``alpha``),
    ``pathological`` (``classes_per_device`` labels each), ``quantity_skew``
    (``sparse_fraction`` of the devices hold ``sparse_max_samples`` samples,
    the others share the rest) or ``given`` (the partition that ships with the
    data, e.g. an ``.npz`` with ``client`` and ``split`` arrays: client ``i``
    becomes device ``i``, its train/test parts are kept as they are, and the
    reference set is drawn from the clients' train parts). With a label-skew method, ``sparse_fraction``
    > 0 additionally cuts that fraction of devices down to at most
    ``sparse_max_samples`` samples ("sparse users"). Each device keeps
    ``device_test_fraction`` of its partition as its own test split.
    """

    method: str = "dirichlet"
    alpha: float = 0.5
    classes_per_device: int = 2
    min_samples: int = 10
    device_test_fraction: float = 0.25
    sparse_fraction: float = 0.0
    sparse_max_samples: int = 20


@dataclass
class ModelsConfig:
    """Which architecture each device holds.

    ``assignment``: ``homogeneous`` (``architectures[0]`` everywhere),
    ``round_robin`` (device i gets ``architectures[i % len]``), ``per_device``
    (``architectures`` lists one per device) or ``tiers`` (``tiers`` gives the
    fraction of devices per architecture, in order). An architecture is a name
    from :func:`hetkd.models.available_architectures` or a dotted path
    ``package.module:factory`` to ``factory(input_shape, num_classes)``.
    """

    assignment: str = "round_robin"
    architectures: list[str] = field(
        default_factory=lambda: ["cnn_s", "cnn_m", "resnet8", "mlp_s", "mlp_m"]
    )
    tiers: list[float] = field(default_factory=list)


@dataclass
class ReferenceKDConfig:
    """How a device distils towards targets on the reference set (FedMD, SD-Dist).

    Each private batch is paired with a reference batch of
    ``reference_batch_size`` samples (0: the private batch size); the loss is
    ``(1 - rho) * CE(private) + rho * s * KL(target/T ‖ student/T)`` with
    ``T = temperature`` and ``s = T²`` if ``t_squared`` (Hinton et al.) else 1
    (SD-Dist's own code). ``mix`` says how teachers' predictions combine into
    a target: ``logits`` (their mean, as in the SD-Dist paper) or ``probs``
    (the mean of their softened distributions, robust to label skew).
    Predictions travel as log-probabilities at ``precision`` (``float32``,
    ``float16`` or ``uint8``). The first ``warmup_rounds`` rounds are local
    training only. A local epoch takes at least ``min_steps`` steps, passing
    over the private data again when it is small (0: one pass, as in the
    paper); the default 10 is about one pass over a 300-sample reference set
    at batch size 32, so devices with a few samples still distil.

    The paper ran ρ = 0.9 without T² for ~1000 one-epoch rounds; for runs of
    tens of rounds we default to ρ = 0.3 with T² (a KD weight of 3.9 against
    CE, vs the paper's 9 on an unscaled KL), which reached the best accuracy
    on digits in our sweeps (see the README's results).
    """

    rho: float = 0.3
    temperature: float = 3.0
    reference_batch_size: int = 0
    precision: str = "float16"
    warmup_rounds: int = 1
    mix: str = "probs"
    t_squared: bool = True
    min_steps: int = 10


@dataclass
class SDDistConfig:
    """SD-Dist's neighbour search.

    Each device distils from ``num_neighbours`` (K) teachers chosen by
    ``neighbour_rule`` among the ``num_candidates`` (Q) devices with the best
    reference-set loss (when the reference set is labelled), by ``similarity``
    of softened reference predictions; targets are the neighbours' mean
    (``weighting=mean``) or a similarity-weighted mix. With
    ``neighbour_selection=device`` the server only relays predictions and each
    device picks its own neighbours, so no party holds the similarity graph.
    The paper used K = 10, Q = 20 for 28 devices (the defaults of
    :class:`hetkd.strategies.SDDist`); these defaults keep Q/n ≈ 0.7 and
    K/n = 0.5 for the default 10 devices.

    The search is exact (one matrix product over the sampled devices' rows
    and the candidates' columns) up to ``exact_search_max`` candidates; above
    that, each round searches a seeded random sample of ``search_sample``
    candidates (sampled neighbour search: linear in the population). With
    the quality rules the candidates are at most Q, so only ``distance`` /
    ``random`` rules or an unlabelled reference set reach the limit.
    """

    num_neighbours: int = 5
    num_candidates: int = 7
    neighbour_rule: str = "quality_distance"
    similarity: str = "kl"
    weighting: str = "mean"
    neighbour_selection: str = "server"
    exact_search_max: int = 2000
    search_sample: int = 1000


@dataclass
class EnsembleConfig:
    """Ensemble distillation on query inputs (``feddf``, ``mekd``).

    The server keeps a global ``student`` (a zoo architecture). After
    ``warmup_rounds`` of local training (and, for MEKD, ``deprivatize_rounds``
    that train the generator on the devices' answers, spreading
    ``mekd.gan_steps`` over them), every round the devices answer on
    ``num_queries`` query inputs (reference rows for FedDF, generator samples
    for MEKD; MEKD answers are ``mekd.response``, soft or hard), the server
    distils the ensemble into its student for ``server_steps`` SGD steps
    (``mekd.distill_*`` settings, MEKD's loss; FedDF's is the KL term alone)
    on the queries and targets of the last ``student_memory`` distillation
    rounds (1: the round's own; 0: every round's so far), and each device
    distils towards its targets with weight ``rho`` beside its cross-entropy,
    ``query_batch_size`` query inputs beside each private batch (0: the
    batch size), at least ``min_steps`` steps per epoch.
    Targets are the plain mean of the answers (``weighting=mean``) or, per
    device, a similarity-weighted mix over its ``num_neighbours`` nearest
    devices by ``similarity`` of their answers; ``balance_classes`` corrects
    every ensemble to a uniform class prior over the query inputs (off: the
    published plain mean). Soft answers and targets
    travel at ``precision``. ``answer_model`` says which model a device
    answers with: ``private`` (a second copy of its model that trains on its
    private data alone from the first distillation round on, so the answers
    never echo the ensemble) or ``personal`` (its own, which distils).
    """

    student: str = "resnet8"
    warmup_rounds: int = 2
    deprivatize_rounds: int = 5
    num_queries: int = 1024
    server_steps: int = 100
    student_memory: int = 1
    weighting: str = "mean"
    balance_classes: bool = True
    num_neighbours: int = 5
    similarity: str = "kl"
    rho: float = 0.8
    answer_model: str = "private"
    query_batch_size: int = 0
    min_steps: int = 10
    precision: str = "float16"


@dataclass
class StrategyConfig:
    """Which server-side algorithm runs, and how devices are sampled.

    ``fraction_train`` / ``fraction_evaluate`` of the devices take part in each
    round's training / evaluation (at least ``min_devices``). Evaluation runs
    every ``evaluate_every`` rounds and always after the last one. ``kd`` and
    ``sd_dist`` configure the logit-exchange strategies, ``ensemble`` the
    ensemble-distillation ones (FedDF, MEKD).
    """

    name: str = "sd-dist"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_devices: int = 1
    evaluate_every: int = 1
    kd: ReferenceKDConfig = field(default_factory=ReferenceKDConfig)
    sd_dist: SDDistConfig = field(default_factory=SDDistConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class TrainingConfig:
    """Each device's local optimisation.

    ``max_steps`` > 0 caps the optimisation steps of one round (private
    batches over all ``local_epochs``): with large partitions a round then
    trains on a seeded random part of the data, so devices with 100x more
    samples do not set the round's pace (0 = no cap, whole epochs).
    """

    local_epochs: int = 5
    max_steps: int = 0
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    num_threads: int = 1
    device: str = "cpu"


@dataclass
class SimulationConfig:
    """How many devices, how many rounds, and how Flower/Ray run them.

    ``cpus_per_device`` / ``gpus_per_device`` are Ray resources per simulated
    device: Ray runs ``min(CPUs / cpus_per_device, GPUs / gpus_per_device)``
    devices side by side per node, so ``cpus_per_device=0.5`` runs two per
    core and ``gpus_per_device=0.25`` four per GPU (set ``training.device``
    to ``auto`` or ``cuda`` then). ``ray_address`` connects to an existing
    Ray cluster (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``; empty:
    start a local one with ``ray_num_cpus`` CPUs, 0 = all, and an object
    store of ``ray_object_store_mb`` MiB, 0 = Ray's default).
    ``state_store`` keeps each device's weights and optimizer
    between rounds in Flower's ``Context.state`` (``context``: memory of the
    simulation process, N devices × model size) or on disk (``disk``, one
    atomically replaced file per device under the run's output folder; use
    it for hundreds of devices). A round waits at most
    ``round_timeout`` seconds for replies; the server waits ``wait_for_devices``
    seconds for all ``num_devices`` to connect.
    """

    num_devices: int = 10
    num_rounds: int = 20
    cpus_per_device: float = 1.0
    gpus_per_device: float = 0.0
    ray_address: str = ""
    ray_num_cpus: int = 0
    ray_object_store_mb: int = 0
    state_store: str = "context"
    round_timeout: float = 600.0
    wait_for_devices: float = 120.0


@dataclass
class OutputConfig:
    """Where results go: ``root/run_name`` unless ``dir`` is set.

    ``plots`` writes figures, ``progress`` shows a progress bar on a terminal,
    ``quiet`` prints only where results went (no per-round table).
    """

    root: str = "outputs"
    dir: str = ""
    run_name: str = ""
    plots: bool = True
    progress: bool = True
    quiet: bool = False


@dataclass
class MEKDConfig:
    """MEKD's hyperparameters (Ma et al., CVPR 2024), shared by ``hetkd b2kd`` and the MEKD strategy.

    ``response``: what a teacher answers with: ``soft`` (probabilities),
    ``hard`` (one-hot labels) or ``logits``. Distillation minimises
    ``w_f · dist(G(s/generator_temperature), G(t/generator_temperature)) +
    w_kl · T · KL(t/T ‖ s/T)`` with ``T = temperature`` and ``distance`` ``l1``
    or ``l2``, for ``distill_steps`` SGD updates on ``distill_batch_size``
    synthetic inputs (``distill_lr``, ``distill_momentum``,
    ``distill_weight_decay``; the rate is multiplied by ``lr_gamma`` at each
    fraction of the steps in ``lr_milestones``). Deprivatization runs
    ``gan_steps`` D-then-G updates on ``gan_batch_size`` proxy inputs (3000
    by default: with an ensemble of label-skewed devices as the teacher, the
    MEKD strategy's student reached 77 ± 6 % on digits with 1500 and 85 ± 4 %
    with 3000, over 3 seeds; the ``b2kd`` configs set 1500) with Adam
    (``gan_lr_generator``, ``gan_lr_discriminator``, betas ``gan_beta1``,
    ``gan_beta2``); ``w_info`` weighs the information term and
    ``generator_width`` is G's first feature-map width (0: by input size).
    ``hard_margin`` is the logit gap a hard (one-hot) answer stands for in
    both terms of the loss: 1 is the reference's one-hot-as-logits, a nearly
    flat target at T = 5; label smoothing ε corresponds to
    ``log(1 + (1 − ε)·C/ε)`` (4.51 for ε = 0.1, C = 10).

    The reference uses T = T_g = 5, w_f = w_kl = 1, L1, SGD 0.1 decayed 10x at
    1/3 and 2/3 of 240 epochs x 500 iterations of 128, and a DCGAN trained for
    200 epochs with Adam 2e-4; see :mod:`hetkd.distill.emulation` for where we
    differ and why.
    """

    response: str = "soft"
    temperature: float = 5.0
    generator_temperature: float = 5.0
    w_f: float = 1.0
    w_kl: float = 1.0
    distance: str = "l1"
    hard_margin: float = 1.0
    w_info: float = 0.5
    gan_steps: int = 3000
    gan_batch_size: int = 64
    gan_lr_generator: float = 1e-4
    gan_lr_discriminator: float = 4e-4
    gan_beta1: float = 0.5
    gan_beta2: float = 0.999
    generator_width: int = 0
    distill_steps: int = 1000
    distill_batch_size: int = 128
    distill_lr: float = 0.1
    distill_momentum: float = 0.9
    distill_weight_decay: float = 5e-4
    lr_milestones: list[float] = field(default_factory=lambda: [0.33, 0.67])
    lr_gamma: float = 0.1


@dataclass
class B2KDConfig:
    """The black-box KD experiment ``hetkd b2kd``: one teacher, one student, several methods.

    The ``teacher`` architecture trains for ``teacher_epochs`` on the whole
    training pool (every device's train and test part; optimizer, learning
    rate and batch size from ``training``), or is loaded from ``teacher_path``
    (a ``teacher.pt`` an earlier run wrote). The proxy set is the federation's
    reference set (``reference.*``), disjoint from the teacher's data; its
    labels are never read. Each of ``methods`` runs for each of ``responses``
    and each of ``seeds``; a seed fixes the ``student``'s initial weights and
    every random draw of deprivatization and distillation, the same for every
    method and response. Active Mixup runs ``mixup_rounds`` rounds, each
    querying the ``mixup_queries`` least-confident of ``mixup_candidates``
    random proxy pairs. ``workers`` processes (0: one per CPU core) run the
    (seed, response) jobs side by side, each with ``training.num_threads``
    threads; the numbers do not depend on it.
    """

    teacher: str = "resnet20"
    student: str = "resnet8"
    teacher_epochs: int = 30
    teacher_path: str = ""
    methods: list[str] = field(default_factory=lambda: ["mekd", "kd_generated", "kd_proxy", "active_mixup"])
    responses: list[str] = field(default_factory=lambda: ["soft", "hard"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mixup_rounds: int = 3
    mixup_candidates: int = 2000
    mixup_queries: int = 200
    workers: int = 1


@dataclass
class BenchConfig:
    """``hetkd bench``: what the scale benchmark measures (see :mod:`hetkd.simulations.bench`).

    1. ``populations``: simulations of that many devices, ``bench_rounds``
       rounds each, sampling ``strategy.fraction_train`` of them per round;
       ``sampled``: devices per round tried at the largest population;
    2. framework overhead: ``overhead_devices`` devices train
       ``overhead_epochs`` local epochs for ``overhead_rounds`` rounds, once in
       a plain PyTorch loop in one process and once through Flower + Ray;
    3. bytes per device and round of ``byte_strategies`` with every zoo model
       that takes the data;
    4. neighbour search time for ``similarity_sizes`` devices with
       ``similarity_reference`` reference samples each, ``similarity_learners``
       of them learning (1.0: all; 0.1: a round sampling 10 %), exact up to
       ``similarity_exact_max`` devices and as configured.
    ``parts`` selects which of ``scale``, ``overhead``, ``bytes``,
    ``similarity`` run.
    """

    parts: list[str] = field(default_factory=lambda: ["scale", "overhead", "bytes", "similarity"])
    populations: list[int] = field(default_factory=lambda: [10, 100, 1000])
    sampled: list[int] = field(default_factory=lambda: [10, 50, 100])
    bench_rounds: int = 3
    overhead_devices: int = 10
    overhead_rounds: int = 3
    overhead_epochs: int = 4
    overhead_architecture: str = "cnn1d_m"
    byte_strategies: list[str] = field(default_factory=lambda: ["sd-dist", "mekd", "fedavg"])
    similarity_sizes: list[int] = field(default_factory=lambda: [100, 1000, 3000, 10000])
    similarity_reference: int = 300
    similarity_learners: list[float] = field(default_factory=lambda: [1.0, 0.1])
    similarity_exact_max: int = 3000
    memory_poll_seconds: float = 0.5


@dataclass
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
    mekd: MEKDConfig = field(default_factory=MEKDConfig)
    b2kd: B2KDConfig = field(default_factory=B2KDConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


#: Flower-style run-config keys and the schema keys they stand for.
FLOWER_ALIASES: dict[str, str] = {
    "strategy": "strategy.name",
    "num-server-rounds": "simulation.num_rounds",
}
#: The run-config key that names a YAML file to load under the overrides.
CONFIG_FILE_KEY = "config"

PARTITION_METHODS = ("iid", "dirichlet", "pathological", "quantity_skew", "given")
ASSIGNMENTS = ("homogeneous", "round_robin", "per_device", "tiers")
OPTIMIZERS = ("sgd", "adam")
STATE_STORES = ("context", "disk")
NEIGHBOUR_SELECTIONS = ("server", "device")


# --------------------------------------------------------------------------- keys


def _schema_keys(node: Any = None, prefix: str = "") -> dict[str, Any]:
    """Flat ``{dotted.key: default}`` of the schema."""
    node = HetkdConfig() if node is None else node
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(_schema_keys(value, key + "."))
        else:
            out[key] = value
    return out


SCHEMA_KEYS: dict[str, Any] = _schema_keys()


def _unknown_key_error(key: str) -> ConfigError:
    group, _, _ = key.rpartition(".")
    siblings = sorted(
        k.rpartition(".")[2] for k in SCHEMA_KEYS if k.rpartition(".")[0] == group
    )
    if not siblings:  # the group itself is unknown
        groups = sorted({k.split(".")[0] for k in SCHEMA_KEYS})
        close = difflib.get_close_matches(key.split(".")[0], groups, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(key, f"unknown key{hint}; valid groups: {', '.join(groups)}")
    close = difflib.get_close_matches(key.rpartition(".")[2], siblings, n=1)
    hint = f" (did you mean '{group + '.' if group else ''}{close[0]}'?)" if close else ""
    where = f"'{group}'" if group else "the top level"
    return ConfigError(key, f"unknown key{hint}; valid keys in {where}: {', '.join(siblings)}")


def _canonical_key(key: str) -> str:
    key = key.strip()
    if key in FLOWER_ALIASES:
        return FLOWER_ALIASES[key]
    return key.replace("-", "_")


# --------------------------------------------------------------------------- loading


def _structured() -> DictConfig:
    return OmegaConf.structured(HetkdConfig)


def _merge(base: DictConfig, update: Any, source: str) -> DictConfig:
    """Merge ``update`` into ``base``, turning omegaconf errors into ConfigErrors."""
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except ConfigKeyError as err:
        raise _unknown_key_error(str(err.full_key)) from None
    except ValidationError as err:
        expected = SCHEMA_KEYS.get(str(err.full_key))
        kind = type(expected).__name__ if expected is not None else "a valid value"
        raise ConfigError(
            str(err.full_key), f"invalid value {err.value!r} in {source}; expected {kind}"
        ) from None
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


def _decode_value(key: str, value: Any) -> Any:
    """Decode a Flower run-config scalar into the schema's type for ``key``."""
    default = SCHEMA_KEYS.get(key)
    if isinstance(default, list) and isinstance(value, str):
        text = value.strip().strip("[]")
        items = [item.strip().strip("'\"") for item in text.split(",") if item.strip()]
        if default and isinstance(default[0], float) or key.endswith("tiers"):
            try:
                return [float(item) for item in items]
            except ValueError:
                raise ConfigError(key, f"expected comma-separated numbers, got {value!r}") from None
        return items
    return value


def _reconcile_aliases(run_config: Mapping[str, Any]) -> dict[str, Any]:
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
        default = _encode_value(SCHEMA_KEYS[key])
        a, b = out[alias], out.pop(key)
        if a == b or b == default:
            continue
        if a != default:
            raise ConfigError(key, f"given twice with different values: '{alias}'={a!r} and '{key}'={b!r}; set one")
        out[alias] = b
    return out


def apply_overrides(cfg: DictConfig, overrides: Mapping[str, Any] | Sequence[str]) -> DictConfig:
    """Apply dotted overrides: a mapping (Flower run_config) or ``key=value`` strings."""
    if isinstance(overrides, Mapping):
        items = list(_reconcile_aliases(overrides).items())
        parsed = [(_canonical_key(k), _decode_value(_canonical_key(k), v)) for k, v in items]
    else:
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(item, "an override must look like key=value")
            key, _, text = item.partition("=")
            key = _canonical_key(key)
            try:
                value = OmegaConf.from_dotlist([f"_={text}"])["_"]
            except OmegaConfBaseException:
                value = text
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value)
            parsed.append((key, _decode_value(key, value)))
    for key, value in parsed:
        if key == CONFIG_FILE_KEY:
            continue
        if key not in SCHEMA_KEYS:
            raise _unknown_key_error(key)
        update = OmegaConf.create({})
        OmegaConf.update(update, key, value, force_add=True)
        cfg = _merge(cfg, update, f"override {key}={value!r}")
    return cfg


def resolve_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | Sequence[str] = (),
) -> HetkdConfig:
    """Build and validate a run's config: defaults ← YAML file ← overrides.

    ``overrides`` may itself name the YAML file under the key ``config`` (that
    is how ``flwr run --run-config "config='x.yaml'"`` arrives); an explicit
    ``config_file`` wins. Empty strings mean "no file".
    """
    if not config_file:
        if isinstance(overrides, Mapping):
            config_file = overrides.get(CONFIG_FILE_KEY) or None
        else:
            named = [o.partition("=")[2] for o in overrides if o.partition("=")[0] == "config"]
            config_file = named[-1].strip("'\"") if named and named[-1] else None
    cfg = _structured()
    if config_file:
        cfg = _merge(cfg, load_yaml(config_file), f"'{config_file}'")
    cfg = apply_overrides(cfg, overrides)
    result: HetkdConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate_config(result)
    return result


# --------------------------------------------------------------------------- validation


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def _check_choice(value: str, key: str, choices: Sequence[str]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(key, f"unknown value {value!r}{hint}; valid choices: {', '.join(choices)}")


def validate_config(cfg: HetkdConfig) -> None:
    """Check values the schema's types cannot: ranges, choices, consistency.

    Dataset and architecture names are checked against the live registries of
    :mod:`hetkd.data` and :mod:`hetkd.models`; strategy names are checked by
    the simulation layer, which owns the strategy registry.
    """
    from hetkd.data import DATASETS  # local: keep `import hetkd.config` light
    from hetkd.models import check_architecture

    _check_choice(cfg.dataset.name, "dataset.name", sorted(DATASETS))
    _check(0.0 < cfg.dataset.test_fraction < 1.0, "dataset.test_fraction",
           f"must be in (0, 1), got {cfg.dataset.test_fraction}")
    _check(cfg.dataset.num_samples >= 0, "dataset.num_samples",
           f"must be >= 0 (0 = all), got {cfg.dataset.num_samples}")
    if cfg.dataset.name == "npz":
        _check(bool(cfg.dataset.path), "dataset.path", "must name a .npz file when dataset.name=npz")

    if cfg.reference.source != "pool":
        _check_choice(cfg.reference.source, "reference.source", ["pool", *sorted(DATASETS)])
    _check(cfg.reference.size >= 0, "reference.size", f"must be >= 0, got {cfg.reference.size}")

    p = cfg.partition
    _check_choice(p.method, "partition.method", PARTITION_METHODS)
    _check(p.alpha > 0, "partition.alpha", f"must be > 0, got {p.alpha}")
    _check(p.classes_per_device >= 1, "partition.classes_per_device",
           f"must be >= 1, got {p.classes_per_device}")
    _check(p.min_samples >= 0, "partition.min_samples", f"must be >= 0, got {p.min_samples}")
    _check(0.0 <= p.device_test_fraction < 1.0, "partition.device_test_fraction",
           f"must be in [0, 1), got {p.device_test_fraction}")
    _check(0.0 <= p.sparse_fraction <= 1.0, "partition.sparse_fraction",
           f"must be in [0, 1], got {p.sparse_fraction}")
    _check(p.sparse_max_samples >= 2, "partition.sparse_max_samples",
           f"must be >= 2 (a train and a test sample), got {p.sparse_max_samples}")
    if p.method == "quantity_skew":
        _check(p.sparse_fraction > 0, "partition.sparse_fraction",
               "must be > 0 for partition.method=quantity_skew")

    m = cfg.models
    _check_choice(m.assignment, "models.assignment", ASSIGNMENTS)
    _check(len(m.architectures) > 0, "models.architectures", "must list at least one architecture")
    for i, arch in enumerate(m.architectures):
        check_architecture(arch, f"models.architectures[{i}]")
    n = cfg.simulation.num_devices
    if m.assignment == "per_device":
        _check(len(m.architectures) == n, "models.architectures",
               f"assignment=per_device needs one architecture per device ({n}), got {len(m.architectures)}")
    if m.assignment == "tiers":
        _check(len(m.tiers) == len(m.architectures), "models.tiers",
               f"needs one fraction per architecture ({len(m.architectures)}), got {len(m.tiers)}")
        _check(all(t >= 0 for t in m.tiers) and abs(sum(m.tiers) - 1.0) < 1e-6, "models.tiers",
               f"fractions must be >= 0 and sum to 1, got {list(m.tiers)}")

    s = cfg.strategy
    _check(0.0 < s.fraction_train <= 1.0, "strategy.fraction_train",
           f"must be in (0, 1], got {s.fraction_train}")
    _check(0.0 <= s.fraction_evaluate <= 1.0, "strategy.fraction_evaluate",
           f"must be in [0, 1], got {s.fraction_evaluate}")
    _check(s.min_devices >= 1, "strategy.min_devices", f"must be >= 1, got {s.min_devices}")
    _check(s.evaluate_every >= 1, "strategy.evaluate_every", f"must be >= 1, got {s.evaluate_every}")
    _validate_exchange(s)
    _validate_ensemble(s.ensemble)

    t = cfg.training
    _check(t.local_epochs >= 0, "training.local_epochs", f"must be >= 0, got {t.local_epochs}")
    _check(t.max_steps >= 0, "training.max_steps", f"must be >= 0 (0 = no cap), got {t.max_steps}")
    _check(t.batch_size >= 1, "training.batch_size", f"must be >= 1, got {t.batch_size}")
    _check_choice(t.optimizer, "training.optimizer", OPTIMIZERS)
    _check(t.lr > 0, "training.lr", f"must be > 0, got {t.lr}")
    _check(0.0 <= t.momentum < 1.0, "training.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(t.weight_decay >= 0, "training.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(t.num_threads >= 1, "training.num_threads", f"must be >= 1, got {t.num_threads}")
    _check(t.device == "cpu" or t.device == "auto" or t.device.startswith("cuda"), "training.device",
           f"unknown value {t.device!r}; valid choices: cpu, auto, cuda, cuda:N")

    sim = cfg.simulation
    _check(sim.num_devices >= 1, "simulation.num_devices", f"must be >= 1, got {sim.num_devices}")
    _check(sim.num_rounds >= 1, "simulation.num_rounds (num-server-rounds)",
           f"must be >= 1, got {sim.num_rounds}")
    _check(sim.cpus_per_device > 0, "simulation.cpus_per_device",
           f"must be > 0, got {sim.cpus_per_device}")
    _check(sim.gpus_per_device >= 0, "simulation.gpus_per_device",
           f"must be >= 0, got {sim.gpus_per_device}")
    _check(sim.gpus_per_device == 0 or t.device != "cpu", "simulation.gpus_per_device",
           f"is {sim.gpus_per_device} but training.device=cpu would leave the GPU unused; "
           "set training.device=auto (or cuda) or gpus_per_device=0")
    _check(sim.gpus_per_device <= 1 or float(sim.gpus_per_device).is_integer(), "simulation.gpus_per_device",
           f"must be a fraction <= 1 or a whole number of GPUs, got {sim.gpus_per_device}")
    _check(_valid_ray_address(sim.ray_address), "simulation.ray_address",
           f"must be empty (local Ray), 'auto', 'HOST:PORT' or 'ray://HOST:PORT', got {sim.ray_address!r}")
    _check(sim.ray_num_cpus >= 0, "simulation.ray_num_cpus", f"must be >= 0 (0: all), got {sim.ray_num_cpus}")
    _check(sim.ray_object_store_mb >= 0, "simulation.ray_object_store_mb",
           f"must be >= 0 (0: Ray's default), got {sim.ray_object_store_mb}")
    if sim.ray_address:
        for key in ("ray_num_cpus", "ray_object_store_mb"):
            _check(getattr(sim, key) == 0, f"simulation.{key}",
                   "applies only to a local Ray instance; a cluster's nodes set their own resources "
                   "(ray start --num-cpus/--object-store-memory); leave it 0 with simulation.ray_address")
    _check_choice(sim.state_store, "simulation.state_store", STATE_STORES)
    _check(sim.round_timeout > 0, "simulation.round_timeout", f"must be > 0, got {sim.round_timeout}")
    _check(sim.wait_for_devices > 0, "simulation.wait_for_devices",
           f"must be > 0, got {sim.wait_for_devices}")
    _check(s.min_devices <= sim.num_devices, "strategy.min_devices",
           f"must be <= simulation.num_devices ({sim.num_devices}), got {s.min_devices}")
    _validate_mekd(cfg)
    _validate_bench(cfg.bench)


def _valid_ray_address(address: str) -> bool:
    """Empty, ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``."""
    import re

    return address in ("", "auto") or re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", address) is not None


BENCH_PARTS = ("scale", "overhead", "bytes", "similarity")


def _validate_bench(b: BenchConfig) -> None:
    """The ``hetkd bench`` settings (``bench``)."""
    from hetkd.models import check_architecture

    for i, part in enumerate(b.parts):
        _check_choice(part, f"bench.parts[{i}]", BENCH_PARTS)
    for key in ("populations", "sampled", "similarity_sizes"):
        values = getattr(b, key)
        _check(all(v >= 1 for v in values), f"bench.{key}", f"must list sizes >= 1, got {list(values)}")
    for key in ("bench_rounds", "overhead_devices", "overhead_rounds", "overhead_epochs", "similarity_reference"):
        _check(getattr(b, key) >= 1, f"bench.{key}", f"must be >= 1, got {getattr(b, key)}")
    _check(len(b.similarity_learners) > 0 and all(0 < f <= 1 for f in b.similarity_learners),
           "bench.similarity_learners", f"must list fractions in (0, 1], got {list(b.similarity_learners)}")
    _check(b.similarity_exact_max >= 0, "bench.similarity_exact_max", f"must be >= 0, got {b.similarity_exact_max}")
    _check(b.memory_poll_seconds > 0, "bench.memory_poll_seconds", f"must be > 0, got {b.memory_poll_seconds}")
    check_architecture(b.overhead_architecture, "bench.overhead_architecture")


def _validate_exchange(s: StrategyConfig) -> None:
    """The logit-exchange settings (``strategy.kd``, ``strategy.sd_dist``)."""
    from hetkd.distill.codec import PRECISIONS
    from hetkd.distill.similarity import MIX_SPACES, NEIGHBOUR_RULES, SIMILARITIES, WEIGHTINGS

    kd, sd = s.kd, s.sd_dist
    _check(0.0 <= kd.rho <= 1.0, "strategy.kd.rho", f"must be in [0, 1], got {kd.rho}")
    _check(kd.temperature > 0, "strategy.kd.temperature", f"must be > 0, got {kd.temperature}")
    _check(kd.reference_batch_size >= 0, "strategy.kd.reference_batch_size",
           f"must be >= 0 (0 = the private batch size), got {kd.reference_batch_size}")
    _check_choice(kd.precision, "strategy.kd.precision", PRECISIONS)
    _check(kd.warmup_rounds >= 0, "strategy.kd.warmup_rounds", f"must be >= 0, got {kd.warmup_rounds}")
    _check_choice(kd.mix, "strategy.kd.mix", MIX_SPACES)
    _check(kd.min_steps >= 0, "strategy.kd.min_steps", f"must be >= 0, got {kd.min_steps}")
    _check(sd.num_neighbours >= 1, "strategy.sd_dist.num_neighbours", f"must be >= 1, got {sd.num_neighbours}")
    _check(sd.num_candidates >= 1, "strategy.sd_dist.num_candidates", f"must be >= 1, got {sd.num_candidates}")
    _check_choice(sd.neighbour_rule, "strategy.sd_dist.neighbour_rule", NEIGHBOUR_RULES)
    _check_choice(sd.similarity, "strategy.sd_dist.similarity", SIMILARITIES)
    _check_choice(sd.weighting, "strategy.sd_dist.weighting", WEIGHTINGS)
    _check_choice(sd.neighbour_selection, "strategy.sd_dist.neighbour_selection", NEIGHBOUR_SELECTIONS)
    _check(sd.exact_search_max >= 0, "strategy.sd_dist.exact_search_max",
           f"must be >= 0 (0: always exact), got {sd.exact_search_max}")
    _check(sd.search_sample >= 1, "strategy.sd_dist.search_sample", f"must be >= 1, got {sd.search_sample}")


def _validate_ensemble(e: EnsembleConfig) -> None:
    """The ensemble-distillation settings (``strategy.ensemble``)."""
    from hetkd.distill.codec import PRECISIONS
    from hetkd.distill.similarity import SIMILARITIES, WEIGHTINGS
    from hetkd.models import check_architecture
    from hetkd.protocol import ANSWER_MODELS

    check_architecture(e.student, "strategy.ensemble.student")
    for key in ("warmup_rounds", "server_steps", "student_memory", "query_batch_size", "min_steps"):
        _check(getattr(e, key) >= 0, f"strategy.ensemble.{key}", f"must be >= 0, got {getattr(e, key)}")
    _check(e.deprivatize_rounds >= 1, "strategy.ensemble.deprivatize_rounds", f"must be >= 1, got {e.deprivatize_rounds}")
    _check(e.num_queries >= 2, "strategy.ensemble.num_queries", f"must be >= 2, got {e.num_queries}")
    _check_choice(e.weighting, "strategy.ensemble.weighting", WEIGHTINGS)
    _check(e.num_neighbours >= 1, "strategy.ensemble.num_neighbours", f"must be >= 1, got {e.num_neighbours}")
    _check_choice(e.similarity, "strategy.ensemble.similarity", SIMILARITIES)
    _check(0.0 <= e.rho <= 1.0, "strategy.ensemble.rho", f"must be in [0, 1], got {e.rho}")
    _check_choice(e.answer_model, "strategy.ensemble.answer_model", ANSWER_MODELS)
    _check_choice(e.precision, "strategy.ensemble.precision", PRECISIONS)


def _validate_mekd(cfg: HetkdConfig) -> None:
    """MEKD's hyperparameters (``mekd``) and the ``b2kd`` experiment's settings."""
    from hetkd.distill.blackbox import METHODS
    from hetkd.distill.emulation import DISTANCES
    from hetkd.distill.ensemble import RESPONSE_KINDS
    from hetkd.models import check_architecture

    m = cfg.mekd
    _check_choice(m.response, "mekd.response", RESPONSE_KINDS)
    for key in ("temperature", "generator_temperature", "gan_lr_generator", "gan_lr_discriminator", "distill_lr",
                "hard_margin"):
        _check(getattr(m, key) > 0, f"mekd.{key}", f"must be > 0, got {getattr(m, key)}")
    for key in ("w_f", "w_kl", "w_info", "distill_weight_decay"):
        _check(getattr(m, key) >= 0, f"mekd.{key}", f"must be >= 0, got {getattr(m, key)}")
    _check(m.w_f + m.w_kl > 0, "mekd.w_kl", "w_f and w_kl cannot both be 0")
    _check_choice(m.distance, "mekd.distance", DISTANCES)
    for key in ("gan_beta1", "gan_beta2", "distill_momentum"):
        _check(0.0 <= getattr(m, key) < 1.0, f"mekd.{key}", f"must be in [0, 1), got {getattr(m, key)}")
    _check(m.gan_steps >= 0, "mekd.gan_steps", f"must be >= 0, got {m.gan_steps}")
    _check(m.distill_steps >= 1, "mekd.distill_steps", f"must be >= 1, got {m.distill_steps}")
    for key in ("gan_batch_size", "distill_batch_size"):
        _check(getattr(m, key) >= 2, f"mekd.{key}", f"must be >= 2 (BatchNorm), got {getattr(m, key)}")
    _check(m.generator_width >= 0, "mekd.generator_width", f"must be >= 0 (0: by input size), got {m.generator_width}")
    _check(all(0.0 < f < 1.0 for f in m.lr_milestones) and list(m.lr_milestones) == sorted(m.lr_milestones),
           "mekd.lr_milestones", f"must be increasing fractions in (0, 1), got {list(m.lr_milestones)}")
    _check(0.0 < m.lr_gamma <= 1.0, "mekd.lr_gamma", f"must be in (0, 1], got {m.lr_gamma}")

    b = cfg.b2kd
    check_architecture(b.teacher, "b2kd.teacher")
    check_architecture(b.student, "b2kd.student")
    _check(b.teacher_epochs >= 1 or bool(b.teacher_path), "b2kd.teacher_epochs",
           f"must be >= 1 unless b2kd.teacher_path names a teacher to load, got {b.teacher_epochs}")
    for key, values, choices in (("b2kd.methods", b.methods, sorted(METHODS)),
                                 ("b2kd.responses", b.responses, list(RESPONSE_KINDS))):
        _check(len(values) > 0, key, f"must list at least one of: {', '.join(choices)}")
        for i, value in enumerate(values):
            _check_choice(value, f"{key}[{i}]", choices)
        _check(len(set(values)) == len(values), key, f"lists a value twice: {list(values)}")
    _check(len(b.seeds) > 0 and len(set(b.seeds)) == len(b.seeds), "b2kd.seeds",
           f"must list at least one seed, each once, got {list(b.seeds)}")
    _check(b.mixup_rounds >= 0, "b2kd.mixup_rounds", f"must be >= 0, got {b.mixup_rounds}")
    _check(1 <= b.mixup_queries <= b.mixup_candidates, "b2kd.mixup_queries",
           f"must be in [1, b2kd.mixup_candidates={b.mixup_candidates}], got {b.mixup_queries}")
    _check(b.workers >= 0, "b2kd.workers", f"must be >= 0 (0: one per CPU core), got {b.workers}")


# --------------------------------------------------------------------------- output


def to_container(cfg: HetkdConfig) -> dict[str, Any]:
    """The config as plain nested dicts and lists (JSON/YAML friendly)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: HetkdConfig) -> str:
    """The config as YAML; :func:`from_yaml` reads it back exactly."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> HetkdConfig:
    """Read a config written by :func:`to_yaml` (validated)."""
    cfg = _merge(_structured(), OmegaConf.create(text), "YAML text")
    result: HetkdConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate_config(result)
    return result


def _encode_value(value: Any) -> Any:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def flower_run_config(cfg: HetkdConfig | None = None) -> dict[str, Any]:
    """The config as a flat Flower ``run_config`` (what pyproject.toml holds)."""
    flat = _schema_keys(cfg if cfg is not None else HetkdConfig())
    reverse = {v: k for k, v in FLOWER_ALIASES.items()}
    out: dict[str, Any] = {CONFIG_FILE_KEY: ""}
    for key, value in flat.items():
        out[key] = _encode_value(value)
        if key in reverse:  # the Flower-style name as well (see _reconcile_aliases)
            out[reverse[key]] = out[key]
    return out


def _pyproject_table() -> str:
    """Render :func:`flower_run_config` as the TOML of ``[tool.flwr.app.config]``."""
    import json

    lines = ["[tool.flwr.app.config]"]
    for key, value in flower_run_config().items():
        rendered = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        toml_key = key if "." not in key else json.dumps(key)
        lines.append(f"{toml_key} = {rendered}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m hetkd.config  -> the pyproject table
    print(_pyproject_table())
