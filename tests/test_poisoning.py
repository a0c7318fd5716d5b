"""Robustness to a poisoning minority: the outlier test, robust aggregates, adversarial devices,
and the honest devices' figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hetkd import protocol as P
from hetkd.adversary import AdversarySettings, adversarial_devices, label_permutation, poison_logits
from hetkd.clients.device import DistillClient
from hetkd.config import ConfigError, resolve_config, to_yaml
from hetkd.data import build_federation
from hetkd.distill.codec import decode_answers
from hetkd.distill.divergence import check_reference_labels, mean_divergence, pairwise_distance
from hetkd.distill.ensemble import (
    EnsembleSettings,
    answer_outliers,
    answer_quality,
    class_balanced,
    ensemble_responses,
)
from hetkd.distill.exchange import mix_targets, robust_targets, teacher_targets, uniform_weights
from hetkd.distill.queries import QuerySpec, reference_rows, resolve_queries
from hetkd.distill.robust import robust_aggregate, robust_outliers, robust_probabilities, screened_weights
from hetkd.distill.similarity import NeighbourSearch, candidate_pool, outlier_devices, reference_quality
from hetkd.results import RunRecorder, final_figures, honest_figures, read_metrics
from hetkd.simulations.compare import _markdown
from hetkd.simulations.registry import build_strategy
from hetkd.strategies import FedDF, FedMD
from tests.conftest import InProcessGrid, small_config

# --------------------------------------------------------------------------- the outlier test


def test_robust_outliers_flags_the_far_tail_only():
    scores = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.2, 0.8, 5.0])
    assert robust_outliers(scores, 3.0).tolist() == [False] * 7 + [True]
    # a low score is never an outlier: lower is better
    assert not robust_outliers(torch.tensor([1.0, 1.1, 0.9, 1.05, -9.0]), 3.0).any()
    # MAD 0 (more than half equal): the mean absolute deviation stands in
    assert robust_outliers(torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0]), 3.0).tolist() == [False] * 4 + [True]
    assert not robust_outliers(torch.ones(5), 3.0).any()  # nobody stands out
    # non-finite scores are outliers; fewer than 3 finite scores: no test on them
    assert robust_outliers(torch.tensor([1.0, math.inf, 2.0]), 3.0).tolist() == [False, True, False]
    assert robust_outliers(torch.tensor([1.0, 100.0]), 3.0).tolist() == [False, False]
    with pytest.raises(ValueError, match="threshold"):
        robust_outliers(scores, 0.0)


def test_robust_outliers_keeps_a_clean_normal_population():
    scores = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    share = float(robust_outliers(scores, 3.0).float().mean())
    assert share < 0.01  # ~0.13 % beyond 3 sigma for a normal


def test_mean_divergence_is_the_mean_of_the_off_diagonal_row():
    logits = torch.randn(6, 20, 4, generator=torch.Generator().manual_seed(1)) * 2
    d = pairwise_distance(logits, 3.0)
    expected = d.sum(1) / 5
    assert torch.allclose(mean_divergence(logits, 3.0), expected, atol=1e-5)
    sampled = mean_divergence(logits, 3.0, max_columns=3)  # columns 0, 2/3, 5: evenly spaced
    assert sampled.shape == (6,) and torch.isfinite(sampled).all()


def _population(n=8, r=60, c=5, bad=(), seed=0):
    """Devices that predict the labels well, and ``bad`` ones that predict a permutation of them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (r,), generator=g)
    logits = torch.randn(n, r, c, generator=g)
    truth = F.one_hot(labels, c).float() * 4
    perm = torch.roll(torch.arange(c), 1)
    for i in range(n):
        logits[i] += truth[:, perm] if i in bad else truth
    return logits, labels


def test_the_quality_floor_keeps_a_poisoner_out_even_when_q_holds_everyone():
    logits, labels = _population(bad=(3,))
    quality = reference_quality(logits, labels)
    search = NeighbourSearch(num_neighbours=7, num_candidates=8, neighbour_fraction=1.0, candidate_fraction=1.0)
    plan = search.plan(logits, list(range(8)), temperature=3.0, quality=quality)
    assert plan.outliers == [3]
    assert all(3 not in row for row in plan.neighbours)
    assert all(len(row) == 6 for i, row in enumerate(plan.neighbours) if i != 3)  # everyone else
    # without the test the poisoner teaches every honest device (K >= n - 1)
    off = NeighbourSearch(num_neighbours=7, num_candidates=8, neighbour_fraction=1.0, candidate_fraction=1.0,
                          outlier_test="none")
    plan = off.plan(logits, list(range(8)), temperature=3.0, quality=quality)
    assert plan.outliers == [] and all(3 in row for i, row in enumerate(plan.neighbours) if i != 3)


