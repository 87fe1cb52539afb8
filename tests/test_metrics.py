"""Metric definitions checked against values computed by hand (RecBole style)."""

import math

import numpy as np
import pytest
import torch

from raydpo.evaluation.metrics import Protocol, compute_metrics, rank_catalog, target_ranks


def test_rank_catalog_breaks_ties_by_lower_id():
    dist = torch.tensor([[0.5, 0.1, 0.1, 0.9], [0.2, 0.2, 0.2, 0.0]])
    assert rank_catalog(dist, 3).tolist() == [[1, 2, 0], [3, 0, 1]]


def test_target_ranks_are_positions_in_the_top_list():
    g = torch.Generator().manual_seed(0)
    dist = torch.randint(0, 5, (50, 30), generator=g).float()  # many ties
    targets = torch.randint(0, 30, (50,), generator=g)
    targets[3] = -1
    top = rank_catalog(dist, 10)
    ranks = target_ranks(top, targets)
    order = torch.sort(dist, dim=1, stable=True).indices
    for i in range(50):
        full = (order[i] == targets[i]).nonzero().item() if targets[i] >= 0 else -1
        assert ranks[i] == (full if 0 <= full < 10 else -1)


def _weights():
    # 4 items, 2 fairness genres: item0 g0, item1 g1, item2 g0+g1, item3 none
    return torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)


def test_hand_computed_example():
    # 3 rows, k=2. Row 2's target is unknown (skipped, still in N under the reference protocol).
    topk = torch.tensor([[0, 1], [2, 0], [1, 3]])
    ranks = torch.tensor([0, 1, -1])
    targets = torch.tensor([0, 0, -1])
    hist = torch.tensor([3.0, 1.0], dtype=torch.float64)  # history mass g0=3, g1=1
    not_in = torch.tensor([False, True, True])
    m = compute_metrics(topk, ranks, targets, _weights(), hist, not_in, [1, 2])
    n = 3
    # k=2: hits at rank 0 and 1
    assert m[2]["NDCG"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(3)) / n, abs=1e-15)
    assert m[2]["HR"] == pytest.approx(2 / 3)
    # recommended (valid rows only): [0,1,2,0] -> counts 0:2, 1:1, 2:1
    assert m[2]["diversity"] == 3
    assert m[2]["DivRatio"] == pytest.approx(3 / (n * 2))
    assert m[2]["ORRatio"] == pytest.approx((2 + 1 + 1) / (2 * n))
    # gp mass: item0 x2 -> g0 2; item1 -> g1 1; item2 -> .5/.5 => g0 2.5, g1 1.5 -> [.625,.375]
    # gh = [.75, .25]; d = [-.125, .125]
    assert m[2]["DGU"] == pytest.approx(0.25)
    assert m[2]["MGU"] == pytest.approx(0.125)
    assert m[2]["Predict_NotIn_Ratio"] == pytest.approx(2 / 3)
    # k=1: only row 0 hits
    assert m[1]["HR"] == pytest.approx(1 / 3)
    assert m[1]["NDCG"] == pytest.approx(1 / 3)
    assert m[1]["diversity"] == 2


def test_valid_only_protocol_changes_denominators():
    topk = torch.tensor([[0, 1], [2, 0], [1, 3]])
    ranks = torch.tensor([0, 1, -1])
    targets = torch.tensor([0, 0, -1])
    hist = torch.tensor([3.0, 1.0], dtype=torch.float64)
    not_in = torch.tensor([False, True, True])
    m = compute_metrics(topk, ranks, targets, _weights(), hist, not_in, [2], Protocol.named("valid_only"),
                        history_genre_mass_valid=torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert m[2]["HR"] == pytest.approx(1.0)
    assert m[2]["DivRatio"] == pytest.approx(3 / 4)
    # gh = [.5,.5], gp = [.625,.375] -> d = [.125,-.125]
    assert m[2]["MGU"] == pytest.approx(0.125)


def test_unknown_protocol_rejected():
    with pytest.raises(ValueError, match="valid_only"):
        Protocol.named("nope")


def test_or_ratio_top3_with_fewer_items_than_three():
    topk = torch.tensor([[0], [0]])
    w = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    m = compute_metrics(topk, torch.tensor([0, 5]), torch.tensor([0, 1]), w, torch.tensor([1.0], dtype=torch.float64),
                        torch.tensor([False, False]), [1])
    assert m[1]["ORRatio"] == pytest.approx(1.0)
    assert m[1]["DGU"] == pytest.approx(0.0)
    assert np.isclose(m[1]["HR"], 0.5)


@pytest.mark.parametrize("levels", [3, 50, 100000])
def test_partial_topk_equals_full_stable_sort(levels):
    g = torch.Generator().manual_seed(levels)
    dist = torch.randint(0, levels, (200, 300), generator=g).float()  # few levels -> many ties
    for k in (1, 5, 10):
        full = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        assert torch.equal(rank_catalog(dist, k), full)
