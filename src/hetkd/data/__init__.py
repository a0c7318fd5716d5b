"""Datasets, partitions and the per-run data picture (:class:`Federation`).
"""

from hetkd._exports import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hetkd.data.federation": (
        "DeviceData", "Federation", "FederationSpec", "ReferenceConfig", "build_federation",
    ),
    "hetkd.data.partition": (
        "PARTITION_METHODS", "GivenPartition", "PartitionConfig", "PartitionError", "dirichlet_partition",
        "given_partition", "iid_partition", "make_sparse", "partition_pool", "pathological_partition",
        "quantity_skew_partition", "split_train_test",
    ),
    "hetkd.data.sources": (
        "DATASETS", "ArrayDataset", "DataError", "DatasetConfig", "DatasetUnavailableError", "DataView", "checked_labels",
        "load_dataset",
    ),
})
