"""The synthetic dataset generator: determinism, catalog and sample invariants, learnable structure,
save/load round trip, config validation."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from raydpo.data.schema import SPLITS, Dataset
from raydpo.data.synthetic import GENRES, SyntheticConfig, generate
from raydpo.errors import DataError

SMALL = dict(n_users=600, n_items=240, seed=3)
SERIES_TITLE = re.compile(r"^(?P<base>.+) \((?P<series>[^()]+), #(?P<num>\d+)\)$")


@pytest.fixture(scope="module")
def small() -> Dataset:
    return generate(SyntheticConfig(**SMALL))


def sequences(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    f = ds.samples.frame
    hist = np.stack([np.asarray(h, dtype=np.int64) for h in f["history_item_ids"]])
    return hist, f["target_item_id"].to_numpy(dtype=np.int64)


def successors_from_titles(titles) -> np.ndarray:
    """Item -> next item of its series, read off the "(Series, #k)" suffix of the titles (-1: none)."""
    by_key = {}
    for i, t in enumerate(titles):
        m = SERIES_TITLE.match(t)
        if m:
            by_key[(m["series"], int(m["num"]))] = i
    succ = np.full(len(titles), -1, dtype=np.int64)
    for (series, num), i in by_key.items():
        succ[i] = by_key.get((series, num + 1), -1)
    return succ


def top3_genre_coverage(ds: Dataset, hist: np.ndarray) -> float:
    """Mean share of a history's genre labels that fall in its own three most frequent genres."""
    vocab = {g: j for j, g in enumerate(ds.catalog.genre_vocab)}
    labels = np.zeros((len(ds.catalog), len(vocab)))
    for i, gs in enumerate(ds.catalog.genres):
        labels[i, [vocab[g] for g in gs]] = 1.0
    mass = labels[hist].sum(axis=1)  # [users, genres]
    top3 = np.sort(mass, axis=1)[:, ::-1][:, :3].sum(axis=1)
    return float((top3 / mass.sum(axis=1)).mean())


# --- determinism -----------------------------------------------------------------------------


def test_same_config_gives_identical_dataset():
    a, b = generate(SyntheticConfig(**SMALL)), generate(SyntheticConfig(**SMALL))
    pd.testing.assert_frame_equal(a.samples.frame, b.samples.frame)
    assert a.catalog.titles == b.catalog.titles
    assert a.catalog.genres == b.catalog.genres
    assert a.report == b.report and a.meta == b.meta


def test_different_seed_gives_different_dataset(small):
    other = generate(SyntheticConfig(**{**SMALL, "seed": SMALL["seed"] + 1}))
    assert other.catalog.titles != small.catalog.titles
    h1, t1 = sequences(small)
    h2, t2 = sequences(other)
    assert (h1 != h2).mean() > 0.5 and (t1 != t2).mean() > 0.5


def test_catalog_does_not_depend_on_the_number_of_users(small):
    more = generate(SyntheticConfig(**{**SMALL, "n_users": SMALL["n_users"] * 2}))
    assert more.catalog.titles == small.catalog.titles
    assert more.catalog.genres == small.catalog.genres


# --- catalog ---------------------------------------------------------------------------------


def test_titles_unique_quote_free_and_readable(small):
    titles = small.catalog.titles
    assert len(titles) == SMALL["n_items"]
    assert len(set(titles)) == len(titles)
    assert not [t for t in titles if '"' in t or t != t.strip() or "  " in t]
    # readable words, not ids: every title starts with a capital letter and has at least two words
    assert all(t[0].isupper() and len(t.split()) >= 2 for t in titles)


def test_series_are_consecutive_numbered_and_share_genres(small):
    cat = small.catalog
    members = defaultdict(list)
    for i, t in enumerate(cat.titles):
        m = SERIES_TITLE.match(t)
        if m:
            members[m["series"]].append((i, int(m["num"])))
    assert members, "expected some multi-book series"
    lengths = []
    for series, items in members.items():
        ids = [i for i, _ in items]
        nums = [n for _, n in items]
        assert nums == list(range(1, len(items) + 1)), series
        assert ids == list(range(ids[0], ids[0] + len(ids))), series  # consecutive item ids
        assert len({cat.genres[i] for i in ids}) == 1, series
        lengths.append(len(items))
    assert max(lengths) <= SyntheticConfig().max_series_len
    assert min(lengths) >= 2  # a one-book "series" is a stand-alone title without suffix
    standalone = [t for t in cat.titles if not SERIES_TITLE.match(t)]
    assert standalone, "expected some stand-alone books"


def test_genres_labels_and_fairness_genres(small):
    cat = small.catalog
    n_genres = SyntheticConfig().n_genres
    allowed = set(GENRES[:n_genres])
    for gs in cat.genres:
        assert 1 <= len(gs) <= 3 and len(set(gs)) == len(gs) and set(gs) <= allowed
    assert set(cat.fairness_genres) == allowed == set(cat.genre_vocab)
    # the first label is the series' main genre: every genre is some item's main genre
    assert {gs[0] for gs in cat.genres} == allowed


# --- samples ---------------------------------------------------------------------------------


