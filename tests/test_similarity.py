"""SD-Dist's math on hand-made predictions, and the distillation losses in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from hetkd.distill import (
    KLLoss,
    ReferenceKD,
    decode_logits,
    encode_logits,
    kd_kl,
    mix_targets,
    neighbour_weights,
    pairwise_distance,
    reference_quality,
    select_neighbours,
    uniform_weights,
)
from hetkd.distill.similarity import with_self_weight


def _devices(seed: int = 0, n: int = 6, r: int = 20, c: int = 4) -> torch.Tensor:
    return torch.randn(n, r, c, generator=torch.Generator().manual_seed(seed)) * 2


def _naive_kl(logits: torch.Tensor, t: float) -> torch.Tensor:
    n = len(logits)
    out = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            p_j = F.softmax(logits[j] / t, -1)
            out[i, j] = (p_j * (F.log_softmax(logits[j] / t, -1) - F.log_softmax(logits[i] / t, -1))).sum(-1).mean()
    return out


def test_vectorised_kl_equals_the_naive_double_loop():
    logits = _devices()
    assert torch.allclose(pairwise_distance(logits, 3.0, "kl"), _naive_kl(logits, 3.0), atol=1e-5)


@pytest.mark.parametrize("kind", ["js", "cosine"])
def test_symmetric_measures_are_symmetric_and_zero_on_the_diagonal(kind):
    d = pairwise_distance(_devices(), 3.0, kind)
    assert torch.allclose(d, d.T, atol=1e-6)
    assert torch.all(d.diagonal() == 0) and torch.all(d >= 0)
    if kind == "js":
        assert float(d.max()) <= math.log(2) + 1e-6


@pytest.mark.parametrize("kind", ["kl", "js", "cosine"])
def test_identical_devices_are_each_others_top_neighbours(kind):
    logits = _devices(n=6)
    logits[4] = logits[1]  # devices 1 and 4 predict exactly alike
    logits[5] = logits[2] + 0.01
    d = pairwise_distance(logits, 3.0, kind)
    neighbours = select_neighbours(d, 1, "distance")
    assert neighbours[1] == [4] and neighbours[4] == [1]
    assert neighbours[2] == [5] and neighbours[5] == [2]
    assert all(i not in row for i, row in enumerate(neighbours)), "a device is never its own neighbour"


def test_quality_keeps_the_best_candidates():
    logits = _devices(n=5)
    labels = torch.randint(0, 4, (20,), generator=torch.Generator().manual_seed(1))
    good = F.one_hot(labels, 4).float() * 10
    logits[3] = good  # device 3 is perfect on the reference set
    quality = reference_quality(logits, labels)
    assert int(quality.argmin()) == 3
    d = pairwise_distance(logits, 3.0)
    neighbours = select_neighbours(d, 2, "quality_distance", quality, num_candidates=1)
    assert all(row == [3] for i, row in enumerate(neighbours) if i != 3)
    assert neighbours[3] == []  # the only candidate is itself
    by_quality = select_neighbours(d, 2, "quality", quality, num_candidates=5)
    assert by_quality[0][0] == 3


def test_more_neighbours_than_devices_is_handled():
    d = pairwise_distance(_devices(n=3), 3.0)
    neighbours = select_neighbours(d, 10, "distance")
    assert [len(row) for row in neighbours] == [2, 2, 2]
    w = neighbour_weights(neighbours, d, "similarity")
    assert torch.allclose(w.sum(1), torch.ones(3))


@pytest.mark.parametrize("weighting", ["mean", "similarity"])
def test_weights_sum_to_one_and_favour_the_similar(weighting):
    logits = _devices(n=5)
    d = pairwise_distance(logits, 3.0)
    neighbours = select_neighbours(d, 3, "distance")
    w = neighbour_weights(neighbours, d, weighting)
    assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-6)
    assert torch.all(w.diagonal() == 0)
    if weighting == "similarity":
        for i, row in enumerate(neighbours):
            nearest, farthest = row[0], row[-1]
            assert w[i, nearest] >= w[i, farthest]


def test_rows_limit_the_search_and_random_rule_is_seeded():
    d = pairwise_distance(_devices(n=6), 3.0)
    picked = select_neighbours(d, 2, "distance", rows=[1, 4])
    assert [bool(r) for r in picked] == [False, True, False, False, True, False]
    a = select_neighbours(d, 2, "random", generator=torch.Generator().manual_seed(3))
    b = select_neighbours(d, 2, "random", generator=torch.Generator().manual_seed(3))
    assert a == b and all(i not in row for i, row in enumerate(a))
    with pytest.raises(ValueError, match="neighbour rule"):
        select_neighbours(d, 2, "nearest")


def test_mix_targets_closed_form_in_both_spaces_without_touching_inputs():
    logits = _devices(n=3, r=2, c=3)
    before = logits.clone()
    w = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    t = mix_targets(w, logits, "logits")
    assert torch.allclose(t[0], 0.5 * (logits[1] + logits[2]))
    assert torch.allclose(t[1], logits[0])
    temp = 3.0
    tp = mix_targets(w, logits, "probs", temp)
    expected = 0.5 * (F.softmax(logits[1] / temp, -1) + F.softmax(logits[2] / temp, -1))
    assert torch.allclose(F.softmax(tp[0] / temp, -1), expected, atol=1e-6)
    assert torch.equal(logits, before), "stored predictions must never be modified"
    with pytest.raises(ValueError, match="sum to 1"):
        mix_targets(torch.full((3, 3), 0.5), logits)


def test_fedmd_weights_are_the_plain_average():
    assert torch.allclose(uniform_weights(4), torch.full((4, 4), 0.25))
    w = uniform_weights(4, include_self=False)
    assert torch.all(w.diagonal() == 0) and torch.allclose(w.sum(1), torch.ones(4))


def test_bad_predictions_are_rejected_by_name():
    logits = _devices(n=3)
    logits[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pairwise_distance(logits)
    with pytest.raises(ValueError, match="shape"):
        pairwise_distance(torch.zeros(3, 4))


def test_kd_loss_against_its_closed_form():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.0, 3.0, -1.0]])
    temp = 2.0
    p = torch.softmax(t / temp, -1)
    q = torch.softmax(s / temp, -1)
    kl = float((p * (p.log() - q.log())).sum())
    assert kd_kl(s, t, temp).item() == pytest.approx(temp**2 * kl, rel=1e-5)
    assert kd_kl(s, t, temp, scale=1.0).item() == pytest.approx(kl, rel=1e-5)
    assert kd_kl(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_reference_kd_mixes_ce_and_kd_by_rho():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    ref, targets = torch.randn(7, 4), torch.randn(7, 3)

    def loss(rho: float) -> float:
        fn = ReferenceKD(ref, targets, rho, batch_size=4, loss=KLLoss(temperature=2.0, scale=1.0),
                         generator=torch.Generator().manual_seed(1))
        return fn(model, x, y).item()

    idx = torch.randint(7, (4,), generator=torch.Generator().manual_seed(1))
    ce = F.cross_entropy(model(x), y).item()
    kd = kd_kl(model(ref[idx]), targets[idx], 2.0, scale=1.0).item()
    assert loss(0.0) == pytest.approx(ce, rel=1e-5)
    assert loss(1.0) == pytest.approx(kd, rel=1e-5)
    assert loss(0.25) == pytest.approx(0.75 * ce + 0.25 * kd, rel=1e-5)


@pytest.mark.parametrize(("precision", "tol"), [("float32", 1e-6), ("float16", 1e-2), ("uint8", 32 / 255 / 2 + 1e-6)])
def test_prediction_codec_keeps_the_distribution(precision, tol):
    logits = _devices(n=1, r=50, c=10)[0] * 3
    encoded = encode_logits(logits, precision)
    assert encoded.dtype == np.dtype(precision)
    decoded = decode_logits(encoded)
    log_p = F.log_softmax(logits, -1)
    clipped = log_p.clamp_min(-32.0) if precision == "uint8" else log_p
    assert torch.allclose(decoded, clipped, atol=tol)
    # softmax at the KD temperature hardly moves
    assert torch.allclose(F.softmax(decoded / 3, -1), F.softmax(logits / 3, -1), atol=0.02)
    with pytest.raises(ValueError, match="precision"):
        encode_logits(logits, "int4")


# --------------------------------------------------------------------------- at scale


def _naive_neighbours(d: torch.Tensor, k: int, pool: list[int], rows: list[int]) -> dict[int, list[int]]:
    """The selection rule written as the plain per-row sort it stands for."""
    return {i: sorted((j for j in pool if j != i), key=lambda j: (float(d[i, j]), j))[:k] for i in rows}


@pytest.mark.parametrize("kind", ["kl", "js", "cosine"])
def test_a_block_of_rows_and_columns_equals_that_block_of_the_full_matrix(kind):
    logits = _devices(n=9)
    full = pairwise_distance(logits, 3.0, kind)
    rows, cols = [7, 2, 5], [0, 2, 8, 5]
    block = pairwise_distance(logits, 3.0, kind, rows=rows, cols=cols)
    assert torch.allclose(block, full[rows][:, cols], atol=1e-6)
    assert block[1, 1] == 0 and block[2, 3] == 0  # a device against itself


def test_vectorised_selection_agrees_with_the_naive_sort():
    logits = _devices(seed=3, n=40, r=15, c=5)
    logits[11] = logits[4]  # exact ties are broken by the lower index, as the naive sort does
    logits[17] = logits[4]
    d = pairwise_distance(logits, 3.0)
    rows = [0, 4, 11, 17, 39]
    quality = reference_quality(logits, torch.randint(0, 5, (15,), generator=torch.Generator().manual_seed(0)))
    candidates = torch.argsort(quality, stable=True)[:12].tolist()
    got = select_neighbours(d, 6, "quality_distance", quality, num_candidates=12, rows=rows)
    assert {i: got[i] for i in rows} == _naive_neighbours(d, 6, candidates, rows)
    got = select_neighbours(d, 6, "distance", rows=rows)
    assert {i: got[i] for i in rows} == _naive_neighbours(d, 6, list(range(40)), rows)


def test_neighbour_plan_matches_the_full_matrix_route_and_samples_above_the_limit():
    from hetkd.distill.similarity import neighbour_plan

    logits = _devices(seed=5, n=30, r=10, c=4)
    rows = [3, 9, 20]
    settings = dict(num_neighbours=4, num_candidates=30, rule="distance", similarity="kl", weighting="similarity",
                    temperature=3.0)
    weights, distance, neighbours = neighbour_plan(logits, rows, **settings)
    full = pairwise_distance(logits, 3.0)
    assert torch.allclose(distance, full[rows], atol=1e-6)
    expected = select_neighbours(full, 4, "distance", rows=rows)
    assert neighbours == expected
    assert weights.is_sparse, "n x n weights would not scale"
    assert torch.allclose(weights.to_dense(), neighbour_weights(expected, full, "similarity"), atol=1e-6)
    # above exact_search_max: only a seeded sample of search_sample candidates is searched
    sampled = [neighbour_plan(logits, rows, **settings, exact_search_max=10, search_sample=8,
                              generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    _, dist_a, picks_a = sampled[0]
    searched = (~torch.isnan(dist_a[0])).nonzero().flatten().tolist()
    assert len(searched) == 8 and all(j in searched for row in picks_a for j in row)
    assert picks_a == sampled[1][2], "the same generator seed searches the same sample"
    assert searched != (~torch.isnan(sampled[2][1][0])).nonzero().flatten().tolist()
    assert all(i not in picks_a[i] for i in rows)


def test_sparse_mixing_equals_the_dense_product():
    logits = _devices(seed=2, n=7, r=5, c=3)
    w = torch.zeros(7, 7)
    w[1, [0, 3]] = torch.tensor([0.25, 0.75])
    w[5, [2, 3, 6]] = 1 / 3
    dense = (w.double() @ logits.reshape(7, -1).double()).reshape(7, 5, 3).float()
    assert torch.allclose(mix_targets(w, logits, "logits"), dense, atol=1e-6)
    probs = (w.double() @ F.softmax(logits.double() / 2.0, -1).reshape(7, -1)).reshape(7, 5, 3)
    mixed = mix_targets(w, logits, "probs", 2.0)
    assert torch.allclose(F.softmax(mixed[[1, 5]] / 2.0, -1).double(), probs[[1, 5]], atol=1e-6)
    assert torch.all(mix_targets(w, logits, "logits")[[0, 2, 3, 4, 6]] == 0), "rows without teachers stay empty"


def test_self_weight_mixes_each_taught_device_with_itself_in_both_layouts():
    w = torch.zeros(5, 5)
    w[1, [0, 3]] = torch.tensor([0.25, 0.75])
    w[4, [1, 2, 3]] = 1 / 3
    mixed = with_self_weight(w, 0.4)
    expected = w * 0.6
    expected[1, 1] += 0.4
    expected[4, 4] += 0.4
    assert torch.allclose(mixed, expected)
    assert torch.allclose(with_self_weight(w.to_sparse(), 0.4).to_dense(), expected)
    assert torch.allclose(mixed.sum(1), torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])), "devices without teachers stay empty"
    assert with_self_weight(w, 0.0) is w
    with pytest.raises(ValueError, match="self_weight must be in \\[0, 1\\), got 1.0"):
        with_self_weight(w, 1.0)
