import numpy as np
import pandas as pd
import pytest

from raydpo.tuning.pareto import pareto_front, pareto_mask, plot_front


def test_pareto_mask_hand_example():
    # maximise ndcg, minimise orratio
    v = np.array([[0.30, 0.10],   # front
                  [0.20, 0.05],   # front
                  [0.25, 0.12],   # dominated by row 0
                  [0.30, 0.10],   # duplicate of a front point: not dominated
                  [0.10, 0.20],   # dominated
                  [np.nan, 0.01]])  # failed trial
    assert pareto_mask(v, ["max", "min"]).tolist() == [True, True, False, True, False, False]


def test_pareto_matches_brute_force():
    rng = np.random.default_rng(0)
    v = rng.random((60, 3))
    modes = ["max", "min", "max"]
    sign = np.array([1, -1, 1])
    expected = []
    for a in range(60):
        dom = any(((sign * v[b] >= sign * v[a]).all() and (sign * v[b] > sign * v[a]).any()) for b in range(60))
        expected.append(not dom)
    assert pareto_mask(v, modes).tolist() == expected


def test_front_frame_and_plot(tmp_path):
    f = pd.DataFrame({"trial": list("abcd"), "NDCG@10": [0.3, 0.2, 0.25, 0.1], "ORRatio@10": [0.1, 0.05, 0.12, 0.2]})
    front = pareto_front(f, {"NDCG@10": "max", "ORRatio@10": "min"})
    assert front["trial"].tolist() == ["a", "b"]
    png = plot_front(f, {"NDCG@10": "max", "ORRatio@10": "min"}, tmp_path / "front.png", label="trial")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        pareto_mask(np.zeros((2, 1)), ["up"])
