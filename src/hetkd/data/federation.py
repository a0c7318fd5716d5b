"""The data picture of one run: global test set, reference set, device partitions.

:func:`build_federation` carves, deterministically from the seed, a labelled
dataset into

* a **global test set** (``dataset.test_fraction`` of it) that nobody trains on,
* a public **reference set** (``reference.size`` samples, SD-Dist's reference /
  MEKD's proxy data) taken from the pool, or from another dataset of the same
  input shape, disjoint from every device's data,
* one partition per device (see :mod:`hetkd.data.partition`), each split into
  the device's own train and test part.

When the data carries its own partition (``partition.method=given``, e.g. an
``.npz`` with ``client``/``split`` arrays), the clients' parts are used as they
are and the public parts are carved around them (:func:`given_partition`).

The server and every device call it with the same config and get the same
picture, so no index lists need to travel. Everything is an index view of one
in-memory dataset per process.

With ``adversary.fraction`` > 0 (:mod:`hetkd.adversary`) the picture also says
which devices are adversarial; those of kind ``permuted_labels`` see their
private labels through the run's label permutation (test parts stay true).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import numpy as np

from hetkd.adversary import AdversarySettings, adversarial_devices, label_permutation
from hetkd.data.partition import (
    PartitionConfig,
    PartitionError,
    given_partition,
    make_sparse,
    partition_pool,
    split_train_test,
)
from hetkd.data.sources import DATASETS, ArrayDataset, DatasetConfig, DataView, load_dataset
from hetkd.settings import require, require_choice, require_types

__all__ = ["ReferenceConfig", "DeviceData", "Federation", "FederationSpec", "build_federation"]


@dataclass(frozen=True, kw_only=True)
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

    def __post_init__(self) -> None:
        require_types(self)
        if self.source != "pool":
            require_choice(self.source, "source", ["pool", *sorted(DATASETS)])
        require(self.size >= 0, "size", f"must be >= 0, got {self.size}")


class _Devices(Protocol):
    @property
    def num_devices(self) -> int: ...


class FederationSpec(Protocol):
    """What :func:`build_federation` reads of a run config (:class:`hetkd.config.HetkdConfig` has it)."""

    @property
    def seed(self) -> int: ...

    @property
    def dataset(self) -> DatasetConfig: ...

    @property
    def reference(self) -> ReferenceConfig: ...

    @property
    def partition(self) -> PartitionConfig: ...

    @property
    def simulation(self) -> _Devices: ...


@dataclass(frozen=True, eq=False)
class DeviceData:
    """One device's private data: its own train and test parts. ``adversary`` is the
    kind of a device that poisons the federation on purpose (``None``: honest)."""

    device_id: int
    train: DataView
    test: DataView
    sparse: bool = False
    adversary: str | None = None


@dataclass(frozen=True, eq=False)
class Federation:
    """Everything data-related a run needs, as index views."""

    dataset: ArrayDataset
    global_test: DataView
    reference: DataView
    reference_labelled: bool
    devices: tuple[DeviceData, ...]

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.dataset.input_shape

    def device(self, device_id: int) -> DeviceData:
        """The data of device ``device_id`` (0-based)."""
        if not 0 <= device_id < len(self.devices):
            raise IndexError(
                f"device id {device_id} is outside this federation of {len(self.devices)} "
                "devices (simulation.num_devices)"
            )
        return self.devices[device_id]

    @property
    def adversaries(self) -> list[int]:
        """The ids of the adversarial devices (see :mod:`hetkd.adversary`)."""
        return [d.device_id for d in self.devices if d.adversary]

    def summary(self) -> dict[str, Any]:
        """Sizes and per-device label counts (and kind of adversary), for ``federation.json``."""
        c = self.num_classes
        return {
            "dataset": self.dataset.name,
            "input_shape": list(self.input_shape),
            "num_classes": c,
            "global_test_size": len(self.global_test),
            "reference_size": len(self.reference),
            "reference_source": self.reference.base.name,
            "reference_labelled": self.reference_labelled,
            "devices": [
                {
                    "device_id": d.device_id,
                    "train_size": len(d.train),
                    "test_size": len(d.test),
                    "sparse": d.sparse,
                    "train_label_counts": np.bincount(d.train.labels, minlength=c).tolist(),
                    **({"adversary": d.adversary} if d.adversary else {}),
                }
                for d in self.devices
            ],
        }


def _federation_key(cfg: FederationSpec) -> str:
    adversary = getattr(cfg, "adversary", None) or AdversarySettings()
    return json.dumps(
        {
            "adversary": asdict(adversary),
            "seed": cfg.seed,
            "dataset": asdict(cfg.dataset),
            "reference": asdict(cfg.reference),
            "partition": asdict(cfg.partition),
            "num_devices": cfg.simulation.num_devices,
        },
        sort_keys=True,
    )


def build_federation(cfg: FederationSpec) -> Federation:
    """The run's :class:`Federation` (computed once per process and config)."""
    return _build(_federation_key(cfg))