def test_without_labels_the_divergence_test_finds_the_poisoner():
    logits, _ = _population(bad=(5,))
    for test in ("auto", "divergence"):
        search = NeighbourSearch(num_neighbours=7, num_candidates=8, neighbour_fraction=1.0, candidate_fraction=1.0,
                                 outlier_test=test)
        plan = search.plan(logits, list(range(8)), temperature=3.0)
        assert plan.outliers == [5]
        assert all(5 not in row for row in plan.neighbours)
    # 'quality' needs labels: without them it tests nothing
    search = NeighbourSearch(outlier_test="quality")
    assert search.outliers(logits, temperature=3.0) == []


def test_candidate_pool_takes_the_best_q_among_those_not_excluded():
    quality = torch.tensor([0.5, 0.1, 0.3, 0.2, 0.9])
    assert candidate_pool(5, "quality_distance", quality, 3) == [1, 3, 2]
    assert candidate_pool(5, "quality_distance", quality, 3, excluded=[3]) == [1, 2, 0]
    assert candidate_pool(5, "distance", None, None, excluded=[0, 4]) == [1, 2, 3]


# --------------------------------------------------------------------------- robust aggregates


def test_robust_aggregates_coordinate_wise():
    values = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -100.0]])
    assert robust_aggregate(values, "mean").tolist() == pytest.approx([26.5, -10.0])
    assert robust_aggregate(values, "median").tolist() == pytest.approx([2.5, 15.0])  # mean of the two middle
    assert robust_aggregate(values, "trimmed_mean", 0.25).tolist() == pytest.approx([2.5, 15.0])
    assert robust_aggregate(values[:3], "median").tolist() == pytest.approx([2.0, 20.0])
    assert robust_aggregate(values, "trimmed_mean", 0.0).tolist() == pytest.approx([26.5, -10.0])
    with pytest.raises(ValueError, match="aggregate"):
        robust_aggregate(values, "mode")


def test_robust_probabilities_are_distributions_and_shrug_off_a_minority():
    g = torch.Generator().manual_seed(2)
    honest = F.softmax(torch.randn(1, 10, 5, generator=g) * 2 + 0.1 * torch.randn(4, 10, 5, generator=g), -1)
    liar = torch.zeros(1, 10, 5)
    liar[..., 0] = 1.0
    probs = torch.cat([honest, liar])
    for method in ("median", "trimmed_mean"):
        agg = robust_probabilities(probs, method, 0.2)
        assert torch.allclose(agg.sum(-1), torch.ones(10), atol=1e-6)
        assert float((agg - honest.mean(0)).abs().max()) < float((probs.mean(0) - honest.mean(0)).abs().max())
    # a row whose median is all zero (one-hot votes, no majority) falls back to the mean
    votes = F.one_hot(torch.tensor([[0], [1], [2]]), 3).float()
    assert torch.allclose(robust_probabilities(votes, "median")[0], torch.full((3,), 1 / 3))


def test_robust_targets_mean_equals_mix_targets_and_median_resists_a_poisoner():
    logits, _ = _population(n=5, bad=(4,))
    weights = uniform_weights(5)
    mean = robust_targets(weights, logits, "probs", 3.0, "mean")
    assert torch.allclose(mean, mix_targets(weights, logits, "probs", 3.0), atol=1e-4)
    median = robust_targets(weights, logits, "probs", 3.0, "median")
    expected = 3.0 * robust_probabilities(F.softmax(logits.double() / 3.0, -1), "median").log()
    assert torch.allclose(median[0], expected.float(), atol=1e-4) and torch.allclose(median[0], median[3])
    honest = mix_targets(uniform_weights(4), logits[:4], "probs", 3.0)[0]
    assert float((median[0] - honest).abs().mean()) < float((mean[0] - honest).abs().mean())
    # per learner: its own teachers (SD-Dist's neighbours); rows without teachers stay zero
    w = torch.zeros(5, 5)
    w[0, [1, 2, 3]] = 1 / 3
    out = robust_targets(w, logits, "logits", 1.0, "median")
    assert torch.allclose(out[0], logits[[1, 2, 3]].median(0).values) and (out[1:] == 0).all()


