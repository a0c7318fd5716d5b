"""The run configuration: precedence, Flower's run_config, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetkd.config import (
    ConfigError,
    HetkdConfig,
    flower_run_config,
    from_yaml,
    load_yaml,
    resolve_config,
    to_yaml,
)
from hetkd.models import ModelError
from hetkd.settings import SettingsError
from hetkd.simulations.b2kd import B2KDRunConfig
from hetkd.simulations.bench import BenchRunConfig
from hetkd.simulations.registry import check_strategy

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_match_the_documented_default_run():
    cfg = resolve_config()
    assert isinstance(cfg, HetkdConfig)
    assert cfg.dataset.name == "digits"
    assert cfg.partition.method == "dirichlet" and cfg.partition.alpha == 0.5
    assert cfg.simulation.num_devices == 10
    assert len(set(cfg.models.architectures)) >= 5


def test_yaml_then_overrides_take_precedence(tmp_path):
    file = tmp_path / "exp.yaml"
    file.write_text("partition:\n  alpha: 0.1\nsimulation:\n  num_rounds: 7\nseed: 3\n")
    cfg = resolve_config(file, ["seed=4", "num-server-rounds=2"])
    assert cfg.partition.alpha == 0.1  # from the file
    assert cfg.seed == 4  # override beats file
    assert cfg.simulation.num_rounds == 2  # Flower alias


def test_yaml_composes_fragments_listed_under_defaults(tmp_path):
    (tmp_path / "configs" / "dataset").mkdir(parents=True)
    (tmp_path / "configs" / "dataset" / "m1d.yaml").write_text("dataset:\n  name: mnist1d\n")
    exp = tmp_path / "configs" / "experiments"
    exp.mkdir()
    (exp / "x.yaml").write_text("defaults: [dataset/m1d]\nmodels:\n  architectures: [cnn1d_s, gru]\n")
    cfg = resolve_config(exp / "x.yaml")
    assert cfg.dataset.name == "mnist1d"
    assert cfg.models.architectures == ["cnn1d_s", "gru"]


def test_flower_run_config_decodes_lists_aliases_and_hyphens():
    cfg = resolve_config(
        overrides={
            "strategy": "fedavg",
            "num-server-rounds": 4,
            "models.architectures": "cnn_s",
            "models.assignment": "homogeneous",
            "training.local-epochs": 3,
            "config": "",
        }
    )
    assert cfg.strategy.name == "fedavg"
    assert cfg.simulation.num_rounds == 4
    assert cfg.models.architectures == ["cnn_s"]
    assert cfg.training.local_epochs == 3


def test_flower_run_config_round_trips_the_defaults():
    assert resolve_config(overrides=flower_run_config()) == resolve_config()


def test_yaml_round_trip_is_exact():
    cfg = resolve_config(None, ["partition.alpha=0.3", "models.architectures=[cnn_s,mlp_s]"])
    assert from_yaml(to_yaml(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("partition.alpah=0.1", "partition.alpah", "partition.alpha"),
        ("partiton.alpha=0.1", "partiton.alpha", "partition"),
        ("simulation.rounds=3", "simulation.rounds", "num_rounds"),
    ],
)
def test_misspelt_key_is_named_with_valid_choices(override, key, hint):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, [override])
    assert f"'{key}'" in str(err.value)
    assert hint in str(err.value)
    assert err.value.key == key


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ("num-server-rounds=-1", "simulation.num_rounds", "must be >= 1"),
        ("partition.alpha=0", "partition.alpha", "must be > 0"),
        ("partition.alpha=-0.5", "partition.alpha", "must be > 0"),
        ("dataset.name=mnst", "dataset.name", "valid choices: cifar10, cifar100, digits"),
        ("partition.method=dirichlett", "partition.method", "valid choices: iid, dirichlet"),
        ("training.optimizer=rmsprop", "training.optimizer", "valid choices: sgd, adam"),
        ("strategy.fraction_train=0", "strategy.fraction_train", "(0, 1]"),
        ("simulation.num_devices=0", "simulation.num_devices", ">= 1"),
        ("training.lr=abc", "training.lr", "expected float"),
        ("mekd.distill.hard_margin=0", "mekd.distill.hard_margin", "must be > 0"),
    ],
)
def test_bad_value_is_rejected_with_its_key(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        resolve_config(None, [override])
    assert key in str(err.value)
    assert fragment in str(err.value)


def test_unknown_architecture_names_the_list_index_and_choices():
    with pytest.raises(ModelError) as err:
        resolve_config(None, ["models.architectures=[cnn_s,resnet9]"])
    message = str(err.value)
    assert "models.architectures[1]" in message and "resnet9" in message
    assert "did you mean 'resnet8'" in message and "cnn_s" in message


def test_unknown_strategy_is_rejected_with_choices():
    cfg = resolve_config(None, ["strategy=fedavgg"])
    with pytest.raises(ConfigError) as err:
        check_strategy(cfg)
    assert "strategy.name" in str(err.value) and "fedavg" in str(err.value) and "local" in str(err.value)


def test_fedavg_refuses_heterogeneous_assignment():
    with pytest.raises(ConfigError) as err:
        check_strategy(resolve_config(None, ["strategy=fedavg"]))
    assert "models.assignment" in str(err.value) and "homogeneous" in str(err.value)
    check_strategy(resolve_config(None, ["strategy=fedavg", "models.assignment=homogeneous"]))


def test_per_device_assignment_needs_one_architecture_per_device():
    with pytest.raises(ConfigError, match="models.architectures"):
        resolve_config(None, ["models.assignment=per_device", "simulation.num_devices=3",
                              "models.architectures=[cnn_s,mlp_s]"])


@pytest.mark.parametrize(("value", "says"), [("linaer", "did you mean 'linear'"), ("digits-5", "not the group")])
def test_a_bad_private_architecture_is_refused_naming_its_key(value, says):
    with pytest.raises(SettingsError, match="models.private_architecture") as err:
        resolve_config(None, [f"models.private_architecture={value}"])
    assert says in str(err.value)


def test_missing_yaml_file_is_named():
    with pytest.raises(ConfigError, match="does-not-exist.yaml"):
        resolve_config("does-not-exist.yaml")


def test_every_shipped_yaml_resolves():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    experiments = [f for f in files if "experiments" in f.parts]
    assert experiments, "configs/experiments/ ships no experiment"
    commands = {"b2kd": B2KDRunConfig, "bench": BenchRunConfig}  # a command's own group needs its schema
    for file in experiments:
        groups = set(load_yaml(file))
        schema = next((s for group, s in commands.items() if group in groups), HetkdConfig)
        cfg = resolve_config(file, schema=schema)
        check_strategy(cfg)


def test_flower_alias_and_its_key_reconcile_in_a_full_run_config():
    """`flwr run --run-config "strategy.name='mekd' strategy.kd.rho=0.5"` must work: TOML cannot
    hold `strategy='x'` beside `strategy.kd.rho`, so the app's run config carries both names."""
    from hetkd.config import ConfigError, flower_run_config, resolve_config

    table = flower_run_config()
    assert table["strategy"] == table["strategy.name"] and table["num-server-rounds"] == table["simulation.num_rounds"]
    assert resolve_config(overrides=table | {"strategy": "fedmd"}).strategy.name == "fedmd"
    assert resolve_config(overrides=table | {"strategy.name": "local", "strategy.kd.rho": 0.5}).strategy.name == "local"
    with pytest.raises(ConfigError, match="strategy.name.*given twice"):
        resolve_config(overrides=table | {"strategy": "fedmd", "strategy.name": "local"})
