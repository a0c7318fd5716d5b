"""Datasets, partitioners and the per-run data picture."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hetkd.config import resolve_config
from hetkd.data import (
    DatasetUnavailableError,
    PartitionError,
    build_federation,
    dirichlet_partition,
    iid_partition,
    load_dataset,
    make_sparse,
    pathological_partition,
    quantity_skew_partition,
    split_train_test,
)

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def _assert_disjoint_cover(parts, n):
    allidx = np.concatenate(parts)
    assert len(allidx) == len(set(allidx.tolist())), "a sample is on two devices"
    return allidx


def _dominant_share(parts, labels):
    """Mean share of a device's most frequent class."""
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological", "quantity_skew"])
def test_partition_sizes_add_up_and_are_disjoint(method):
    if method == "iid":
        parts = iid_partition(LABELS, 10, seed=0)
        assert sorted(len(p) for p in parts) == [100] * 10
    elif method == "dirichlet":
        parts = dirichlet_partition(LABELS, 10, alpha=0.5, seed=0, min_samples=10)
        assert min(len(p) for p in parts) >= 10
    elif method == "pathological":
        parts = pathological_partition(LABELS, 10, classes_per_device=2, seed=0)
        assert all(len(np.unique(LABELS[p])) <= 2 for p in parts)
    else:
        parts = quantity_skew_partition(LABELS, 10, sparse_fraction=0.5, sparse_max_samples=20, seed=0)
        sizes = sorted(len(p) for p in parts)
        assert sizes[:5] == [20] * 5 and min(sizes[5:]) >= 179
    allidx = _assert_disjoint_cover(parts, len(LABELS))
    if method in ("iid", "dirichlet", "quantity_skew"):
        assert len(allidx) == len(LABELS), "the partition must use the whole pool"


PARTITIONS = {
    "iid": lambda seed: iid_partition(LABELS, 10, seed=seed),
    "dirichlet": lambda seed: dirichlet_partition(LABELS, 10, alpha=0.5, seed=seed, min_samples=10),
    "pathological": lambda seed: pathological_partition(LABELS, 10, classes_per_device=2, seed=seed),
    "quantity_skew": lambda seed: quantity_skew_partition(LABELS, 10, sparse_fraction=0.5, sparse_max_samples=20,
                                                          seed=seed),
}


def _no_flwr_datasets(*_: object) -> None:
    raise AssertionError("flwr-datasets was asked for a partition the cache holds")


@pytest.mark.parametrize("method", sorted(PARTITIONS))
def test_a_partition_is_made_once_then_read_back_from_the_cache(method, tmp_path, monkeypatch):
    from hetkd.data import partition

    monkeypatch.setenv("HETKD_CACHE_DIR", str(tmp_path))
    made = PARTITIONS[method](0)
    assert len(list((tmp_path / "partitions").glob("*.npz"))) == 1
    monkeypatch.setattr(partition, "_flwr_datasets_partition", _no_flwr_datasets)
    again = PARTITIONS[method](0)
    assert len(again) == len(made) and all(np.array_equal(a, b) for a, b in zip(again, made))
    with pytest.raises(AssertionError, match="flwr-datasets was asked"):  # another seed: another partition
        PARTITIONS[method](1)