def test_histories_targets_and_titles_are_consistent(small):
    cfg = SyntheticConfig(**SMALL)
    f = small.samples.frame
    hist, target = sequences(small)
    assert hist.shape == (cfg.n_users, cfg.history_len)
    seq = np.column_stack([hist, target])
    assert seq.min() >= 0 and seq.max() < len(small.catalog)
    # no item repeats within one user's history + target
    assert (np.diff(np.sort(seq, axis=1), axis=1) != 0).all()
    titles = np.array(small.catalog.titles, dtype=object)
    for ids, names in zip(f["history_item_ids"], f["history_titles"]):
        assert list(names) == list(titles[np.asarray(ids)])
    assert list(f["target_title"]) == list(titles[target])
    small.samples.validate(small.catalog)


def test_every_user_in_exactly_one_split(small):
    cfg = SyntheticConfig(**SMALL)
    f = small.samples.frame
    assert f["user_id"].is_unique and f["sample_id"].is_unique
    assert set(f["user_id"]) == {f"u{i}" for i in range(cfg.n_users)}
    assert all(s.startswith("synthetic-") for s in f["sample_id"])
    counts = f["split"].value_counts().to_dict()
    assert set(counts) == set(SPLITS)
    n_valid, n_test = cfg.split_sizes()
    assert (counts["valid"], counts["test"]) == (n_valid, n_test)
    assert counts["train"] == cfg.n_users - n_valid - n_test
    assert abs(n_valid - cfg.valid_fraction * cfg.n_users) <= 1
    assert len(small.split("train")) + len(small.split("valid")) + len(small.split("test")) == cfg.n_users


def test_tiny_config_still_valid():
    cfg = SyntheticConfig(n_users=5, n_items=12, history_len=10, n_genres=8)  # few items per genre
    ds = generate(cfg)
    hist, target = sequences(ds)
    seq = np.column_stack([hist, target])
    assert (np.diff(np.sort(seq, axis=1), axis=1) != 0).all()
    assert set(ds.samples.frame["split"]) == set(SPLITS)  # at least one user per non-zero split


# --- learnable structure ---------------------------------------------------------------------


def test_targets_often_continue_the_series_of_the_last_item(small):
    hist, target = sequences(small)
    succ = successors_from_titles(small.catalog.titles)
    follows = succ[hist[:, -1]] == target
    shuffled = succ[hist[:, -1]] == np.random.default_rng(0).permutation(target)
    assert follows.mean() > 0.15
    assert follows.mean() > 5 * max(shuffled.mean(), 1 / len(small.catalog))
    # the knob drives it: without series continuation the share falls to roughly chance level
    flat = generate(SyntheticConfig(**{**SMALL, "series_prob": 0.0}))
    h0, t0 = sequences(flat)
    assert (succ[h0[:, -1]] == t0).mean() < follows.mean() / 3


def test_histories_concentrate_in_few_genres(small):
    hist, _ = sequences(small)
    real = top3_genre_coverage(small, hist)
    # the same items, dealt out to users at random: same popularity, no user taste
    shuffled = np.random.default_rng(0).permutation(hist.ravel()).reshape(hist.shape)
    baseline = top3_genre_coverage(small, shuffled)
    assert real > baseline + 0.08, (real, baseline)


def test_popularity_is_heavy_tailed(small):
    def top_decile_share(ds):
        hist, target = sequences(ds)
        counts = np.bincount(np.concatenate([hist.ravel(), target]), minlength=len(ds.catalog))
        top = np.sort(counts)[::-1][: len(counts) // 10]
        return top.sum() / counts.sum()

    skewed = top_decile_share(small)
    flat = top_decile_share(generate(SyntheticConfig(**{**SMALL, "popularity_exponent": 0.0})))
    assert skewed > 0.3  # 10% of the items get at least three times their uniform share
    assert skewed > flat + 0.15, (skewed, flat)


# --- persistence -----------------------------------------------------------------------------


def test_save_load_roundtrip(small, tmp_path):
    small.save(tmp_path / "synthetic")
    back = Dataset.load(tmp_path / "synthetic")
    pd.testing.assert_frame_equal(back.samples.frame, small.samples.frame)
    assert back.catalog.titles == small.catalog.titles
    assert back.catalog.genres == small.catalog.genres
    assert back.catalog.fairness_genres == small.catalog.fairness_genres
    assert (back.name, back.instruction) == (small.name, small.instruction) == ("synthetic", small.instruction)
    assert back.instruction
    assert back.meta == small.meta and back.report == small.report
    assert back.meta["source"]["config"]["seed"] == SMALL["seed"]


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n_users": 0}, "n_users"),
        ({"n_users": 2.5}, "n_users"),
        ({"n_items": 11, "history_len": 10}, "n_items"),
        ({"history_len": 0}, "history_len"),
        ({"n_genres": 0}, "n_genres"),
        ({"n_genres": len(GENRES) + 1}, "n_genres"),
        ({"genres_per_user": (0, 2)}, "genres_per_user"),
        ({"genres_per_user": (3, 2)}, "genres_per_user"),
        ({"genres_per_user": (4, 4), "n_genres": 3}, "genres_per_user"),
        ({"popularity_exponent": -1.0}, "popularity_exponent"),
        ({"popularity_exponent": math.nan}, "popularity_exponent"),
        ({"series_prob": 1.5}, "series_prob"),
        ({"explore_prob": -0.1}, "explore_prob"),
        ({"max_series_len": 0}, "max_series_len"),
        ({"valid_fraction": 1.0}, "valid_fraction"),
        ({"valid_fraction": 0.6, "test_fraction": 0.5}, "valid_fraction"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"n_users": 2, "valid_fraction": 0.1, "test_fraction": 0.1}, "n_users"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(DataError) as err:
        SyntheticConfig(**kwargs)
    assert err.value.field == field
    assert f"'{field}'" in str(err.value)
