"""Catalog statistics: item exposure (popularity) and each sample's interest cluster.

Both are vectorised over samples (numpy), so they scale to millions of users.

Exposure scopes
    ``split_histories`` (the reference): count every history slot of the samples of one split.
    ``train_interactions``: count history slots and targets of the train split, one count per
    distinct (user, item) pair, i.e. how often the item was interacted with in training data.

Ranks follow ``Counter.most_common``: by count descending, ties by first appearance in scan
order (samples in order, each history oldest first). Items never seen get count 0 and rank -1.

Interest cluster: the top-k genre labels of the history, each history title adding +1 to each
of its labels; ties broken by first appearance (titles left to right, each title's labels in
its own order), exactly as the reference's stable sort. Genres carried by almost every item
(``ignore_genres_above``, e.g. 0.9 drops "fiction" from Goodreads) or named explicitly
(``ignore_genres``) can be left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from ..errors import DataError
from .schema import UNKNOWN_ITEM, Catalog, Samples

ExposureScope = Literal["split_histories", "train_interactions"]


@dataclass(frozen=True)
class Exposure:
    counts: np.ndarray  # [n_items] int64
    ranks: np.ndarray  # [n_items] int64, 1 = most exposed, -1 = never seen
    scope: str

    def rank_of(self, item_id: int) -> int | None:
        r = int(self.ranks[item_id])
        return None if r < 0 else r


def _ranks_from_counts(counts: np.ndarray, first_seen: np.ndarray) -> np.ndarray:
    order = np.lexsort((first_seen, -counts))
    ranks = np.full(len(counts), -1, dtype=np.int64)
    seen = counts[order] > 0
    ranks[order[seen]] = np.arange(1, int(seen.sum()) + 1)
    return ranks


def _count_sequence(items: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    items = items[items >= 0]
    counts = np.bincount(items, minlength=n_items).astype(np.int64)
    first = np.full(n_items, np.iinfo(np.int64).max, dtype=np.int64)
    # reverse assignment: the earliest position wins
    pos = np.arange(len(items), dtype=np.int64)
    first[items[::-1]] = pos[::-1]
    return counts, first


def exposure(
    catalog: Catalog,
    samples: Samples,
    scope: ExposureScope = "split_histories",
    split: str | None = "train",
) -> Exposure:
    """Item exposure counts and ranks.

    ``split_histories`` counts the history slots of ``split`` (all samples if ``split`` is None).
    ``train_interactions`` counts distinct (user, item) interactions of the train split.
    """
    n = len(catalog)
    if scope == "split_histories":
        s = samples.split(split) if split else samples
        flat = np.concatenate([np.asarray(h, dtype=np.int64) for h in s.frame["history_item_ids"]] or [np.empty(0, np.int64)])
        counts, first = _count_sequence(flat, n)
    elif scope == "train_interactions":
        s = samples.split("train")
        users = s.frame["user_id"].to_numpy()
        seqs = [np.append(np.asarray(h, dtype=np.int64), t) for h, t in zip(s.frame["history_item_ids"], s.target_ids)]
        lens = np.array([len(q) for q in seqs], dtype=np.int64)
        flat = np.concatenate(seqs or [np.empty(0, np.int64)])
        user_codes = np.repeat(np.unique(users, return_inverse=True)[1], lens)
        keep = flat >= 0
        flat, user_codes = flat[keep], user_codes[keep]
        pair = user_codes * n + flat
        _, first_idx = np.unique(pair, return_index=True)
        first_idx.sort()
        counts, first = _count_sequence(flat[first_idx], n)
    else:
        raise DataError(f"unknown exposure scope {scope!r}; expected split_histories or train_interactions",
                        field="scope")
    return Exposure(counts=counts, ranks=_ranks_from_counts(counts, first), scope=scope)


def cluster_genres(
    catalog: Catalog,
    ignore_genres: Sequence[str] = (),
    ignore_genres_above: float | None = None,
) -> np.ndarray:
    """Boolean mask over ``catalog.genre_vocab``: which genres may enter an interest cluster."""
    if ignore_genres_above is not None and not 0 < ignore_genres_above <= 1:  # also refuses nan
        raise DataError(f"must be a share in (0, 1], got {ignore_genres_above!r} (it would empty every cluster)",
                        field="ignore_genres_above")
    unknown = [g for g in ignore_genres if g not in catalog.genre_vocab]
    if unknown:
        raise DataError(f"unknown genres {unknown}; the catalog has {list(catalog.genre_vocab)}",
                        field="ignore_genres")
    freq = catalog.genre_frequency()
    return np.array(
        [
            g not in ignore_genres and (ignore_genres_above is None or freq[g] <= ignore_genres_above)
            for g in catalog.genre_vocab
        ],
        dtype=bool,
    )


def interest_clusters(
    catalog: Catalog,
    samples: Samples,
    k: int = 3,
    ignore_genres: Sequence[str] = (),
    ignore_genres_above: float | None = None,
) -> np.ndarray:
    """``[n_samples, k]`` genre indices (into ``catalog.genre_vocab``) of each interest cluster.

    Rows are ordered by weight, ties by first appearance; -1 pads clusters with fewer than k
    genres (short histories or unknown titles).
    """
    if k < 1:
        raise DataError(f"k must be >= 1, got {k}", field="k")
    allowed = cluster_genres(catalog, ignore_genres, ignore_genres_above)
    hist = samples.history_matrix()
    gm = catalog.genre_matrix  # [I, W]
    n_s, length = hist.shape
    width = gm.shape[1]
    n_g = len(catalog.genre_vocab)
    counts = np.zeros((n_s, n_g), dtype=np.int64)
    big = np.iinfo(np.int64).max
    first = np.full((n_s, n_g), big, dtype=np.int64)
    rows = np.arange(n_s)
    # iterate positions in reverse so that the earliest occurrence is the last assignment
    for pos in range(length - 1, -1, -1):
        items = hist[:, pos]
        known = items != UNKNOWN_ITEM
        for slot in range(width - 1, -1, -1):
            g = np.where(known, gm[np.maximum(items, 0), slot], -1)
            ok = g >= 0
            ok[ok] = allowed[g[ok]]
            r, gg = rows[ok], g[ok]
            counts[r, gg] += 1
            first[r, gg] = pos * width + slot
    # order: count desc, then first appearance asc
    key = np.where(counts > 0, -counts * (length * width + 1) + np.minimum(first, length * width), big)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    top_counts = np.take_along_axis(counts, order, axis=1)
    out = np.where(top_counts > 0, order, -1)
    if out.shape[1] < k:
        out = np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1)
    return out


def cluster_names(catalog: Catalog, clusters: np.ndarray) -> list[list[str]]:
    vocab = catalog.genre_vocab
    return [[vocab[g] for g in row if g >= 0] for row in clusters]
