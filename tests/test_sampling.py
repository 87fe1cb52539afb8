"""Negative sampling: annotation, every strategy's rule and fallback, determinism, registry,
bad input, summary, output files, CLI. No Ray here (see test_sampling_ray.py)."""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from raydpo.data.preference import read_preferences, to_pairs
from raydpo.data.schema import Catalog, Dataset, Samples
from raydpo.data.stats import exposure, interest_clusters
from raydpo.data.synthetic import SyntheticConfig, generate
from raydpo.errors import DataError, RaydpoError
from raydpo.prompt import response_text, user_message
from raydpo.sampling import (CLUSTER_EXPOSURE_STRATEGIES, LIGHTGCN_STRATEGIES, BatchContext, LightGCN,
                             LightGCNConfig, SampleContext, SamplingState, Selection, annotate, apply_strategy,
                             get_strategy, register_strategy, sample_negatives, strategy_names, summary_path,
                             unregister_strategy, write_output)
from raydpo.sampling.cli import add_sampling_parser

ENGINES = ("batch", "record")


# ------------------------------------------------------------------------------------------------
# helpers


def pick(strategy, records, engine, n=1, state=None, seed=0):
    """[(negatives, reason label, duplicates avoided)] for hand-written records."""
    b = BatchContext.from_records(records, state=state, seed=seed, n=n)
    picks, labels, dups = apply_strategy(strategy, b, engine)
    return [([int(x) for x in row if x >= 0], lab, int(d)) for row, lab, d in zip(picks, labels, dups)]


def one(strategy, engine, n=1, state=None, seed=0, **record):
    return pick(strategy, [record], engine, n=n, state=state, seed=seed)[0]


def make_candidates(ds: Dataset, k: int = 8, seed: int = 0, p_target: float = 0.2, p_hist: float = 0.3,
                    empty_every: int = 0) -> pd.DataFrame:
    """Seeded random catalog items per sample in a fixed order; sometimes the target or a history
    item among them (as unfiltered generation would produce)."""
    rng = np.random.default_rng(seed)
    f = ds.samples.frame
    rows = []
    n_items = len(ds.catalog)
    for i, (sid, h, t) in enumerate(zip(f["sample_id"], f["history_item_ids"], f["target_item_id"])):
        c = rng.choice(n_items, size=k, replace=False).tolist()
        if rng.random() < p_target:
            c.insert(int(rng.integers(0, len(c) + 1)), int(t))
        if rng.random() < p_hist:
            c.insert(int(rng.integers(0, len(c) + 1)), int(h[int(rng.integers(0, len(h)))]))
        c = list(dict.fromkeys(c))
        if empty_every and i % empty_every == 0:
            c = []
        rows.append({"sample_id": sid, "prompt": "", "candidate_item_ids": c,
                     "candidate_titles": [ds.catalog.titles[j] for j in c],
                     "candidate_logprobs": (-np.arange(len(c), dtype=float) - 1).tolist(),
                     "candidate_scores": (-np.arange(len(c), dtype=float) - 1).tolist()})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def small():
    ds = generate(SyntheticConfig(n_users=400, n_items=120, n_genres=6, seed=5))
    return ds, make_candidates(ds, seed=1)


@pytest.fixture(scope="module")
def small_annotated(small):
    ds, cands = small
    return annotate(ds, cands)


@pytest.fixture(scope="module")
def small_lightgcn(small):
    ds, _ = small
    return LightGCN.fit(ds, LightGCNConfig(epochs=4, dim=16, seed=0))


# a typical record: items 10..14
BASE = dict(items=[10, 11, 12, 13, 14], exposure=[5, 9, 1, 9, 1], overlap=[2, 1, 0, 0, 1], target=1, history=[2, 3])
# every candidate in the cluster
ALL_IN = dict(items=[20, 21, 22, 23], exposure=[4, 2, 7, 5], overlap=[2, 1, 3, 1], target=1, history=[2])
# no candidate in the cluster
ALL_OUT = dict(items=[30, 31, 32], exposure=[1, 2, 2], overlap=[0, 0, 0], target=1, history=[2])


# ------------------------------------------------------------------------------------------------
# the 9 cluster/exposure strategies: rule and fallback, both engines


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("strategy, record, expected, label", [
    # rules
    ("clusterin_high", BASE, [11], ""),
    ("clusterin_low", BASE, [14], ""),
    ("clusterout_low", BASE, [12], ""),
    ("clusterout_high", BASE, [13], ""),
    ("low_exposure", BASE, [12], ""),  # tie 12/14 at exposure 1 -> first in beam order
    ("high_exposure", BASE, [11], ""),  # tie 11/13 at exposure 9 -> first
    ("clusterin_high_clusterout_low", BASE, [11, 12], ""),
    ("clusterin_low_clusterout_low", BASE, [14, 12], ""),
    # fallbacks
    ("clusterin_high", ALL_OUT, [], "no_in_cluster_candidate"),
    ("clusterin_low", ALL_OUT, [], "no_in_cluster_candidate"),
    ("clusterout_low", ALL_IN, [21], "least_overlap"),  # least overlap {21, 23}, lowest exposure 21
    ("clusterout_high", ALL_IN, [23], "least_overlap"),  # least overlap {21, 23}, highest exposure 23 (ref: 22)
    ("clusterout_high", ALL_OUT, [31], ""),  # tie 31/32 -> first
    ("clusterin_high_clusterout_low", ALL_OUT, [30], "no_in_cluster_candidate"),
    ("clusterin_high_clusterout_low", ALL_IN, [22, 21], "least_overlap"),
    # duplicate fixed: clusterin_low = 21 and clusterout_low falls back to 21 -> next distinct, 23
    ("clusterin_low_clusterout_low", ALL_IN, [21, 23], "duplicate_replaced+least_overlap"),
    ("low_exposure", dict(items=[], exposure=[], overlap=[], target=1, history=[2]), [], "no_candidates"),
    ("high_exposure", dict(items=[], exposure=[], overlap=[], target=1, history=[2]), [], "no_candidates"),
])
def test_cluster_exposure_rules_and_fallbacks(strategy, record, expected, label, engine):
    negs, lab, _ = one(strategy, engine, **record)
    assert negs == expected
    assert lab == label