def test_ensemble_responses_robust_aggregate_then_class_balance():
    honest = F.softmax(torch.randn(4, 12, 3, generator=torch.Generator().manual_seed(3)), -1)
    answers = torch.cat([honest, F.one_hot(torch.zeros(1, 12, dtype=torch.long), 3).float()])
    plain, kind = ensemble_responses(answers, "soft", torch.ones(1, 5))
    assert kind == "soft" and torch.allclose(plain[0], answers.mean(0), atol=1e-6)
    robust, _ = ensemble_responses(answers, "soft", torch.ones(1, 5), balance=True, aggregate="median")
    assert torch.allclose(robust[0], class_balanced(robust_probabilities(answers, "median")), atol=1e-6)
    # a weight row says who teaches: zero weight leaves a teacher out of its median
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    only, _ = ensemble_responses(answers, "soft", w, aggregate="median")
    assert torch.allclose(only[0], robust_probabilities(answers[:3], "median"), atol=1e-6)
    hard = F.one_hot(torch.tensor([[0, 1], [0, 1], [2, 2]]), 3).float()
    voted, kind = ensemble_responses(hard, "hard", torch.ones(1, 3), aggregate="median")
    assert kind == "hard" and voted[0].argmax(1).tolist() == [0, 1]


def test_screened_weights_drop_the_outliers_and_keep_each_rows_total():
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.5]])
    kept = screened_weights(w, [2])
    assert torch.allclose(kept, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3], [0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.5]]))
    assert torch.equal(screened_weights(w.to_sparse(), []), w)
    with pytest.raises(ValueError, match="outliers must be column indices"):
        screened_weights(w, [4])


def test_outlier_devices_by_quality_by_divergence_or_not_at_all():
    logits, labels = _population(bad=(2, 6))
    quality = reference_quality(logits, labels)
    assert outlier_devices(logits, temperature=3.0, quality=quality) == [2, 6]  # auto: quality when known
    assert outlier_devices(logits, temperature=3.0) == [2, 6]  # auto: divergence without labels
    assert outlier_devices(logits, temperature=3.0, test="none", quality=quality) == []
    with pytest.raises(ValueError, match="unknown outlier test 'loss'"):
        outlier_devices(logits, temperature=3.0, test="loss")


def test_the_screened_mean_is_the_mean_of_the_honest_teachers():
    logits, labels = _population(n=6, bad=(1,))
    made = teacher_targets(uniform_weights(6), logits, space="probs", temperature=3.0, aggregate="screened_mean",
                           quality=reference_quality(logits, labels))
    honest = [0, 2, 3, 4, 5]
    expected = mix_targets(uniform_weights(5, include_self=True), logits[honest], "probs", 3.0)[0]
    assert made.screened == [1] and made.taught.all()
    assert torch.allclose(made.targets[0], expected, atol=1e-4) and torch.allclose(made.targets[1], expected, atol=1e-4)
    # the plain mean is what it was; a learner whose only teacher is screened gets no target
    plain = teacher_targets(uniform_weights(6), logits, space="probs", temperature=3.0)
    assert plain.screened == [] and torch.allclose(plain.targets, mix_targets(uniform_weights(6), logits, "probs", 3.0))
    w = torch.zeros(6, 6)
    w[0, 1] = 1.0
    w[3, [0, 2]] = 0.5
    alone = teacher_targets(w, logits, aggregate="screened_mean")
    assert alone.taught.tolist() == [False, False, False, True, False, False]
    with pytest.raises(ValueError, match="unknown aggregate 'mode'"):
        teacher_targets(w, logits, aggregate="mode")


def test_ensemble_responses_screened_mean_leaves_the_divergent_teacher_out():
    logits, _ = _population(n=6, r=40, bad=(4,))
    answers = F.softmax(logits, -1)
    screened, kind = ensemble_responses(answers, "soft", torch.ones(1, 6), aggregate="screened_mean")
    honest = answers[[0, 1, 2, 3, 5]].mean(0)
    assert kind == "soft" and torch.allclose(screened[0], honest, atol=1e-6)
    with pytest.raises(ValueError, match="unknown aggregate"):
        ensemble_responses(answers, "soft", torch.ones(1, 6), aggregate="mode")