@functools.lru_cache(maxsize=4)
def _build(key: str) -> Federation:
    spec = json.loads(key)
    return _with_adversaries(_picture(spec), AdversarySettings(**spec["adversary"]), spec["seed"])


def _with_adversaries(federation: Federation, adversary: AdversarySettings, seed: int) -> Federation:
    """``federation`` with the adversarial devices marked; permuted-label ones train on permuted labels."""
    chosen = set(adversarial_devices(len(federation.devices), adversary.fraction, seed))
    if not chosen:
        return federation
    perm = label_permutation(federation.num_classes, seed)
    relabelled: dict[int, ArrayDataset] = {}  # the same inputs under permuted labels (no copy of the inputs)
    devices = []
    for d in federation.devices:
        if d.device_id in chosen:
            train = d.train
            if adversary.kind == "permuted_labels":
                if id(train.base) not in relabelled:
                    relabelled[id(train.base)] = replace(train.base, labels=perm[train.base.labels])
                train = DataView(relabelled[id(train.base)], train.indices)
            d = replace(d, train=train, adversary=adversary.kind)
        devices.append(d)
    return replace(federation, devices=tuple(devices))


def _picture(spec: dict) -> Federation:
    seed, ds_cfg, ref_cfg, part_cfg = spec["seed"], spec["dataset"], spec["reference"], spec["partition"]
    dataset = load_dataset(
        ds_cfg["name"],
        root=ds_cfg["root"],
        download=ds_cfg["download"],
        path=ds_cfg["path"],
        num_samples=ds_cfg["num_samples"],
        num_classes=ds_cfg["num_classes"],
    )
    if part_cfg["method"] == "given":
        return _given(dataset, spec)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset))
    num_test = int(round(ds_cfg["test_fraction"] * len(dataset)))
    global_test, rest = order[:num_test], order[num_test:]

    source = ref_cfg["source"]
    if source in ("pool", dataset.name):
        if ref_cfg["size"] >= len(rest):
            raise ValueError(
                f"reference.size={ref_cfg['size']} leaves no training data in a pool of {len(rest)}"
            )
        reference = dataset.view(rest[: ref_cfg["size"]])
        rest = rest[ref_cfg["size"] :]
        labelled = bool(ref_cfg["labelled"])
    else:
        other = load_dataset(source, root=ds_cfg["root"], download=ds_cfg["download"])
        if other.input_shape != dataset.input_shape:
            raise ValueError(
                f"reference.source={source!r} has inputs of shape {other.input_shape}, but "
                f"dataset '{dataset.name}' has {dataset.input_shape}; they must match"
            )
        size = min(ref_cfg["size"], len(other))
        reference = other.view(np.sort(rng.permutation(len(other))[:size]))
        labelled = False  # another task's labels say nothing about this task's quality

    positions, sparse_ids = partition_pool(
        dataset.labels[rest],
        spec["num_devices"],
        part_cfg["method"],
        seed,
        alpha=part_cfg["alpha"],
        classes_per_device=part_cfg["classes_per_device"],
        min_samples=part_cfg["min_samples"],
        sparse_fraction=part_cfg["sparse_fraction"],
        sparse_max_samples=part_cfg["sparse_max_samples"],
    )
    devices = []
    for device_id, pos in enumerate(positions):
        train, test = split_train_test(rest[pos], part_cfg["device_test_fraction"], seed * 100_003 + device_id)
        devices.append(
            DeviceData(device_id, dataset.view(train), dataset.view(test), device_id in sparse_ids)
        )
    return Federation(dataset, dataset.view(global_test), reference, labelled, tuple(devices))


def _given(dataset: ArrayDataset, spec: dict) -> Federation:
    """The federation of a dataset that ships its own partition."""
    seed, ds_cfg, ref_cfg, part_cfg = spec["seed"], spec["dataset"], spec["reference"], spec["partition"]
    if dataset.clients is None:
        raise PartitionError(
            f"partition.method='given' needs data that carries its own partition (a 'client' array), "
            f"but dataset '{ds_cfg['name']}' has none; use dataset.name=npz with a file holding "
            "x, y, client (and optionally split), or another partition.method"
        )
    if ref_cfg["source"] not in ("pool", dataset.name):
        raise PartitionError(
            f"reference.source={ref_cfg['source']!r} with partition.method='given' is not supported; "
            "the reference set is carved from the clients' train parts (reference.source=pool)"
        )
    given = given_partition(
        dataset.clients,
        dataset.splits,
        spec["num_devices"],
        seed,
        global_test_fraction=ds_cfg["test_fraction"],
        reference_size=ref_cfg["size"],
        device_test_fraction=part_cfg["device_test_fraction"],
    )
    train_parts, sparse_ids = make_sparse(
        given.device_train, part_cfg["sparse_fraction"], part_cfg["sparse_max_samples"], seed + 1
    )
    devices = tuple(
        DeviceData(device_id, dataset.view(train), dataset.view(test), device_id in sparse_ids)
        for device_id, (train, test) in enumerate(zip(train_parts, given.device_test))
    )
    reference = dataset.view(given.reference)
    return Federation(dataset, dataset.view(given.global_test), reference, bool(ref_cfg["labelled"]), devices)