@pytest.mark.parametrize("engine", ENGINES)
def test_clusterout_high_fallback_is_least_overlapping_not_most(engine):
    negs, lab, _ = one("clusterout_high", engine, **ALL_IN)
    assert negs == [23] and lab == "least_overlap"
    # the reference rule (largest overlap, then highest exposure) would have picked 22
    assert 22 not in negs


@pytest.mark.parametrize("engine", ENGINES)
def test_composite_duplicate_dropped_when_no_other_candidate(engine):
    negs, lab, dups = one("clusterin_low_clusterout_low", engine, items=[40], exposure=[3], overlap=[1], target=1,
                          history=[2])
    assert negs == [40]
    assert lab == "duplicate_dropped"  # no second pick was made, so no least_overlap pick either
    assert dups == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_composite_counts_duplicates_avoided(engine):
    _, _, dups = one("clusterin_low_clusterout_low", engine, **ALL_IN)
    assert dups == 1
    _, _, dups = one("clusterin_low_clusterout_low", engine, **BASE)
    assert dups == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_ties_break_by_candidate_order_not_id(engine):
    for strategy in ("low_exposure", "high_exposure", "clusterin_high", "clusterin_low", "clusterout_low",
                     "clusterout_high"):
        a = one(strategy, engine, items=[7, 3], exposure=[4, 4], overlap=[1, 1] if "in" in strategy else [0, 0],
                target=1, history=[2])
        b = one(strategy, engine, items=[3, 7], exposure=[4, 4], overlap=[1, 1] if "in" in strategy else [0, 0],
                target=1, history=[2])
        assert a[0] == [7] and b[0] == [3], strategy


@pytest.mark.parametrize("engine", ENGINES)
def test_n_negatives_takes_the_n_best_in_rule_order(engine):
    assert one("high_exposure", engine, n=3, **BASE)[0] == [11, 13, 10]
    assert one("clusterin_low", engine, n=5, **BASE)[0] == [14, 10, 11]  # only 3 in-cluster: short, never padded
    assert one("clusterout_low", engine, n=3, **BASE)[0] == [12, 13, 14]
    assert one("clusterout_low", engine, n=3, **BASE)[1] == "least_overlap"  # 14 is in-cluster
    assert one("top_n", engine, n=2, **BASE)[0] == [10, 11]
    # clusterin_high top 2 (11, 10), then clusterout_low order 12, 13 (out), 14, 11, 10
    assert one("clusterin_high_clusterout_low", engine, n=2, **BASE)[0] == [11, 10, 12, 13]


# ------------------------------------------------------------------------------------------------
# balanced_popularity, selfplay, top_n, random


@pytest.mark.parametrize("engine", ENGINES)
def test_balanced_popularity_rule(engine):
    rec = dict(items=[50, 51, 52, 53, 54, 55], exposure=[1, 8, 3, 9, 0, 5], overlap=[0] * 6, target=1, history=[2])
    # sorted by exposure desc: 53(9) 51(8) 55(5) | 52(3) 50(1) 54(0)
    for seed in range(20):
        negs, lab, _ = one("balanced_popularity", engine, seed=seed, sample_id="s", **rec)
        assert len(negs) == 2 and lab == ""
        assert negs[0] in (53, 51, 55) and negs[1] in (52, 50, 54)
        ctx = SampleContext.of(seed=seed, sample_id="s", **rec)
        u = ctx.uniforms(6)
        sorted_items = [53, 51, 55, 52, 50, 54]
        assert negs == [sorted_items[int(np.argmin(u[:3]))], sorted_items[3 + int(np.argmin(u[3:]))]]


@pytest.mark.parametrize("engine", ENGINES)
def test_balanced_popularity_fallbacks(engine):
    assert one("balanced_popularity", engine, items=[60], exposure=[2], overlap=[0], target=1, history=[2]) == \
        ([60], "single_candidate", 0)
    assert one("balanced_popularity", engine, items=[], exposure=[], overlap=[], target=1, history=[2])[:2] == \
        ([], "no_candidates")


def _random_records(n_records=200, n_items=300, k=10, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n_records):
        items = rng.choice(n_items, size=k, replace=False)
        recs.append(dict(sample_id=f"u{i}", items=items[2:].tolist(), exposure=rng.integers(0, 4, k - 2).tolist(),
                         overlap=rng.integers(0, 3, k - 2).tolist(), target=int(items[0]),
                         history=rng.choice(n_items, size=6, replace=False).tolist()))
        recs[-1]["history"] = [h for h in recs[-1]["history"] if h != items[0] and h not in recs[-1]["items"]]
    return recs, SamplingState(n_items=n_items)


