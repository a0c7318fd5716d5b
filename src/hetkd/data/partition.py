"""Splitting a labelled pool over devices.

Each function maps the pool's labels to one index array per device (positions
into the pool), deterministically from ``seed``. The label-skew and iid
partitioners are flwr-datasets' own (:class:`~flwr_datasets.partitioner.DirichletPartitioner`
and friends), driven through a two-column Hugging Face dataset of labels and
positions, so our partitions are the ones the Flower ecosystem reports on. Each
partition they make is kept in a disk cache (:mod:`hetkd.data.partition_cache`),
so later processes building the same devices do not import ``datasets`` again.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from hetkd.data.partition_cache import load_parts, partition_key, store_parts
from hetkd.settings import require, require_choice, require_types

__all__ = [
    "PartitionConfig",
    "PARTITION_METHODS",
    "PartitionError",
    "iid_partition",
    "dirichlet_partition",
    "pathological_partition",
    "quantity_skew_partition",
    "make_sparse",
    "split_train_test",
    "partition_pool",
    "GivenPartition",
    "given_partition",
]


class PartitionError(ValueError):
    """A partition cannot be made with the given settings; names the setting."""


PARTITION_METHODS = ("iid", "dirichlet", "pathological", "quantity_skew", "given")


@dataclass(frozen=True, kw_only=True)
class PartitionConfig:
    """How the training pool is split over devices.

    ``method``: ``iid``, ``dirichlet`` (label skew, concentration ``alpha``),
    ``pathological`` (``classes_per_device`` labels each), ``quantity_skew``
    (``sparse_fraction`` of the devices hold ``sparse_max_samples`` samples,
    the others share the rest) or ``given`` (the partition that ships with the
    data, e.g. an ``.npz`` with ``client`` and ``split`` arrays: client ``i``
    becomes device ``i``, its train/test parts are kept as they are, and the
    reference set is drawn from the clients' train parts). With a label-skew
    method, ``sparse_fraction`` > 0 additionally cuts that fraction of devices
    down to at most ``sparse_max_samples`` samples ("sparse users"). Each
    device keeps ``device_test_fraction`` of its partition as its own test
    split and holds at least ``min_samples``.
    """

    method: str = "dirichlet"
    alpha: float = 0.5
    classes_per_device: int = 2
    min_samples: int = 10
    device_test_fraction: float = 0.25
    sparse_fraction: float = 0.0
    sparse_max_samples: int = 20

    def __post_init__(self) -> None:
        require_types(self)
        require_choice(self.method, "method", PARTITION_METHODS)
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        require(self.classes_per_device >= 1, "classes_per_device", f"must be >= 1, got {self.classes_per_device}")
        require(self.min_samples >= 0, "min_samples", f"must be >= 0, got {self.min_samples}")
        require(0.0 <= self.device_test_fraction < 1.0, "device_test_fraction",
                f"must be in [0, 1), got {self.device_test_fraction}")
        require(0.0 <= self.sparse_fraction <= 1.0, "sparse_fraction", f"must be in [0, 1], got {self.sparse_fraction}")
        require(self.sparse_max_samples >= 2, "sparse_max_samples",
                f"must be >= 2 (a train and a test sample), got {self.sparse_max_samples}")
        require(self.method != "quantity_skew" or self.sparse_fraction > 0, "sparse_fraction",
                "must be > 0 for partition.method=quantity_skew")


def _run_partitioner(partitioner: str, labels: np.ndarray, **settings: object) -> list[np.ndarray]:
    """Positions in ``labels`` of each partition made by flwr-datasets' ``partitioner`` (a class
    of :mod:`flwr_datasets.partitioner`) with ``settings``; read from the partition cache
    (:mod:`hetkd.data.partition_cache`) when this partition was made before."""
    key = partition_key(partitioner, settings, labels)
    cached = load_parts(key, len(labels))
    if cached is not None:
        return cached
    parts = _flwr_datasets_partition(partitioner, labels, settings)
    store_parts(key, parts)
    return parts


def _flwr_datasets_partition(partitioner: str, labels: np.ndarray, settings: dict[str, object]) -> list[np.ndarray]:
    import datasets
    import flwr_datasets.partitioner

    made = getattr(flwr_datasets.partitioner, partitioner)(**settings)
    made.dataset = datasets.Dataset.from_dict(
        {"label": labels.astype(np.int64), "position": np.arange(len(labels), dtype=np.int64)}
    )
    return [np.asarray(made.load_partition(pid)["position"], dtype=np.int64) for pid in range(made.num_partitions)]


def _check_devices(num_devices: int, pool_size: int) -> None:
    if num_devices < 1:
        raise PartitionError(f"num_devices must be >= 1, got {num_devices}")
    if num_devices > pool_size:
        raise PartitionError(
            f"cannot split {pool_size} samples over {num_devices} devices "
            "(simulation.num_devices exceeds the training pool)"
        )


def iid_partition(labels: np.ndarray, num_devices: int, seed: int) -> list[np.ndarray]:
    """Equal-size random shards (flwr-datasets ``IidPartitioner`` on a shuffled pool)."""
    _check_devices(num_devices, len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    parts = _run_partitioner("IidPartitioner", labels[order], num_partitions=num_devices)
    return [order[p] for p in parts]


def dirichlet_partition(
    labels: np.ndarray, num_devices: int, alpha: float, seed: int, min_samples: int = 10
) -> list[np.ndarray]:
    """Label skew: each class is split over devices by Dirichlet(``alpha``) proportions.

    Small ``alpha`` gives devices few classes each; large ``alpha`` approaches iid.
    Draws are repeated (up to flwr-datasets' limit) until every device holds
    at least ``min_samples`` samples.
    """
    _check_devices(num_devices, len(labels))
    if alpha <= 0:
        raise PartitionError(f"partition.alpha must be > 0, got {alpha}")
    if min_samples * num_devices > len(labels):
        raise PartitionError(
            f"partition.min_samples={min_samples} x {num_devices} devices exceeds the pool "
            f"of {len(labels)} samples"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return _run_partitioner(
                "DirichletPartitioner",
                labels,
                num_partitions=num_devices,
                partition_by="label",
                alpha=alpha,
                min_partition_size=min_samples,
                self_balancing=False,
                shuffle=True,
                seed=seed,
            )
        except ValueError as err:
            raise PartitionError(
                f"Dirichlet(alpha={alpha}) could not give every one of {num_devices} devices "
                f"partition.min_samples={min_samples} samples in 10 draws; lower "
                f"partition.min_samples or raise partition.alpha ({err})"
            ) from None


def pathological_partition(
    labels: np.ndarray, num_devices: int, classes_per_device: int, seed: int
) -> list[np.ndarray]:
    """Each device holds samples of exactly ``classes_per_device`` classes."""
    _check_devices(num_devices, len(labels))
    num_classes = len(np.unique(labels))
    if not 1 <= classes_per_device <= num_classes:
        raise PartitionError(
            f"partition.classes_per_device must be in [1, {num_classes}], got {classes_per_device}"
        )
    parts = _run_partitioner(
        "PathologicalPartitioner",
        labels,
        num_partitions=num_devices,
        partition_by="label",
        num_classes_per_partition=classes_per_device,
        class_assignment_mode="first-deterministic",
        shuffle=True,
        seed=seed,
    )
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise PartitionError(
            f"pathological partition left devices {empty} empty; use fewer devices or more "
            "partition.classes_per_device"
        )
    return parts


def quantity_skew_partition(
    labels: np.ndarray, num_devices: int, sparse_fraction: float, sparse_max_samples: int, seed: int
) -> list[np.ndarray]:
    """Quantity skew: ``sparse_fraction`` of the devices get ``sparse_max_samples``
    random samples; the others share the rest equally (flwr-datasets ``SizePartitioner``)."""
    _check_devices(num_devices, len(labels))
    rng = np.random.default_rng(seed)
    num_sparse = min(num_devices - 1, math.ceil(sparse_fraction * num_devices))
    sparse = set(rng.choice(num_devices, size=num_sparse, replace=False).tolist())
    rest = len(labels) - num_sparse * sparse_max_samples
    num_rich = num_devices - num_sparse
    if rest < num_rich * sparse_max_samples:
        raise PartitionError(
            f"quantity skew needs more data: {num_sparse} sparse devices x "
            f"partition.sparse_max_samples={sparse_max_samples} leave {rest} samples for "
            f"{num_rich} others"
        )
    base, extra = divmod(rest, num_rich)
    rich = [i for i in range(num_devices) if i not in sparse]
    sizes = [sparse_max_samples] * num_devices
    for k, i in enumerate(rich):
        sizes[i] = base + (1 if k < extra else 0)
    order = rng.permutation(len(labels))
    parts = _run_partitioner("SizePartitioner", labels[order], partition_sizes=sizes)
    return [order[p] for p in parts]


def make_sparse(
    parts: list[np.ndarray], sparse_fraction: float, max_samples: int, seed: int
) -> tuple[list[np.ndarray], list[int]]:
    """Cut ``sparse_fraction`` of the devices (chosen at random) to at most
    ``max_samples`` samples: the "sparse users". Returns the new parts and
    the sparse device ids. Samples cut away are left unused, so the other
    devices' distributions are exactly those of the unmodified partition."""
    if sparse_fraction <= 0:
        return parts, []
    rng = np.random.default_rng(seed)
    num_sparse = min(len(parts), math.ceil(sparse_fraction * len(parts)))
    chosen = sorted(rng.choice(len(parts), size=num_sparse, replace=False).tolist())
    out = list(parts)
    for i in chosen:
        if len(out[i]) > max_samples:
            out[i] = np.sort(rng.choice(out[i], size=max_samples, replace=False))
    return out, chosen


def split_train_test(
    indices: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle one device's indices and split off ``test_fraction`` as its test part.

    A device with at least two samples always keeps one of each.
    """
    order = np.random.default_rng(seed).permutation(indices)
    if test_fraction <= 0 or len(order) < 2:
        return order, order[:0]
    num_test = min(len(order) - 1, max(1, round(test_fraction * len(order))))
    return order[num_test:], order[:num_test]


def partition_pool(
    labels: np.ndarray,
    num_devices: int,
    method: str,
    seed: int,
    *,
    alpha: float = 0.5,
    classes_per_device: int = 2,
    min_samples: int = 10,
    sparse_fraction: float = 0.0,
    sparse_max_samples: int = 20,
) -> tuple[list[np.ndarray], list[int]]:
    """Partition a pool by ``method``; returns per-device positions and sparse device ids."""
    if method == "iid":
        parts = iid_partition(labels, num_devices, seed)
    elif method == "dirichlet":
        parts = dirichlet_partition(labels, num_devices, alpha, seed, min_samples)
    elif method == "pathological":
        parts = pathological_partition(labels, num_devices, classes_per_device, seed)
    elif method == "quantity_skew":
        parts = quantity_skew_partition(labels, num_devices, sparse_fraction, sparse_max_samples, seed)
        sizes = [len(p) for p in parts]
        return parts, [i for i, n in enumerate(sizes) if n <= sparse_max_samples]
    elif method == "given":
        raise PartitionError(
            "partition.method='given' uses the partition that ships with the data: see given_partition"
        )
    else:
        raise PartitionError(
            f"unknown partition.method {method!r}; valid choices: iid, dirichlet, pathological, "
            "quantity_skew, given"
        )
    return make_sparse(parts, sparse_fraction, sparse_max_samples, seed + 1)


@dataclass(frozen=True)
class GivenPartition:
    """A federated partition that came with the data, with the public parts carved out.

    Every array holds indices into the dataset. ``device_train[i]`` and
    ``device_test[i]`` belong to client ``client_ids[i]``.
    """

    client_ids: list[int]
    device_train: list[np.ndarray]
    device_test: list[np.ndarray]
    global_test: np.ndarray
    reference: np.ndarray


def given_partition(
    clients: np.ndarray,
    splits: np.ndarray | None,
    num_devices: int,
    seed: int,
    *,
    global_test_fraction: float,
    reference_size: int,
    device_test_fraction: float = 0.25,
) -> GivenPartition:
    """Use a partition that ships with the data ("pre-partitioned arrays") as it is.

    ``clients[j]`` is the client holding sample ``j``; ``splits[j]`` is 0 when
    the sample is in that client's train part and 1 in its test part (without
    ``splits`` each client's data is split with ``device_test_fraction``).
    The first ``num_devices`` clients (in id order) become the devices.

    The public parts are carved so that no client's *test* part changes, so
    personalised accuracy is measured on exactly the published test parts:

    * the **global test set** is a seeded sample of ``global_test_fraction``
      of all clients' test parts pooled (held out from every device's
      training, as the test parts are; it overlaps the devices' own test
      parts, which no device trains on either);
    * the **reference set** is ``reference_size`` samples drawn at random from
      all clients' train parts pooled, and removed from them (each client
      gives up about the same fraction of its train part), so it is disjoint
      from every device's training data.
    """
    clients = np.asarray(clients)
    ids = np.unique(clients).tolist()
    if num_devices < 1:
        raise PartitionError(f"num_devices must be >= 1, got {num_devices}")
    if num_devices > len(ids):
        raise PartitionError(
            f"simulation.num_devices={num_devices} but the data's partition has only {len(ids)} clients"
        )
    if not 0.0 < global_test_fraction <= 1.0:
        raise PartitionError(f"dataset.test_fraction must be in (0, 1], got {global_test_fraction}")
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for k, client in enumerate(ids):
        own = np.flatnonzero(clients == client)
        if splits is not None:
            train_parts.append(own[splits[own] == 0])
            test_parts.append(own[splits[own] == 1])
        else:
            train, test = split_train_test(own, device_test_fraction, seed * 100_003 + k)
            train_parts.append(np.sort(train))
            test_parts.append(np.sort(test))
    pooled_test = np.concatenate(test_parts)
    if len(pooled_test) == 0:
        raise PartitionError("the data's partition has no test parts to take the global test set from")
    num_global = max(1, round(global_test_fraction * len(pooled_test)))
    global_test = np.sort(rng.choice(pooled_test, size=num_global, replace=False))
    pooled_train = np.concatenate(train_parts)
    if reference_size >= len(pooled_train):
        raise PartitionError(
            f"reference.size={reference_size} would take all {len(pooled_train)} training samples"
        )
    reference = np.sort(rng.choice(pooled_train, size=reference_size, replace=False))
    is_reference = np.zeros(len(clients), dtype=bool)
    is_reference[reference] = True
    device_train = [part[~is_reference[part]] for part in train_parts[:num_devices]]
    for client, part in zip(ids, device_train):
        if len(part) == 0:
            raise PartitionError(
                f"client {client} has no training samples left after reference.size={reference_size} "
                "were drawn; lower reference.size"
            )
    return GivenPartition(ids[:num_devices], device_train, test_parts[:num_devices], global_test, reference)