def _label_skewed_experts(honest=8, colluding=2, r=200, c=10, seed=0):
    """Honest devices that each know 3 classes (and answer one of them on every other input),
    and ``colluding`` devices trained on one shared label permutation (they agree with each other)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (r,), generator=g)
    rows = []
    for _ in range(honest):
        known = torch.randperm(c, generator=g)[:3]
        rows.append(torch.where(torch.isin(labels, known), labels, known[torch.randint(0, 3, (r,), generator=g)]))
    rows += [torch.roll(torch.arange(c), 1)[labels]] * colluding
    return F.softmax(6.0 * F.one_hot(torch.stack(rows), c).float(), -1), labels


def test_labels_find_colluding_poisoners_that_the_divergence_screen_misses():
    answers, labels = _label_skewed_experts()
    quality = answer_quality(answers, "soft", labels)
    assert answer_outliers(answers, "soft") == []  # honest experts disagree as much as the pair does
    assert answer_outliers(answers, "soft", quality) == [8, 9]
    screened, _ = ensemble_responses(answers, "soft", torch.ones(1, 10), aggregate="screened_mean", quality=quality)
    assert torch.allclose(screened[0], answers[:8].mean(0), atol=1e-6)
    # logits and hard answers score alike; one loss per teacher
    assert answer_outliers(answers.log(), "logits", answer_quality(answers.log(), "logits", labels)) == [8, 9]
    hard = F.one_hot(answers.argmax(-1), 10).float()
    assert answer_outliers(hard, "hard", answer_quality(hard, "hard", labels)) == [8, 9]
    with pytest.raises(ValueError, match=r"one loss per teacher \(10,\), got \(9,\)"):
        answer_outliers(answers, "soft", quality[:9])


def test_a_reference_query_names_its_rows():
    spec = QuerySpec(source="reference", seed=7, count=30)
    rows = reference_rows(spec, 100)
    assert len(rows.unique()) == 30 and int(rows.max()) < 100
    inputs = torch.arange(100.0)[:, None].repeat(1, 3)
    assert torch.equal(resolve_queries(spec, reference_inputs=inputs)[:, 0].long(), rows)
    with pytest.raises(ValueError, match="asks for 30 reference rows, the reference set has 20"):
        reference_rows(spec, 20)
    with pytest.raises(ValueError, match="this 'generator' query names no reference rows"):
        reference_rows(QuerySpec(source="generator", seed=7, count=30), 100)


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([0, 1, 12, 3]), r"classes in \[0, 10\); rows \[2\] hold \[12\]"),
    (torch.tensor([0, -1, 2, 3]), r"rows \[1\] hold \[-1\]"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), "integer classes, got dtype torch.float32"),
    (torch.tensor([0, 1, 2]), r"shape \(4,\), got \(3,\)"),
])
def test_bad_reference_labels_are_refused_naming_the_values(labels, message):
    with pytest.raises(ValueError, match=message):
        check_reference_labels(labels, 4, 10)
    with pytest.raises(ValueError, match=message):
        FedDF(num_classes=10, public_inputs=torch.zeros(4, 3), reference_labels=labels, ensemble=EnsembleSettings(student=""))
    with pytest.raises(ValueError, match=message):
        FedMD(num_classes=10, num_reference=4, reference_labels=labels)


# --------------------------------------------------------------------------- adversarial devices


def test_the_adversaries_are_a_seeded_choice_of_the_fraction():
    assert adversarial_devices(10, 0.0, 0) == []
    chosen = adversarial_devices(10, 0.2, 0)
    assert len(chosen) == 2 and chosen == adversarial_devices(10, 0.2, 0) == sorted(chosen)
    assert len(adversarial_devices(10, 0.3, 1)) == 3 and len(adversarial_devices(10, 0.25, 1)) == 3  # rounded
    assert {tuple(adversarial_devices(10, 0.2, s)) for s in range(5)} != {tuple(chosen)}
    assert AdversarySettings(fraction=0.3).count(10) == 3


def test_the_label_permutation_moves_every_class():
    for seed in range(5):
        perm = label_permutation(10, seed)
        assert sorted(perm.tolist()) == list(range(10)) and (perm != np.arange(10)).all()
    assert (label_permutation(10, 0) == label_permutation(10, 0)).all()


def test_poisoned_logits():
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(4))
    assert poison_logits(logits, "permuted_labels", 1) is logits
    assert torch.equal(poison_logits(logits, "inverted_predictions", 1), -logits)
    shuffled = poison_logits(logits, "random_predictions", 1)
    assert torch.equal(shuffled.sort(1).values, logits.sort(1).values)  # as confident, another class
    assert not torch.equal(shuffled, logits) and torch.equal(shuffled, poison_logits(logits, "random_predictions", 1))


def test_the_data_picture_marks_adversaries_and_permutes_only_their_training_labels(tmp_path):
    clean = build_federation(small_config(tmp_path, devices=10))
    cfg = small_config(tmp_path, "adversary.fraction=0.2", devices=10)
    poisoned = build_federation(cfg)
    bad = adversarial_devices(10, 0.2, cfg.seed)
    perm = label_permutation(10, cfg.seed)
    assert poisoned.adversaries == bad and clean.adversaries == []
    for c, p in zip(clean.devices, poisoned.devices):
        assert np.array_equal(c.train.indices, p.train.indices) and np.array_equal(c.test.labels, p.test.labels)
        expected = perm[c.train.labels] if c.device_id in bad else c.train.labels
        assert np.array_equal(p.train.labels, expected)
        assert np.array_equal(next(p.train.batches(1000))[1].numpy(), expected)
    summary = poisoned.summary()
    assert [d["device_id"] for d in summary["devices"] if d.get("adversary") == "permuted_labels"] == bad
    assert not any("adversary" in d for d in clean.summary()["devices"])  # clean runs: federation.json as before
    kind = build_federation(small_config(tmp_path, "adversary.fraction=0.2", "adversary.kind=inverted_predictions",
                                         devices=10))
    assert kind.adversaries == bad
    assert all(np.array_equal(c.train.labels, k.train.labels) for c, k in zip(clean.devices, kind.devices))


def test_a_device_learns_what_it_is_from_the_run_config(tmp_path):
    cfg = small_config(tmp_path, "adversary.fraction=0.5", "adversary.kind=random_predictions")
    bad = adversarial_devices(4, 0.5, cfg.seed)
    for device in range(4):
        client = DistillClient.from_config(cfg, device)
        logits = client.reference_logits()
        sent = client.outgoing(logits, server_round=2)
        if device in bad:
            assert client.adversary == "random_predictions" and not torch.equal(sent, logits)
        else:
            assert client.adversary is None and sent is logits
    assert DistillClient.from_config(small_config(tmp_path), 0).adversary is None


@pytest.mark.parametrize(("override", "key"), [
    ("adversary.fraction=1.0", "adversary.fraction"),
    ("adversary.fraction=-0.1", "adversary.fraction"),
    ("adversary.fraction=0.9", "adversary.fraction"),  # 4 devices: all of them
    ("adversary.kind=flipped_labels", "adversary.kind"),
    ("strategy.kd.aggregate=average", "strategy.kd.aggregate"),
    ("strategy.kd.trim_fraction=0.5", "strategy.kd.trim_fraction"),
    ("strategy.ensemble.aggregate=mode", "strategy.ensemble.aggregate"),
    ("strategy.ensemble.trim_fraction=-0.1", "strategy.ensemble.trim_fraction"),
    ("strategy.sd_dist.outlier_test=zscore", "strategy.sd_dist.outlier_test"),
    ("strategy.sd_dist.outlier_threshold=0", "strategy.sd_dist.outlier_threshold"),
])
def test_bad_poisoning_settings_are_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        small_config(tmp_path, override)
    assert f"'{key}'" in str(err.value)


def test_the_defaults_are_the_published_behaviour():
    cfg = resolve_config(None, [])
    assert cfg.adversary.fraction == 0.0
    assert cfg.strategy.kd.aggregate == "mean" and cfg.strategy.ensemble.aggregate == "mean"
    assert cfg.strategy.sd_dist.outlier_test == "auto"


# --------------------------------------------------------------------------- in a federation


def test_sd_dist_keeps_an_inverting_device_from_teaching(tmp_path):
    cfg = small_config(tmp_path, "strategy=sd-dist", "adversary.fraction=0.25", "adversary.kind=inverted_predictions",
                       "strategy.sd_dist.num_neighbours=3", "strategy.sd_dist.neighbour_fraction=1.0",
                       "training.local_epochs=1", "reference.size=100", "strategy.kd.min_steps=0")
    (bad,) = adversarial_devices(4, 0.25, cfg.seed)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=InProcessGrid(4), num_rounds=3, on_round_end=reports.append)
    for report in reports[1:]:
        assert report.metrics["excluded_teachers"] >= 1 and report.devices[bad]["excluded_teacher"]
        assert all(bad not in row.get("neighbours", []) for d, row in report.devices.items() if d != bad)


def test_device_side_selection_runs_the_same_test_and_aggregate(tmp_path):
    cfg = small_config(tmp_path, "strategy=sd-dist", "strategy.sd_dist.neighbour_selection=device",
                       "strategy.kd.aggregate=median", "adversary.fraction=0.25", "training.local_epochs=1",
                       "reference.size=100", "strategy.kd.min_steps=0")
    grid = InProcessGrid(4)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=3, on_round_end=reports.append)
    assert not any(r.failures for r in reports) and reports[-1].metrics["distilled_devices"] == 4
    last = [t.message for t in grid.traffic if t.message.metadata.message_type == P.ReferenceDistill.message_type][-1]
    population = P.ReferenceDistill.from_record(last.content).population
    assert population.aggregate == "median" and population.search.outlier_test == "auto"


def test_fedmd_median_targets_in_a_federation(tmp_path):
    cfg = small_config(tmp_path, "strategy=fedmd", "strategy.kd.aggregate=median", "training.local_epochs=1",
                       "reference.size=100", "strategy.kd.min_steps=0", devices=3)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    strategy.start(grid=InProcessGrid(3), num_rounds=1)
    ids, logits = strategy.population()
    targets, _ = strategy.targets(2, ids)
    t = cfg.strategy.kd.temperature
    expected = t * robust_probabilities(F.softmax(logits.double() / t, -1), "median").log()
    for device in ids:
        assert torch.allclose(targets[device], expected.float(), atol=1e-4)


def test_feddf_median_ensemble_in_a_federation(tmp_path):
    cfg = small_config(tmp_path, "strategy=feddf", "strategy.ensemble.aggregate=median",
                       "strategy.ensemble.warmup_rounds=1", "strategy.ensemble.server_steps=5",
                       "strategy.ensemble.num_queries=32", "training.local_epochs=1", "strategy.ensemble.min_steps=0",
                       "reference.size=100", "num-server-rounds=3", devices=3)
    grid = InProcessGrid(3)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    strategy.start(grid=grid, num_rounds=2)
    replies = [t.reply for t in grid.traffic if t.message.metadata.message_type == P.EnsembleDistill.message_type]
    answers = torch.stack([decode_answers(P.QueryAnswers.from_record(r.content).answers, "soft", 10)
                           for r in replies[-3:]])
    expected = class_balanced(robust_probabilities(answers, "median"))
    assert torch.allclose(strategy.targets.common, expected, atol=1e-5)


def test_fedmd_screened_mean_keeps_an_inverting_device_from_teaching(tmp_path):
    cfg = small_config(tmp_path, "strategy=fedmd", "strategy.kd.aggregate=screened_mean", "adversary.fraction=0.25",
                       "adversary.kind=inverted_predictions", "training.local_epochs=1", "reference.size=100",
                       "strategy.kd.min_steps=0")
    (bad,) = adversarial_devices(4, 0.25, cfg.seed)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=InProcessGrid(4), num_rounds=3, on_round_end=reports.append)
    for report in reports[1:]:
        assert report.metrics["screened_teachers"] == 1 and report.devices[bad]["screened_teacher"]
    # the targets are the plain mean of the teachers the screen kept
    ids, logits = strategy.population()
    targets, figures = strategy.targets(4, ids)
    kept = [k for k, d in enumerate(ids) if not figures.devices.get(d, {}).get("screened_teacher")]
    expected = mix_targets(uniform_weights(len(kept)), logits[kept], "probs", cfg.strategy.kd.temperature)[0]
    assert figures.metrics["screened_teachers"] == len(ids) - len(kept)
    assert all(torch.allclose(targets[d], expected, atol=1e-4) for d in ids)



def test_feddf_screens_teachers_by_their_recall_on_the_queried_reference_rows(tmp_path):
    cfg = small_config(tmp_path, "strategy=feddf", "strategy.ensemble.aggregate=screened_mean", "adversary.fraction=0.34",
                       "strategy.ensemble.warmup_rounds=1", "strategy.ensemble.server_steps=5",
                       "strategy.ensemble.num_queries=64", "training.local_epochs=8", "partition.alpha=1.0",
                       "strategy.ensemble.min_steps=0", "num-server-rounds=2", devices=6)
    bad = adversarial_devices(6, 0.34, cfg.seed)
    federation = build_federation(cfg)
    strategy = build_strategy(cfg, federation, to_yaml(cfg))
    labels = federation.reference.base.targets(federation.reference.indices)
    assert torch.equal(strategy.reference_labels, torch.as_tensor(labels).long())  # the run hands FedDF the labels
    seen, reports = [], []
    form_targets = strategy.form_targets

    def spy(query, device_ids, answers):
        seen.append((query, device_ids, answers))
        return form_targets(query, device_ids, answers)

    strategy.form_targets = spy
    strategy.start(grid=InProcessGrid(6), num_rounds=2, on_round_end=reports.append)
    (query, ids, answers), report = seen[-1], reports[-1]
    quality = answer_quality(answers, "soft", strategy.reference_labels[reference_rows(query, 200)])
    for k, device in enumerate(ids):  # each teacher's score on the rows it answered, in the round's figures
        assert report.devices[device]["best_class_recall"] == pytest.approx(1 - float(quality[k]), abs=1e-6)
    screened = answer_outliers(answers, "soft", quality)
    assert screened and {ids[k] for k in screened} <= set(bad)  # a label-permuted device, no honest one
    assert report.metrics["screened_teachers"] == len(screened)
    assert {d for d, v in report.devices.items() if v.get("screened_teacher")} == {ids[k] for k in screened}
    kept = [k for k in range(len(ids)) if k not in screened]
    assert torch.allclose(strategy.targets.common, class_balanced(answers[kept].mean(0, keepdim=True))[0], atol=1e-5)


# --------------------------------------------------------------------------- the honest devices' figures


def _row(round_, accuracies, failures=()):
    devices = {str(d): {"personalised_accuracy": p, "global_accuracy": g} for d, (p, g) in accuracies.items()}
    return {"round": round_, "personalised_accuracy_mean": 0.5, "devices": devices,
            "failures": [{"device": d} for d in failures]}


def test_honest_figures_leave_out_adversaries_and_failures():
    row = _row(1, {0: (0.9, 0.8), 1: (0.1, 0.2), 2: (0.7, 0.6), 3: (0.5, 0.4)}, failures=(3,))
    assert honest_figures(row, [1]) == {"honest_personalised_accuracy_mean": pytest.approx(0.8),
                                        "honest_global_accuracy_mean": pytest.approx(0.7)}
    assert "final_honest_global_accuracy_mean" not in final_figures([row])  # no adversaries: as before


def test_the_recorder_reports_honest_devices_per_round_and_in_the_summary(tmp_path):
    recorder = RunRecorder(tmp_path, plots=False, progress=False, quiet=True)
    federation = {"devices": [{"device_id": 0}, {"device_id": 1, "adversary": "permuted_labels"}, {"device_id": 2}]}
    recorder.start("seed: 0\n", federation)
    recorder.record(_row(1, {0: (0.9, 0.8), 1: (0.1, 0.2), 2: (0.7, 0.6)}))
    recorder.record(_row(2, {0: (0.8, 0.9), 1: (0.1, 0.2), 2: (0.6, 0.7)}))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["honest_global_accuracy_mean"] for r in rows] == pytest.approx([0.7, 0.8])
    summary = recorder.finish()
    assert summary["final_honest_global_accuracy_mean"] == pytest.approx(0.8)
    assert summary["best_honest_personalised_accuracy_mean"] == pytest.approx(0.8)
    assert summary["adversarial_devices"] == [1]
    assert json.loads((tmp_path / "summary.json").read_text())["final_honest_personalised_accuracy_mean"] == \
        pytest.approx(0.7)


def test_compare_shows_the_honest_columns_only_with_adversaries():
    from hetkd.simulations.compare import FIGURES

    def table(honest):
        stat = {"mean": 0.5, "std": 0.0, "values": [0.5]}
        none = {"mean": None, "std": None, "values": [None]}
        return {"fedmd": {key: (stat if honest or "_honest_" not in key else none) for key, _, _ in FIGURES}}

    assert "global, honest devices" in _markdown(table(True), [0])
    assert "honest devices" not in _markdown(table(False), [0])