@pytest.mark.parametrize("strategy", ["balanced_popularity", "random"])
def test_random_strategies_seeded_batch_independent_and_seed_sensitive(strategy):
    recs, state = _random_records()
    a = pick(strategy, recs, "batch", n=2, state=state, seed=7)
    b = pick(strategy, recs, "record", n=2, state=state, seed=7)
    chunks = [x for lo in range(0, len(recs), 7) for x in pick(strategy, recs[lo: lo + 7], "batch", n=2, state=state,
                                                                 seed=7)]
    c = pick(strategy, recs, "batch", n=2, state=state, seed=8)
    assert a == b == chunks  # reproducible, engine- and batching-independent
    assert sum(x[0] != y[0] for x, y in zip(a, c)) > len(recs) // 4  # another seed changes many records


@pytest.mark.parametrize("engine", ENGINES)
def test_random_never_target_or_history_and_no_duplicates(engine):
    recs, state = _random_records(n_items=40, seed=3)
    for (negs, lab, _), r in zip(pick("random", recs, engine, n=5, state=state), recs):
        assert len(negs) == 5 and len(set(negs)) == 5 and lab == ""
        assert r["target"] not in negs and not set(r["history"]) & set(negs)
        assert all(0 <= x < 40 for x in negs)


@pytest.mark.parametrize("engine", ENGINES)
def test_random_exact_path_and_catalog_exhausted(engine):
    state = SamplingState(n_items=12)
    # 10 history items + target leave exactly one allowed item (11): draws rarely hit it, the exact path does
    negs, lab, _ = one("random", engine, n=3, state=state, target=0, history=list(range(1, 11)), items=[])
    assert negs == [11] and lab == "catalog_exhausted"
    negs, lab, _ = one("random", engine, n=1, state=state, target=0, history=list(range(1, 11)), items=[])
    assert negs == [11] and lab == ""


@pytest.mark.parametrize("engine", ENGINES)
def test_selfplay_is_top_candidate(engine):
    assert one("selfplay", engine, **BASE)[0] == [10]
    empty = dict(items=[], exposure=[], overlap=[], target=1, history=[2])
    assert one("selfplay", engine, **empty)[:2] == ([], "no_candidates")


# ------------------------------------------------------------------------------------------------
# LightGCN strategies on hand-made embeddings

# history 0 (0,0), 1 (2,0) -> centroid (1,0); target 2 at (10,0)
# candidates 3 (1,1) in, 4 (5,0) out, 5 (9,0) in, 6 (1,-3) out
EMB = np.zeros((10, 2))
EMB[[0, 1, 2, 3, 4, 5, 6, 7]] = [[0, 0], [2, 0], [10, 0], [1, 1], [5, 0], [9, 0], [1, -3], [5, 0]]
LG = dict(items=[3, 4, 5, 6], exposure=[0, 0, 0, 0], overlap=[1, 0, 1, 0], target=2, history=[0, 1])
LG_EXPECTED = {
    "past_nearest": 3, "past_farthest": 5, "chosen_nearest": 5, "chosen_farthest": 6,
    "in_past_nearest": 3, "in_past_farthest": 5, "in_chosen_nearest": 5, "in_chosen_farthest": 3,
    "out_past_nearest": 6, "out_past_farthest": 4, "out_chosen_nearest": 4, "out_chosen_farthest": 6,
}


def lg_state(seen=None):
    return SamplingState(n_items=10, embeddings=EMB, seen=seen)


def test_twelve_lightgcn_strategies_exist():
    assert sorted(LIGHTGCN_STRATEGIES) == sorted(LG_EXPECTED)
    assert all(get_strategy(s).needs_embeddings for s in LIGHTGCN_STRATEGIES)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("strategy", sorted(LG_EXPECTED))
