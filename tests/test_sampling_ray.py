"""The Ray Data path of negative sampling gives exactly the local output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raydpo.data.synthetic import SyntheticConfig, generate
from raydpo.sampling import (LightGCN, LightGCNConfig, Selection, annotate, register_strategy, sample_negatives,
                             sample_negatives_ray, unregister_strategy)

pytestmark = pytest.mark.ray


@pytest.fixture(scope="session")
def ray_session(ray_local):  # the session-wide local Ray of conftest.py
    yield ray_local


@pytest.fixture(scope="module")
def data():
    ds = generate(SyntheticConfig(n_users=300, n_items=150, seed=4))
    rng = np.random.default_rng(0)
    rows = []
    for i, (sid, t) in enumerate(zip(ds.samples.frame["sample_id"], ds.samples.frame["target_item_id"])):
        c = rng.choice(150, size=int(rng.integers(0, 10)), replace=False).tolist()
        if i % 5 == 0:
            c.insert(0, int(t))
        rows.append({"sample_id": sid, "candidate_item_ids": c,
                     "candidate_logprobs": (-rng.random(len(c))).tolist()})
    ann = annotate(ds, pd.DataFrame(rows))
    lgcn = LightGCN.fit(ds, LightGCNConfig(epochs=2, dim=8))
    return ds, ann, lgcn


def _same(a, b):
    fa, sa = a
    fb, sb = b
    pd.testing.assert_frame_equal(fa.reset_index(drop=True), fb.reset_index(drop=True))
    for key in ("records", "fallbacks", "negatives", "duplicates_avoided", "candidate_pool", "candidates"):
        assert sa[key] == sb[key], key


@pytest.mark.parametrize("strategy, n", [("clusterout_low", 1), ("balanced_popularity", 1), ("random", 3),
                                         ("clusterin_low_clusterout_low", 2), ("in_past_nearest", 1)])
def test_ray_equals_local(ray_session, data, strategy, n):
    ds, ann, lgcn = data
    local = sample_negatives(ds, ann, strategy, seed=5, n_negatives=n, lightgcn=lgcn)
    remote = sample_negatives_ray(ds, ann, strategy, seed=5, n_negatives=n, lightgcn=lgcn, block_rows=40,
                                  batch_size=16, num_cpus=0.5)
    assert remote[1]["runner"] == "ray" and len(local[0]) > 200
    _same(local, remote)


def test_user_strategy_through_ray(ray_session, data):
    ds, ann, _ = data

    @register_strategy("ray_test_least_likely")
    def least_likely(ctx):
        """The least likely candidate (record engine on Ray workers)."""
        if not len(ctx.items):
            return Selection([], "no_candidates")
        return Selection([int(ctx.items[int(np.argmin(ctx.logprobs))])])

    try:
        local = sample_negatives(ds, ann, "ray_test_least_likely", seed=1)
        remote = sample_negatives_ray(ds, ann, "ray_test_least_likely", seed=1, block_rows=100)
        _same(local, remote)
        assert local[1]["records"]["dropped"].get("no_candidates", 0) > 0
    finally:
        unregister_strategy("ray_test_least_likely")
