"""One source of truth: a strategy built with no arguments runs the settings `hetkd run` resolves.

A plug-in user writes ``SDDist(num_classes=10)`` in their own ServerApp; ``hetkd run
strategy=sd-dist`` builds the strategy from the run config. Both must run the same
algorithm, so every setting the strategy holds is compared with the run config's, key by
key. Only what the data forces (the class count, the public inputs) is given.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hetkd.config import HetkdConfig, resolve_config, to_yaml
from hetkd.data import build_federation
from hetkd.distill.exchange import ReferenceDistillSettings
from hetkd.distill.similarity import NeighbourSearch
from hetkd.sampling import Sampling
from hetkd.settings import flatten
from hetkd.simulations.registry import STRATEGIES, build_strategy
from hetkd.strategies import MEKD, FedAvg, FedDF, FedMD, LocalOnly, SDDist

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = torch.randn(16, 1, 8, 8)

#: each strategy with only what the data forces
PLUG_IN = {
    "local": lambda: LocalOnly(),
    "fedavg": lambda: FedAvg(),
    "fedmd": lambda: FedMD(num_classes=10),
    "sd-dist": lambda: SDDist(num_classes=10),
    "feddf": lambda: FedDF(num_classes=10, public_inputs=PUBLIC),
    "mekd": lambda: MEKD(num_classes=10, public_inputs=PUBLIC),
}


def _group(cfg: HetkdConfig, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _flat(settings: dict[str, object], cfg: HetkdConfig | None = None) -> dict[str, object]:
    """``{dotted run-config key: value}`` of a strategy's settings (or, with ``cfg``, of the run config's
    groups named like them). The ``strategy`` group holds the sampling fields."""
    out: dict[str, object] = {}
    for group, value in settings.items():
        source = value if cfg is None else _group(cfg, group)
        flat = flatten(source, group)
        if group == "strategy":
            sampling = set(flatten(Sampling(), "strategy"))
            flat = {k: v for k, v in flat.items() if k in sampling}
        out.update(flat)
    return out


def test_every_registered_strategy_has_a_plug_in_form():
    assert set(PLUG_IN) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(PLUG_IN))
def test_a_strategy_with_no_arguments_runs_the_settings_hetkd_run_resolves(name):
    cfg = resolve_config(None, [f"strategy={name}"])
    plug_in = PLUG_IN[name]()
    settings = plug_in.settings()
    assert "strategy" in settings
    expected, got = _flat(settings, cfg), _flat(settings)
    assert got.keys() == expected.keys()
    differ = {k: (got[k], expected[k]) for k in got if got[k] != expected[k]}
    assert differ == {}, f"{name}: plug-in default != run config (plug-in, run config): {differ}"
    assert plug_in.seed == cfg.seed


@pytest.mark.parametrize("name", ["fedmd", "sd-dist", "feddf", "mekd"])
def test_the_registry_hands_the_run_config_groups_to_the_strategy_unchanged(name, tmp_path):
    cfg = resolve_config(None, [f"strategy={name}", "strategy.kd.rho=0.45", "strategy.sd_dist.num_neighbours=3",
                                "strategy.ensemble.rho=0.6", "mekd.distill.temperature=4.0", "simulation.num_rounds=9",
                                "reference.size=50", f"output.dir={tmp_path}"])
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    settings = strategy.settings()
    assert _flat(settings) == _flat(settings, cfg)


def test_the_papers_settings_are_one_call_and_one_file_away():
    paper = SDDist.paper(num_classes=10)
    assert paper.exchange == ReferenceDistillSettings.paper() and paper.search == NeighbourSearch.paper()
    assert (paper.exchange.rho, paper.exchange.mix, paper.exchange.t_squared) == (0.9, "logits", False)
    assert paper.search.sizes(28) == (10, 20)  # the paper's K and Q for its 28 devices
    cfg = resolve_config(ROOT / "configs" / "strategy" / "sd_dist_paper.yaml")
    assert _flat(paper.settings(), cfg) == _flat(paper.settings())
    assert cfg.strategy.name == "sd-dist"


def test_neighbour_counts_follow_the_devices_on_record():
    """The same default serves 4 devices and 1,000: K stays below the candidates, so the choice filters."""
    search = NeighbourSearch()
    assert search.sizes(10) == (5, 7)  # the figures in docs/results were measured with these
    assert search.sizes(4) == (2, 3)
    assert search.sizes(1000) == (5, 7)
    for n in range(3, 60):
        k, q = search.sizes(n)
        assert 1 <= k < n and 1 <= q < n, n
    with pytest.raises(ValueError, match="population"):
        search.sizes(0)