def test_lightgcn_rule(strategy, engine):
    assert one(strategy, engine, state=lg_state(), **LG) == ([LG_EXPECTED[strategy]], "", 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_lightgcn_subset_fallback_uses_all(engine):
    rec = {**LG, "overlap": [1, 1, 1, 1]}  # nothing out of cluster
    assert one("out_past_farthest", engine, state=lg_state(), **rec) == ([5], "subset_empty_used_all", 0)
    assert one("out_chosen_nearest", engine, state=lg_state(), **rec) == ([5], "subset_empty_used_all", 0)
    assert one("in_past_farthest", engine, state=lg_state(), **rec) == ([5], "", 0)


@pytest.mark.parametrize("engine", ENGINES)
def test_lightgcn_unseen_items(engine):
    seen = np.ones(10, bool)
    seen[5] = False  # candidate 5 never seen in training: never chosen
    assert one("past_farthest", engine, state=lg_state(seen), **LG)[0] == [4]
    seen = np.ones(10, bool)
    seen[2] = False  # target unseen: chosen_* uses the history centroid (counted)
    assert one("chosen_nearest", engine, state=lg_state(seen), **LG) == ([3], "target_unseen_used_history", 0)
    seen = np.ones(10, bool)
    seen[[0, 1]] = False  # history unseen: past_* uses the target
    assert one("past_nearest", engine, state=lg_state(seen), **LG) == ([5], "history_unseen_used_target", 0)
    seen = np.ones(10, bool)
    seen[[3, 4, 5, 6]] = False  # no candidate has an embedding: dropped
    assert one("past_nearest", engine, state=lg_state(seen), **LG)[:2] == ([], "no_embedded_candidate")
    seen = np.ones(10, bool)
    seen[[0, 1, 2]] = False  # neither anchor
    assert one("chosen_farthest", engine, state=lg_state(seen), **LG)[:2] == ([], "no_anchor")


@pytest.mark.parametrize("engine", ENGINES)
def test_lightgcn_ties_by_candidate_order(engine):
    rec = {**LG, "items": [7, 4], "exposure": [0, 0], "overlap": [0, 0]}  # 7 and 4 share the embedding (5, 0)
    assert one("past_nearest", engine, state=lg_state(), **rec)[0] == [7]
    assert one("past_nearest", engine, state=lg_state(), **{**rec, "items": [4, 7]})[0] == [4]


def test_lightgcn_strategy_without_embeddings_is_a_clear_error():
    with pytest.raises(RaydpoError, match="LightGCN"):
        one("past_nearest", "batch", **LG)


# ------------------------------------------------------------------------------------------------
# batch twin == per-record rule on random inputs (ties, empty lists, unseen items)


@pytest.mark.parametrize("n", [1, 3])
def test_vectorised_equals_per_record_for_every_builtin(n):
    rng = np.random.default_rng(11)
    n_items = 60
    emb = rng.normal(size=(n_items, 4)).round(0)  # coarse values: many exact distance ties
    seen = rng.random(n_items) > 0.15
    state = SamplingState(n_items=n_items, embeddings=emb, seen=seen)
    recs = []
    for i in range(300):
        k = int(rng.integers(0, 9))
        items = rng.choice(n_items, size=k + 7, replace=False)
        recs.append(dict(sample_id=f"s{i}", items=items[:k].tolist(), exposure=rng.integers(0, 3, k).tolist(),
                         overlap=rng.integers(0, 3, k).tolist(), target=int(items[k]),
                         history=items[k + 1: k + 1 + int(rng.integers(0, 7))].tolist()))
    for name in strategy_names():
        st = get_strategy(name)
        if st.batch is None:
            continue
        assert pick(name, recs, "batch", n=n, state=state, seed=3) == \
            pick(name, recs, "record", n=n, state=state, seed=3), name


# ------------------------------------------------------------------------------------------------
# annotation


def test_annotation_matches_a_naive_computation(small, small_annotated):
    ds, cands = small
    ann = small_annotated
    frame = ann.to_frame(ds.catalog)
    samples = ds.samples.frame.set_index("sample_id")
    exp = {s: exposure(ds.catalog, ds.samples, split=s) for s in ("train", "valid", "test")}
    clusters = interest_clusters(ds.catalog, ds.samples)
    cluster_of = dict(zip(ds.samples.frame["sample_id"], clusters))
    vocab = ds.catalog.genre_vocab
    n_target = n_hist = 0
    for (_, c), (_, a) in zip(cands.iterrows(), frame.iterrows()):
        s = samples.loc[c["sample_id"]]
        hist = set(s["history_item_ids"])
        raw = list(c["candidate_item_ids"])
        kept = [x for x in raw if x != s["target_item_id"] and x not in hist]
        n_target += sum(x == s["target_item_id"] for x in raw)
        n_hist += sum(x in hist for x in raw)
        assert list(a["candidate_item_ids"]) == kept  # beam order kept
        assert list(a["candidate_beam_rank"]) == [raw.index(x) for x in kept]
        cl = {vocab[g] for g in cluster_of[c["sample_id"]] if g >= 0}
        assert set(a["interest_cluster"]) == cl
        e = exp[s["split"]]  # the sample's own split (reference scope)
        assert list(a["candidate_exposure"]) == [int(e.counts[x]) for x in kept]
        assert list(a["candidate_exposure_rank"]) == [int(e.ranks[x]) for x in kept]
        ov = [len(set(ds.catalog.genres[x]) & cl) for x in kept]
        assert list(a["candidate_overlap"]) == ov
        assert list(a["candidate_in_cluster"]) == [o > 0 for o in ov]
        assert [list(g) for g in a["candidate_genres"]] == [list(ds.catalog.genres[x]) for x in kept]
    assert ann.counts["filtered_target"] == n_target > 0
    assert ann.counts["filtered_history"] == n_hist > 0
    long = ann.to_frame(ds.catalog, long=True)
    assert len(long) == ann.counts["candidates_kept"] == sum(len(x) for x in frame["candidate_item_ids"])


def test_annotation_options(small):
    ds, cands = small
    top = max(ds.catalog.genre_frequency().items(), key=lambda kv: kv[1])[0]
    ann = annotate(ds, cands, ignore_genres=(top,), cluster_k=2)
    f = ann.to_frame(ds.catalog)
    assert all(top not in c and len(c) <= 2 for c in f["interest_cluster"])
    glob = annotate(ds, cands, exposure_scope="train_interactions")
    e = exposure(ds.catalog, ds.samples, scope="train_interactions")
    g = glob.to_frame(ds.catalog)
    assert all(list(x) == [int(e.counts[i]) for i in ids] for x, ids in zip(g["candidate_exposure"],
                                                                           g["candidate_item_ids"]))
    with pytest.raises(DataError, match="exposure scope"):
        annotate(ds, cands, exposure_scope="global")


# ------------------------------------------------------------------------------------------------
# every strategy end to end: validity of records


def test_every_strategy_end_to_end(small, small_annotated, small_lightgcn):
    ds, _ = small
    samples = ds.samples.frame.set_index("sample_id")
    for name in strategy_names():
        frame, summary = sample_negatives(ds, small_annotated, name, seed=0, lightgcn=small_lightgcn)
        assert len(frame) == summary["records"]["out"] > 0, name
        for sid, prompt, chosen, rej, rid, cid in zip(frame["sample_id"], frame["prompt"], frame["chosen"],
                                                      frame["rejected"], frame["rejected_item_ids"],
                                                      frame["chosen_item_id"]):
            s = samples.loc[sid]
            assert 0 < len(rid) == len(set(rid)) == len(rej), name  # no empty record, no duplicate
            assert cid == s["target_item_id"] and cid not in rid
            assert not set(rid) & set(s["history_item_ids"]), name
            assert rej == [response_text(ds.catalog.titles[i]) for i in rid]
        assert (frame["strategy"] == name).all()
        # spot-check the prompt format on one record
        s = samples.loc[frame["sample_id"].iloc[0]]
        assert frame["prompt"].iloc[0] == user_message(list(s["history_titles"]), ds.instruction)
        assert frame["chosen"].iloc[0] == response_text(s["target_title"])


def test_lightgcn_strategy_trains_one_when_needed(small, small_annotated):
    ds, _ = small
    frame, summary = sample_negatives(ds, small_annotated, "in_past_nearest", seed=0,
                                      lightgcn_config=LightGCNConfig(epochs=2, dim=8))
    assert summary["lightgcn"]["trained"] and summary["lightgcn"]["embedding_kind"] == "propagated"
    assert len(frame) > 0


# ------------------------------------------------------------------------------------------------
# LightGCN training


def test_lightgcn_training(small):
    ds, _ = small
    cfg = LightGCNConfig(epochs=6, dim=16, seed=1)
    m = LightGCN.fit(ds, cfg)
    assert m.losses[-1] < m.losses[0] < m.initial_loss + 1e-6  # BPR loss falls
    assert m.initial_loss == pytest.approx(np.log(2), abs=0.05)  # random start ~ log 2
    assert not np.allclose(m.embeddings("propagated"), m.embeddings("layer0"))
    m2 = LightGCN.fit(ds, cfg)
    np.testing.assert_array_equal(m.embeddings(), m2.embeddings())  # seeded
    m3 = LightGCN.fit(ds, LightGCNConfig(epochs=6, dim=16, seed=2))
    assert not np.allclose(m.embeddings(), m3.embeddings())
    train = ds.split("train").frame
    used = set(np.concatenate(list(train["history_item_ids"]))) | set(train["target_item_id"])
    assert m.seen.tolist() == [i in used for i in range(len(ds.catalog))]
    with pytest.raises(RaydpoError, match="embedding kind"):
        m.embeddings("final")


def test_lightgcn_unseen_items_error_and_save_load(tmp_path):
    ds = generate(SyntheticConfig(n_users=60, n_items=200, seed=2))
    m = LightGCN.fit(ds, LightGCNConfig(epochs=1, dim=4))
    unseen = np.flatnonzero(~m.seen)
    assert len(unseen) > 0
    assert m.item_vectors(np.flatnonzero(m.seen)[:3]).shape == (3, 4)
    with pytest.raises(DataError, match="never saw items"):
        m.item_vectors([int(np.flatnonzero(m.seen)[0]), int(unseen[0])])
    with pytest.raises(DataError, match="outside the catalog"):
        m.item_vectors([10_000])
    p = m.save(tmp_path / "lgcn.npz")
    m2 = LightGCN.load(p)
    np.testing.assert_array_equal(m2.embeddings("layer0"), m.embeddings("layer0"))
    np.testing.assert_array_equal(m2.seen, m.seen)
    assert m2.losses == pytest.approx(m.losses, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# registry


@pytest.fixture
def user_strategy():
    @register_strategy("test_least_likely", picks=1)
    def least_likely(ctx):
        """The candidate the model found least likely. Fallback: none (no candidates -> dropped)."""
        if not len(ctx.items):
            return Selection([], "no_candidates")
        return Selection([int(ctx.items[int(np.argmin(ctx.logprobs))])])

    yield "test_least_likely"
    unregister_strategy("test_least_likely")


def test_user_strategy_by_name(user_strategy, small, small_annotated):
    ds, _ = small
    frame, summary = sample_negatives(ds, small_annotated, user_strategy)
    ann = small_annotated.to_frame(ds.catalog).set_index("sample_id")
    for sid, rid in zip(frame["sample_id"], frame["rejected_item_ids"]):
        a = ann.loc[sid]
        assert rid == [int(a["candidate_item_ids"][int(np.argmin(a["candidate_logprobs"]))])]  # the last beam
    assert summary["engine"] == "record" and summary["rule"].startswith("The candidate the model found least")
    assert "test_least_likely" in strategy_names()
    with pytest.raises(RaydpoError, match="already registered"):
        register_strategy("test_least_likely", lambda ctx: [])


def test_unknown_strategy_lists_known_ones(small, small_annotated):
    with pytest.raises(DataError) as e:
        get_strategy("clusterout_lowest")
    msg = str(e.value)
    assert "clusterout_lowest" in msg
    assert all(n in msg for n in CLUSTER_EXPOSURE_STRATEGIES + ["selfplay", "random", "top_n"])
    with pytest.raises(DataError, match="known strategies"):
        sample_negatives(small[0], small_annotated, "nope")


def test_user_strategy_output_is_checked(small, small_annotated):
    ds, _ = small

    @register_strategy("test_returns_target")
    def returns_target(ctx):
        """Bad: the target."""
        return [ctx.target]

    @register_strategy("test_returns_dupes")
    def returns_dupes(ctx):
        """Duplicates (removed and counted)."""
        return [int(ctx.items[0]), int(ctx.items[0])] if len(ctx.items) else []

    @register_strategy("test_returns_junk")
    def returns_junk(ctx):
        """Outside the catalog."""
        return [10 ** 9]

    @register_strategy("test_returns_minus_one")
    def returns_minus_one(ctx):
        """A padding id is not an item."""
        return [-1]

    try:
        with pytest.raises(DataError, match="chose the target"):
            sample_negatives(ds, small_annotated, "test_returns_target")
        with pytest.raises(DataError, match="outside the catalog"):
            sample_negatives(ds, small_annotated, "test_returns_junk")
        with pytest.raises(DataError, match="negative item id"):
            sample_negatives(ds, small_annotated, "test_returns_minus_one")
        frame, summary = sample_negatives(ds, small_annotated, "test_returns_dupes")
        assert all(len(r) == 1 for r in frame["rejected_item_ids"])
        assert summary["duplicates_avoided"] == len(frame)
        assert summary["records"]["dropped_total"] == 0 and summary["records"]["out"] == len(small_annotated)
    finally:
        for n in ("test_returns_target", "test_returns_dupes", "test_returns_junk", "test_returns_minus_one"):
            unregister_strategy(n)
    with pytest.raises(RaydpoError, match="built-in"):
        unregister_strategy("clusterout_low")


# ------------------------------------------------------------------------------------------------
# bad input


def test_unknown_candidate_items(small):
    ds, cands = small
    bad = cands.copy()
    bad.at[3, "candidate_item_ids"] = list(bad.at[3, "candidate_item_ids"]) + [10 ** 6]
    bad = bad.drop(columns=["candidate_titles", "candidate_logprobs", "candidate_scores"])
    with pytest.raises(DataError) as e:
        annotate(ds, bad)
    assert str(bad.at[3, "sample_id"]) in str(e.value) and "not in the catalog" in str(e.value)
    ann = annotate(ds, bad, on_unknown_item="drop")
    assert ann.counts["unknown_items_dropped"] == 1
    frame, summary = sample_negatives(ds, ann, "low_exposure")
    assert summary["candidates"]["unknown_items_dropped"] == 1
    assert 10 ** 6 not in {x for r in frame["rejected_item_ids"] for x in r}


def test_candidate_titles_from_another_catalog(small):
    ds, cands = small
    bad = cands.copy()
    bad.at[5, "candidate_titles"] = ["Some Other Book"] + list(bad.at[5, "candidate_titles"])[1:]
    with pytest.raises(DataError, match="another catalog"):
        annotate(ds, bad)


def test_unknown_and_duplicate_samples(small):
    ds, cands = small
    bad = cands.copy()
    bad.at[0, "sample_id"] = "nobody"
    with pytest.raises(DataError, match="not in dataset"):
        annotate(ds, bad)
    with pytest.raises(DataError, match="more than one candidate record"):
        annotate(ds, pd.concat([cands, cands.iloc[:1]], ignore_index=True))
    with pytest.raises(DataError, match="candidate_item_ids"):
        annotate(ds, cands.drop(columns=["candidate_item_ids"]))


def test_samples_without_candidates_are_counted(small):
    ds, _ = small
    cands = make_candidates(ds, seed=2, empty_every=10)
    # a record whose only candidates are its target and a history item has none left either
    s = ds.samples.frame.iloc[1]
    cands.at[1, "candidate_item_ids"] = [int(s["target_item_id"]), int(s["history_item_ids"][0])]
    cands.at[1, "candidate_titles"] = [ds.catalog.titles[i] for i in cands.at[1, "candidate_item_ids"]]
    cands.at[1, "candidate_logprobs"] = [-1.0, -2.0]
    cands.at[1, "candidate_scores"] = [-1.0, -2.0]
    ann = annotate(ds, cands)
    n_empty = len(range(0, len(cands), 10)) + 1
    assert ann.counts["records_without_candidates"] == n_empty
    frame, summary = sample_negatives(ds, ann, "clusterout_low")
    assert summary["records"]["dropped"]["no_candidates"] == n_empty
    assert summary["fallbacks"]["no_candidates"]["count"] == n_empty
    assert len(frame) == len(cands) - n_empty
    frame, summary = sample_negatives(ds, ann, "random")  # draws from the catalog: nothing dropped
    assert len(frame) == len(cands) and summary["records"]["dropped_total"] == 0


# ------------------------------------------------------------------------------------------------
# summary on a hand example


@pytest.fixture
def hand_dataset():
    # 8 items; genres: a = 0..3, b = 4..7 (item 3 also b)
    catalog = Catalog(titles=tuple(f"Book {i}" for i in range(8)),
                      genres=(("a",), ("a",), ("a",), ("a", "b"), ("b",), ("b",), ("b",), ("b",)))
    rows = [
        # train histories: exposure (train) 0:2, 1:2, 2:1, 4:1
        dict(sample_id="t1", user_id="u1", split="train", history_item_ids=[0, 1], target_item_id=2),
        dict(sample_id="t2", user_id="u2", split="train", history_item_ids=[0, 1, 2], target_item_id=3),
        dict(sample_id="t3", user_id="u3", split="train", history_item_ids=[4], target_item_id=5),
    ]
    for r in rows:
        r["history_titles"] = [catalog.titles[i] for i in r["history_item_ids"]]
        r["target_title"] = catalog.titles[r["target_item_id"]]
    return Dataset(catalog=catalog, samples=Samples.from_records(rows), name="hand")


def test_summary_fields_on_a_hand_example(hand_dataset, tmp_path):
    ds = hand_dataset
    # t1: cluster {a}; candidates 2 (target: filtered), 4 (out, exp 1), 5 (out, exp 0), 3 (in, exp 0)
    # t2: cluster {a}; candidates 3 (target: filtered), 0 (history: filtered), 6 (out, 0) -> 6
    # t3: cluster {b}; candidates 6 (in, 0), 7 (in, 0) -> least_overlap fallback 6
    cands = pd.DataFrame({"sample_id": ["t1", "t2", "t3"],
                          "candidate_item_ids": [[2, 4, 5, 3], [3, 0, 6], [6, 7]]})
    frame, s = sample_negatives(ds, cands, "clusterout_low")
    assert frame["rejected_item_ids"].tolist() == [[5], [6], [6]]
    assert s["records"] == {"in": 3, "out": 3, "dropped": {}, "dropped_total": 0}
    assert s["fallbacks"] == {"least_overlap": {"count": 1, "share": round(1 / 3, 6)}}
    neg = s["negatives"]
    assert neg["total"] == 3 and neg["per_record"] == 1.0 and neg["short_records"] == 0
    assert neg["in_cluster_share"] == round(1 / 3, 6)
    assert neg["mean_exposure"] == 0.0 and neg["zero_exposure_share"] == 1.0
    assert neg["catalog_mean_exposure"] == pytest.approx((2 + 2 + 1 + 1) / 8)
    assert neg["exposure_vs_catalog"] == 0.0
    assert s["candidate_pool"]["mean_exposure"] == pytest.approx((1 + 0 + 0 + 0 + 0 + 0) / 6, abs=1e-6)
    assert s["candidate_pool"]["in_cluster_share"] == pytest.approx(3 / 6)
    c = s["candidates"]
    assert (c["filtered_target"], c["filtered_history"], c["duplicates_removed"]) == (2, 1, 0)
    assert s["duplicates_avoided"] == 0
    # the composite on the same data counts its duplicates
    _, s2 = sample_negatives(ds, cands, "clusterin_low_clusterout_low")
    assert s2["duplicates_avoided"] == 1  # t3: clusterin_low 6 == clusterout_low 6 -> 7
    assert s2["fallbacks"]["duplicate_replaced"]["count"] == 1
    assert s2["fallbacks"]["no_in_cluster_candidate"]["count"] == 1  # t2
    # printed summary mentions the numbers; saved beside the dataset
    from raydpo.sampling import format_summary

    text = format_summary(s)
    assert "least_overlap 1 (33.3%)" in text and "3/3 records" in text
    out, sp = write_output(frame, s, tmp_path / "co.parquet")
    assert sp == summary_path(out) == tmp_path / "co.summary.json"
    assert json.loads(sp.read_text())["fallbacks"]["least_overlap"]["count"] == 1


# ------------------------------------------------------------------------------------------------
# output files


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_output_round_trips(small, small_annotated, tmp_path, suffix):
    ds, _ = small
    frame, summary = sample_negatives(ds, small_annotated, "clusterin_high_clusterout_low", seed=0)
    assert Counter(len(r) for r in frame["rejected"]).keys() <= {1, 2}
    out, sp = write_output(frame, summary, tmp_path / f"prefs{suffix}")
    back = read_preferences(out)
    assert len(back) == len(frame)
    assert [list(x) for x in back["rejected"]] == frame["rejected"].tolist()
    assert [list(map(int, x)) for x in back["rejected_item_ids"]] == frame["rejected_item_ids"].tolist()
    assert back["prompt"].tolist() == frame["prompt"].tolist()
    assert not any(r == "" for x in back["rejected"] for r in x)  # never padded with empty strings
    pairs = to_pairs(back)
    assert pairs["rejected"].tolist() == [x[0] for x in frame["rejected"]]
    assert set(pairs.columns) >= {"prompt", "chosen", "rejected"}
    exploded = to_pairs(back, mode="explode")
    assert len(exploded) == sum(len(x) for x in frame["rejected"])
    assert sp.exists() and json.loads(sp.read_text())["strategy"] == "clusterin_high_clusterout_low"
    # TRL pair files: rejected is a string; read_preferences reads them back as one-element lists
    for mode, rows in (("first", len(frame)), ("explode", sum(len(x) for x in frame["rejected"]))):
        out, sp = write_output(frame, summary, tmp_path / f"pairs_{mode}{suffix}", pairs=mode)
        raw = pd.read_parquet(out) if suffix == ".parquet" else pd.read_json(out, lines=True)
        assert len(raw) == rows and all(isinstance(r, str) for r in raw["rejected"])
        assert json.loads(sp.read_text())["format"] == f"pairs-{mode}"
        assert len(read_preferences(out)) == rows


# ------------------------------------------------------------------------------------------------
# CLI


def _parser():
    p = argparse.ArgumentParser(prog="raydpo")
    add_sampling_parser(p.add_subparsers(dest="command"))
    return p


def test_cli_sample(small, tmp_path, capsys):
    ds, cands = small
    data = ds.save(tmp_path / "data")
    cpath = tmp_path / "cands" / "candidates.parquet"
    cpath.parent.mkdir()
    cands.to_parquet(cpath)
    args = _parser().parse_args(["sample", "--data", str(data), "--candidates", str(cpath), "--strategy",
                                 "clusterout_low", "--seed", "3", "--out", str(tmp_path / "o.jsonl")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "strategy clusterout_low" in out and "fallbacks" in out
    back = read_preferences(tmp_path / "o.jsonl")
    assert len(back) > 0 and (tmp_path / "o.summary.json").exists()
    # several strategies into a folder, one annotation
    args = _parser().parse_args(["sample", "--data", str(data), "--candidates", str(cpath), "--strategy",
                                 "random", "top_n", "--n-negatives", "3", "-q"])
    assert args.func(args) == 0
    for name in ("random", "top_n"):
        f = read_preferences(tmp_path / "cands" / "negatives" / f"{name}.parquet")
        assert f["rejected"].apply(len).max() == 3
        assert (tmp_path / "cands" / "negatives" / f"{name}.summary.json").exists()
    args = _parser().parse_args(["sample", "--list"])
    assert args.func(args) == 0 and "clusterin_low_clusterout_low" in capsys.readouterr().out
    args = _parser().parse_args(["sample", "--data", str(data), "--candidates", str(cpath), "--strategy", "bogus"])
    with pytest.raises(DataError, match="known strategies"):
        args.func(args)


def test_cli_plugin(small, tmp_path):
    ds, cands = small
    plugin = tmp_path / "my_strats.py"
    plugin.write_text(
        "from raydpo.sampling import register_strategy\n"
        "@register_strategy('plugin_last', replace=True)\n"
        "def plugin_last(ctx):\n"
        "    '''The last candidate.'''\n"
        "    return [int(ctx.items[-1])] if len(ctx.items) else []\n")
    data = ds.save(tmp_path / "data")
    cpath = tmp_path / "c.parquet"
    cands.to_parquet(cpath)
    try:
        args = _parser().parse_args(["sample", "--data", str(data), "--candidates", str(cpath), "--plugin",
                                     str(plugin), "--strategy", "plugin_last", "--out", str(tmp_path / "p.parquet"),
                                     "-q"])
        assert args.func(args) == 0
        assert len(read_preferences(tmp_path / "p.parquet")) > 0
    finally:
        unregister_strategy("plugin_last")


# ------------------------------------------------------------------------------------------------
# more annotation edge cases


def test_annotation_dedups_stably_and_counts(hand_dataset):
    # t1: target 2, history [0, 1]
    cands = pd.DataFrame({"sample_id": ["t1"], "candidate_item_ids": [[5, 7, 5, 2, 6, 7, 0]]})
    ann = annotate(hand_dataset, cands)
    f = ann.to_frame(hand_dataset.catalog)
    assert list(f["candidate_item_ids"][0]) == [5, 7, 6]
    assert list(f["candidate_beam_rank"][0]) == [0, 1, 4]
    c = ann.counts
    assert (c["duplicates_removed"], c["filtered_target"], c["filtered_history"]) == (2, 1, 1)
    assert list(f["interest_cluster"][0]) == ["a"]


def test_unknown_history_and_target_titles_keep_their_text(hand_dataset):
    cat = hand_dataset.catalog
    rows = [dict(sample_id="x1", user_id="ux", split="train", history_item_ids=[0, -1],
                 history_titles=["Book 0", "A Lost Book"], target_item_id=-1, target_title="Moxie"),
            dict(sample_id="x2", user_id="uy", split="train", history_item_ids=[4],
                 history_titles=["Book 4"], target_item_id=5, target_title="Book 5")]
    ds = Dataset(catalog=cat, samples=Samples.from_records(rows), name="unknowns", instruction="Recommend.")
    frame, s = sample_negatives(ds, pd.DataFrame({"sample_id": ["x1", "x2"],
                                                  "candidate_item_ids": [[4, 5], [6, 5]]}), "clusterout_low")
    assert frame["prompt"].tolist() == [user_message(["Book 0", "A Lost Book"], "Recommend."),
                                        user_message(["Book 4"], "Recommend.")]
    assert frame["chosen"].tolist() == ['"Moxie"', '"Book 5"']
    assert frame["chosen_item_id"].tolist() == [-1, 5]
    assert frame["rejected_item_ids"].tolist() == [[5], [6]]  # 4 has train exposure 1, 5 has 0
    # titles that disagree with the catalog for a known id: the dataset's own text is used
    rows[1]["history_titles"] = ["book four"]
    ds2 = Dataset(catalog=cat, samples=Samples.from_records(rows), name="odd")
    frame2, _ = sample_negatives(ds2, pd.DataFrame({"sample_id": ["x2"], "candidate_item_ids": [[6]]}), "selfplay")
    assert frame2["prompt"].iloc[0] == user_message(["book four"], None)


def test_empty_candidate_table(small, tmp_path):
    ds, cands = small
    frame, s = sample_negatives(ds, cands.iloc[:0], "clusterout_low")
    assert len(frame) == 0 and s["records"]["in"] == 0 and s["negatives"]["total"] == 0
    out, _ = write_output(frame, s, tmp_path / "empty.parquet")
    assert out.exists()


def test_sample_to_file_takes_annotated_candidates(small, small_annotated, small_lightgcn, tmp_path):
    """The pipeline annotates once per split and reuses it for every (strategy, n): same files."""
    from raydpo.sampling.run import sample_to_file

    ds, cands = small
    for strategy in ("clusterout_low", "in_past_nearest"):
        kw = dict(seed=3, n_negatives=2, quiet=True, lightgcn=small_lightgcn)
        (fresh,) = sample_to_file(ds, cands, strategy, tmp_path / f"fresh-{strategy}.parquet", **kw)
        (reused,) = sample_to_file(ds, small_annotated, strategy, tmp_path / f"reused-{strategy}.parquet", **kw)
        a, b = read_preferences(fresh["output"]), read_preferences(reused["output"])
        assert len(a) > 0 and a.equals(b)
    with pytest.raises(RaydpoError, match="already annotated"):
        sample_to_file(ds, small_annotated, "clusterout_low", tmp_path / "x.parquet", cluster_k=2)
