"""Data that ships its own federated partition (``partition.method=given``), and real MNIST.

The unit tests build small ``.npz`` files; the slow tests read the real MNIST with
HtFLlib's partition from ``../shared/data`` (skipped, with the reason, where that folder
is not beside the checkout: a user's install does not have it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from hetkd.config import ConfigError, resolve_config
from hetkd.data import DatasetUnavailableError, PartitionError, build_federation, given_partition, load_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HETKD_SHARED_DATA", ROOT.parent / "shared" / "data"))
MNIST = SHARED_DATA / "mnist_htfllib.npz"


def _partitioned_arrays(num_clients=5, per_client=40, seed=0):
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    x = rng.integers(0, 256, size=(n, 8, 8), dtype=np.uint8)
    clients = np.repeat(np.arange(num_clients), per_client)
    y = (clients * 2 + rng.integers(0, 2, size=n)) % 10  # each client holds two classes
    split = (rng.random(n) < 0.25).astype(np.uint8)
    return x, y, clients, split


def _write(tmp_path, name="fed.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_given_partition_keeps_test_parts_and_carves_public_sets_from_train_parts():
    _, _, clients, split = _partitioned_arrays()
    given = given_partition(clients, split, 4, seed=0, global_test_fraction=0.5, reference_size=20)
    assert given.client_ids == [0, 1, 2, 3]
    test_rows = np.flatnonzero(split == 1)
    for k, (train, test) in enumerate(zip(given.device_train, given.device_test)):
        own = np.flatnonzero(clients == k)
        np.testing.assert_array_equal(np.sort(test), own[split[own] == 1])  # the published test part
        assert set(train) <= set(own[split[own] == 0])
        assert not set(train) & set(given.reference)
    assert set(given.global_test) <= set(test_rows)
    assert len(given.global_test) == round(0.5 * len(test_rows))
    assert set(given.reference) <= set(np.flatnonzero(split == 0)) and len(given.reference) == 20
    # every train sample not drawn for the reference set stays with its client
    kept = sum(len(t) for t in given.device_train)
    in_reference = np.isin(given.reference, np.flatnonzero(clients < 4)).sum()
    assert kept == (split[clients < 4] == 0).sum() - in_reference


def test_given_partition_without_split_cuts_each_client_and_is_deterministic():
    _, _, clients, _ = _partitioned_arrays()
    a = given_partition(clients, None, 5, seed=3, global_test_fraction=0.5, reference_size=10, device_test_fraction=0.25)
    b = given_partition(clients, None, 5, seed=3, global_test_fraction=0.5, reference_size=10, device_test_fraction=0.25)
    for train, test, again in zip(a.device_train, a.device_test, b.device_test):
        assert len(test) == 10 and not set(train) & set(test)
        np.testing.assert_array_equal(test, again)
    np.testing.assert_array_equal(a.reference, b.reference)


def test_given_partition_rejects_impossible_settings_naming_them():
    _, _, clients, split = _partitioned_arrays()
    with pytest.raises(PartitionError, match="simulation.num_devices=6.*only 5 clients"):
        given_partition(clients, split, 6, seed=0, global_test_fraction=0.1, reference_size=10)
    with pytest.raises(PartitionError, match="reference.size=1000"):
        given_partition(clients, split, 2, seed=0, global_test_fraction=0.1, reference_size=1000)


def test_npz_with_a_partition_becomes_the_federation(tmp_path):
    x, y, clients, split = _partitioned_arrays()
    path = _write(tmp_path, x=x, y=y, client=clients.astype(np.int16), split=split)
    cfg = resolve_config(None, ["dataset.name=npz", f"dataset.path={path}", "partition.method=given",
                                "simulation.num_devices=5", "reference.size=20", "dataset.test_fraction=0.5"])
    fed = build_federation(cfg)
    assert fed.input_shape == (1, 8, 8) and len(fed.reference) == 20 and fed.reference_labelled
    for device in fed.devices:
        own = np.flatnonzero(clients == device.device_id)
        np.testing.assert_array_equal(np.sort(device.test.indices), own[split[own] == 1])
        assert set(device.train.labels) <= {device.device_id * 2 % 10, (device.device_id * 2 + 1) % 10}


def test_given_needs_data_with_a_partition(tmp_path):
    cfg = resolve_config(None, ["partition.method=given"])  # digits: no client array
    with pytest.raises(PartitionError, match="partition.method='given'.*'client' array"):
        build_federation(cfg)


def test_npz_partition_arrays_are_checked(tmp_path):
    x, y, clients, split = _partitioned_arrays()
    bad_split = _write(tmp_path, "bad_split.npz", x=x, y=y, client=clients, split=split + 2)
    with pytest.raises(DatasetUnavailableError, match=r"'split' must hold 0 \(train\) or 1 \(test\)"):
        load_dataset("npz", path=str(bad_split))
    short = _write(tmp_path, "short.npz", x=x, y=y, client=clients[:-1])
    with pytest.raises(DatasetUnavailableError, match="'client' has shape"):
        load_dataset("npz", path=str(short))


def test_missing_file_names_the_path_and_how_to_get_mnist(tmp_path):
    missing = tmp_path / "mnist_htfllib.npz"
    with pytest.raises(DatasetUnavailableError) as err:
        load_dataset("npz", path=str(missing))
    message = str(err.value)
    assert str(missing) in message and "dataset.name=mnist" in message and "shared/data" in message


def test_max_steps_caps_a_round_and_is_validated(tmp_path):
    from hetkd.clients.device import DistillClient

    overrides = ["partition.method=iid", "training.local_epochs=3", "training.batch_size=8"]
    client = DistillClient.from_config(resolve_config(None, [*overrides, "training.max_steps=3"]), 0)
    assert len(client.data.train) > 3 * 8
    assert client.fit(1)["samples_seen"] == 3 * 8
    # a budget longer than an epoch carries over into the next epochs, and no further
    per_epoch = len(client.data.train)
    steps = -(-per_epoch // 8) + 2
    client = DistillClient.from_config(resolve_config(None, [*overrides, f"training.max_steps={steps}"]), 0)
    assert client.fit(1)["samples_seen"] == per_epoch + 2 * 8
    with pytest.raises(ConfigError, match="training.max_steps"):
        resolve_config(None, ["training.max_steps=-1"])


# ------------------------------------------------------------------ the real MNIST file

needs_mnist = pytest.mark.skipif(not MNIST.is_file(), reason=f"{MNIST} is not beside the checkout")


@needs_mnist
def test_mnist_file_matches_htfllib_partition_record():
    record = json.loads((SHARED_DATA / "mnist_htfllib.config.json").read_text())
    ds = load_dataset("npz", path=str(MNIST))
    assert len(ds) == 70_000 and ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.partitioned and len(np.unique(ds.clients)) == record["num_clients"] == 20
    for client, label_counts in enumerate(record["Size of samples for labels in clients"]):
        expected = np.zeros(10, dtype=np.int64)
        for label, count in label_counts:
            expected[label] = count
        np.testing.assert_array_equal(np.bincount(ds.labels[ds.clients == client], minlength=10), expected)
        own = ds.splits[ds.clients == client]
        assert abs(own.mean() - 0.25) < 0.01, f"client {client}: the published split is 75/25"


@needs_mnist
@pytest.mark.slow
def test_two_rounds_of_sd_dist_on_four_mnist_clients(tmp_path):
    from hetkd.simulations import run

    cfg = resolve_config(
        ROOT / "configs" / "experiments" / "mnist_htfllib.yaml",
        [f"dataset.path={MNIST}", "simulation.num_devices=4", "num-server-rounds=2", "strategy.evaluate_every=1",
         "reference.size=200", "training.max_steps=10", "models.architectures=[cnn4,mlp_m]",
         "output.plots=false", "output.progress=false", f"output.dir={tmp_path / 'run'}"],
    )
    summary = run(cfg)
    federation = json.loads((Path(summary["out_dir"]) / "federation.json").read_text())
    record = json.loads((SHARED_DATA / "mnist_htfllib.config.json").read_text())
    for device in federation["devices"]:  # device i is client i, minus its share of the reference set
        published = sum(n for _, n in record["Size of samples for labels in clients"][device["device_id"]])
        assert 0.7 * published < device["train_size"] < 0.75 * published
    assert summary["failures"] == 0
    assert summary["final_personalised_accuracy_mean"] > 0.5, "4 skewed clients after 2 rounds"
    assert summary["final_personalised_accuracy_weighted"] is not None


def test_the_peer_protocol_config_trains_as_htfllib_does_with_its_kind_of_models():
    """configs/experiments/mnist_htfllib_protocol.yaml: one whole local epoch per round in batches of
    10, plain SGD at 0.01, every round evaluated, HtFLlib's FedAvgCNN and FedAvgMLP (same parameter
    counts as the published modules) beside a wider MLP, over its 20 clients."""
    from hetkd.models import build_model, count_parameters

    cfg = resolve_config(ROOT / "configs" / "experiments" / "mnist_htfllib_protocol.yaml")
    t = cfg.training
    assert (t.local_epochs, t.max_steps, t.batch_size, t.optimizer, t.lr, t.momentum, t.weight_decay) == (
        1, 0, 10, "sgd", 0.01, 0.0, 0.0)
    assert cfg.strategy.evaluate_every == 1 and cfg.partition.method == "given"
    archs = cfg.models.assign(cfg.simulation.num_devices)
    assert len(archs) == 20 and set(archs) == {"cnn4", "mlp_200", "mlp_512"}
    sizes = {name: count_parameters(build_model(name, (1, 28, 28), 10)) for name in set(archs)}
    # FedAvgCNN: conv 1->32 (5x5), conv 32->64 (5x5), FC 1024->512, FC 512->10; FedAvgMLP: 784->200->10
    assert sizes["cnn4"] == (25 * 32 + 32) + (25 * 32 * 64 + 64) + (1024 * 512 + 512) + (512 * 10 + 10)
    assert sizes["mlp_200"] == 784 * 200 + 200 + 200 * 10 + 10
    assert sizes["mlp_512"] == 784 * 512 + 512 + 512 * 10 + 10
