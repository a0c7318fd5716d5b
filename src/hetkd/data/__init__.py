"""Datasets, partitions and the per-run data picture (:class:`Federation`)."""

from hetkd.data.federation import DeviceData, Federation, build_federation
from hetkd.data.partition import (
    GivenPartition,
    PartitionError,
    dirichlet_partition,
    given_partition,
    iid_partition,
    make_sparse,
    partition_pool,
    pathological_partition,
    quantity_skew_partition,
    split_train_test,
)
from hetkd.data.sources import DATASETS, ArrayDataset, DatasetUnavailableError, DataView, load_dataset

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DataView",
    "DatasetUnavailableError",
    "DeviceData",
    "GivenPartition",
    "Federation",
    "PartitionError",
    "build_federation",
    "dirichlet_partition",
    "given_partition",
    "iid_partition",
    "load_dataset",
    "make_sparse",
    "partition_pool",
    "pathological_partition",
    "quantity_skew_partition",
    "split_train_test",
]