def test_a_second_process_builds_the_same_devices_without_importing_hf_datasets(tmp_path, monkeypatch):
    from hetkd.data import build_federation

    monkeypatch.setenv("HETKD_CACHE_DIR", str(tmp_path))
    cfg = resolve_config(overrides={"seed": 9173})  # a seed no other test builds: this process makes it
    made = build_federation(cfg)
    code = ("import sys; from hetkd.config import resolve_config; from hetkd.data import build_federation; "
            "fed = build_federation(resolve_config(overrides={'seed': 9173})); "
            "print([d.train.indices.tolist() for d in fed.devices], 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{[d.train.indices.tolist() for d in made.devices]} False"


def test_a_damaged_cache_entry_is_made_again_and_replaced(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HETKD_CACHE_DIR", str(tmp_path))
    made = PARTITIONS["dirichlet"](0)
    (entry,) = (tmp_path / "partitions").glob("*.npz")
    entry.write_bytes(b"not an npz")
    with caplog.at_level("WARNING", logger="hetkd.data.partition_cache"):
        again = PARTITIONS["dirichlet"](0)
    assert all(np.array_equal(a, b) for a, b in zip(again, made)) and "unreadable" in caplog.text
    np.savez(entry, count=np.int64(2), part0=np.array([0, 1]), part1=np.array([1, 5000]))  # not a partition
    caplog.clear()
    with caplog.at_level("WARNING", logger="hetkd.data.partition_cache"):
        again = PARTITIONS["dirichlet"](0)
    assert all(np.array_equal(a, b) for a, b in zip(again, made)) and "does not hold a partition" in caplog.text
    from hetkd.data.partition_cache import load_parts, partition_key  # replaced by a good entry
    assert len(list((tmp_path / "partitions").glob("*"))) == 1 and load_parts(entry.stem, len(LABELS)) is not None
    assert partition_key("DirichletPartitioner", {}, LABELS) != partition_key("DirichletPartitioner", {}, LABELS[::-1])


def test_an_unwritable_or_disabled_cache_never_stops_a_partition(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("HETKD_CACHE_DIR", str(blocked))
    with caplog.at_level("WARNING", logger="hetkd.data.partition_cache"):
        parts = PARTITIONS["iid"](0)
    assert len(parts) == 10 and str(blocked) in caplog.text and "HETKD_CACHE_DIR" in caplog.text
    monkeypatch.setenv("HETKD_CACHE_DIR", "")
    assert len(PARTITIONS["iid"](0)) == 10 and not list(tmp_path.rglob("*.npz"))


def test_small_alpha_gives_skewed_devices_and_large_alpha_near_iid():
    skewed = _dominant_share(dirichlet_partition(LABELS, 10, alpha=0.1, seed=0, min_samples=5), LABELS)
    mild = _dominant_share(dirichlet_partition(LABELS, 10, alpha=100.0, seed=0, min_samples=5), LABELS)
    assert skewed > 0.5 > 0.25 > mild


def test_partitions_are_deterministic_in_the_seed():
    a = dirichlet_partition(LABELS, 10, alpha=0.5, seed=1)
    b = dirichlet_partition(LABELS, 10, alpha=0.5, seed=1)
    c = dirichlet_partition(LABELS, 10, alpha=0.5, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_impossible_partitions_name_the_setting():
    with pytest.raises(PartitionError, match="min_samples"):
        dirichlet_partition(LABELS, 10, alpha=0.5, seed=0, min_samples=200)
    with pytest.raises(PartitionError, match="num_devices"):
        iid_partition(LABELS[:5], 10, seed=0)
    with pytest.raises(PartitionError, match="classes_per_device"):
        pathological_partition(LABELS, 10, classes_per_device=11, seed=0)


def test_make_sparse_cuts_a_fraction_of_devices():
    parts = iid_partition(LABELS, 10, seed=0)
    sparse_parts, ids = make_sparse(parts, 0.5, 20, seed=0)
    assert len(ids) == 5
    for i, p in enumerate(sparse_parts):
        assert len(p) == (20 if i in ids else 100)
        assert set(p.tolist()) <= set(parts[i].tolist())


def test_split_train_test_keeps_one_of_each():
    train, test = split_train_test(np.arange(3), 0.25, seed=0)
    assert len(train) == 2 and len(test) == 1
    train, test = split_train_test(np.arange(100), 0.25, seed=0)
    assert len(test) == 25 and not set(train) & set(test)


def test_offline_datasets_have_the_documented_shapes():
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10 and len(digits) == 1797
    x = digits.inputs(np.arange(10))
    assert x.dtype.is_floating_point and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    m1d = load_dataset("mnist1d", num_samples=500)
    assert m1d.input_shape == (1, 40) and len(m1d) == 500
    assert load_dataset("mnist1d", num_samples=500) is m1d  # generated once per process


def test_digits_are_scikit_learns_arrays_read_without_importing_sklearn_datasets(monkeypatch):
    from sklearn.datasets import load_digits

    from hetkd.data import sources

    bunch = load_digits()
    digits = sources._digits()
    assert np.array_equal(digits.raw[:, 0], bunch.images.astype(np.uint8))
    assert np.array_equal(digits.labels, bunch.target)
    monkeypatch.setattr(sources, "_shipped_digits_table", lambda: None)  # file moved: sklearn's own loader
    fallback = sources._digits()
    assert np.array_equal(fallback.raw, digits.raw) and np.array_equal(fallback.labels, digits.labels)
    code = ("import sys; from hetkd.data.sources import _digits; _digits(); "
            "assert 'sklearn.datasets' not in sys.modules, 'sklearn.datasets imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mnist1d_generation_leaves_numpy_global_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    load_dataset("mnist1d", num_samples=300)
    assert np.random.rand() == expected


def test_npz_source_reads_user_arrays(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, x=np.random.rand(30, 12).astype(np.float32), y=np.arange(30) % 3)
    ds = load_dataset("npz", path=str(path))
    assert ds.input_shape == (1, 12) and ds.num_classes == 3
    bad = tmp_path / "bad.npz"
    np.savez(bad, inputs=np.zeros(3))
    with pytest.raises(DatasetUnavailableError, match="lacks array"):
        load_dataset("npz", path=str(bad))
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        load_dataset("npz", path=str(tmp_path / "none.npz"))


def test_missing_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DatasetUnavailableError) as err:
        load_dataset("mnist", root=str(tmp_path), download=False)
    message = str(err.value)
    assert str(tmp_path) in message and "dataset.root" in message and "digits" in message


def test_federation_parts_are_disjoint_deterministic_views():
    cfg = resolve_config(None, ["reference.size=300"])
    fed = build_federation(cfg)
    groups = [fed.global_test.indices, fed.reference.indices]
    for d in fed.devices:
        groups += [d.train.indices, d.test.indices]
    allidx = np.concatenate(groups)
    assert len(allidx) == len(set(allidx.tolist())) == len(fed.dataset)
    assert len(fed.reference) == 300 and len(fed.devices) == 10
    assert all(d.train.base is fed.dataset for d in fed.devices), "partitions must be views, not copies"
    again = build_federation(resolve_config(None, ["reference.size=300", "seed=0"]))
    assert again is fed  # cached per process and config
    other = build_federation(resolve_config(None, ["reference.size=300", "seed=1"]))
    assert not np.array_equal(other.devices[0].train.indices, fed.devices[0].train.indices)


def test_federation_sparse_devices_are_marked_and_small():
    fed = build_federation(resolve_config(None, ["partition.sparse_fraction=0.5"]))
    sparse = [d for d in fed.devices if d.sparse]
    assert len(sparse) == 5
    assert all(len(d.train) + len(d.test) <= 20 for d in sparse)
    assert fed.summary()["devices"][sparse[0].device_id]["sparse"] is True


def test_reference_from_another_dataset_must_match_the_shape():
    cfg = resolve_config(None, ["reference.source=mnist1d", "simulation.num_devices=3"])
    with pytest.raises(ValueError, match="reference.source"):
        build_federation(cfg)
