"""What a negative-sampling strategy sees: the annotated candidates of one sample, or of a batch.

``SamplingState`` holds what every record shares (catalog size and titles, genre masks, exposure
tables, optional LightGCN item vectors). ``BatchContext`` is a chunk of annotated records as
padded ``[B, C]`` numpy matrices (candidates left-aligned in beam order, ``-1`` padded); the
vectorised built-in strategies work on it. ``SampleContext`` is one row of a batch: the argument
of every strategy function, built-in or user-defined.

Randomness is per record and independent of batching: each record's key is a stable 64-bit hash
of ``(seed, sample_id)`` (``record_keys``); ``uniforms(count, start)`` is a counter-based stream (splitmix64 of
key + counter), so the j-th number of a record is the same whether it is drawn in a batch of one
or of a million. ``SampleContext.rng`` is a numpy Generator seeded from the same key, for user
strategies that prefer numpy's API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import RaydpoError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
MAX_MASK_GENRES = 63


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection on uint64 with good avalanche)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def record_keys(seed: int, sample_ids) -> np.ndarray:
    """``uint64`` key per record from (seed, sample_id) only: FNV-1a-64 over the sample id's UTF-8
    bytes, xor a splitmix64 of the seed, then the splitmix64 finaliser. Stable across runs,
    platforms and processes (never Python's salted ``hash()``), and vectorised over the Arrow
    string buffer (one numpy pass per byte position)."""
    arr = sample_ids
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if not isinstance(arr, pa.Array):
        arr = pa.array([str(x) for x in arr], pa.string())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = pc.cast(arr, pa.string())
    n = len(arr)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    if n:
        bufs = arr.buffers()
        otype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(bufs[1], dtype=otype)[arr.offset: arr.offset + n + 1].astype(np.int64)
        data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
        lens, starts = np.diff(offsets), offsets[:-1]
        idx = np.arange(n)
        with np.errstate(over="ignore"):
            for pos in range(int(lens.max()) if n else 0):
                idx = idx[lens[idx] > pos]
                h[idx] = (h[idx] ^ data[starts[idx] + pos].astype(np.uint64)) * _FNV_PRIME
    seed_key = _mix64(np.array([np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF) + _GOLDEN], dtype=np.uint64))[0]
    return _mix64(h ^ seed_key)


def counter_uniforms(keys: np.ndarray, start: int, count: int) -> np.ndarray:
    """``[len(keys), count]`` uniforms in [0, 1): splitmix64(key + (start + j + 1) * golden)."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    ctr = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _mix64(keys[:, None] + ctr[None, :] * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)


# ------------------------------------------------------------------------------------------------
# arrow helpers


def list_parts(arr: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """``(lengths, flat values)`` of a list column; null lists count as empty."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten()
    return lengths, values.to_numpy(zero_copy_only=False)


def pad(lengths: np.ndarray, values: np.ndarray, fill, dtype, width: int | None = None,
        mask: np.ndarray | None = None) -> np.ndarray:
    """Left-aligned ``[len(lengths), width]`` matrix of ragged rows, ``fill`` padded. ``mask``
    (``arange(width) < lengths[:, None]``) may be passed when several columns share the lengths."""
    b = len(lengths)
    w = int(width if width is not None else max(int(lengths.max()) if b else 0, 1))
    out = np.full((b, w), fill, dtype=dtype)
    if len(values):
        if mask is None:
            mask = np.arange(w)[None, :] < lengths[:, None]
        out[mask] = values  # boolean assignment fills row-major, i.e. in the flat order of the values
    return out


def list_array(lengths: np.ndarray, values: pa.Array | np.ndarray, type_=None) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    vals = values if isinstance(values, pa.Array) else pa.array(values, type=type_)
    if offsets[-1] < 2**31 - 1:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), vals)
    return pa.LargeListArray.from_arrays(pa.array(offsets), vals)


# ------------------------------------------------------------------------------------------------
# shared state


@dataclass
class SamplingState:
    """Everything records share. Small enough to broadcast to Ray workers (``ray.put``)."""

    n_items: int
    titles: pa.Array | None = None  # catalog titles, for the output records
    genre_vocab: tuple[str, ...] = ()
    item_genres: np.ndarray | None = None  # [I, W] genre indices, -1 padded (catalog.genre_matrix)
    exposure_counts: np.ndarray | None = None  # [T, I] one row per exposure table (per split or global)
    exposure_ranks: np.ndarray | None = None  # [T, I], -1 = never seen
    exposure_tables: tuple[str, ...] = ()
    embeddings: np.ndarray | None = None  # [I, d] float64 item vectors (LightGCN)
    seen: np.ndarray | None = None  # [I] bool: the item has an embedding learnt from interactions
    embedding_kind: str | None = None
    instruction: str | None = None
    item_genre_mask: np.ndarray | None = field(default=None, repr=False)  # [I] uint64, derived
    sqnorms: np.ndarray | None = field(default=None, repr=False)  # [I] |e|^2, derived

    def __post_init__(self) -> None:
        if self.item_genres is not None and self.item_genre_mask is None and len(self.genre_vocab) <= MAX_MASK_GENRES:
            self.item_genre_mask = cluster_masks(self.item_genres)
        if self.embeddings is not None:
            self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float64)
            if self.embeddings.shape[0] != self.n_items:
                raise RaydpoError(f"embeddings have {self.embeddings.shape[0]} rows but the catalog has "
                                  f"{self.n_items} items")
            if self.seen is None:
                self.seen = np.ones(self.n_items, dtype=bool)
            self.seen = np.asarray(self.seen, dtype=bool)
            self.sqnorms = np.einsum("id,id->i", self.embeddings, self.embeddings)

    @property
    def has_embeddings(self) -> bool:
        return self.embeddings is not None

    def overlap(self, items: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """``|genres(item) ∩ cluster|`` for ``items [B, W]`` against ``clusters [B, k]`` (-1 = none)."""
        items = np.asarray(items)
        if self.item_genres is None:
            return np.zeros(items.shape, dtype=np.int64)
        safe = np.maximum(items, 0)
        if self.item_genre_mask is not None:
            cm = cluster_masks(clusters)
            out = np.bitwise_count(self.item_genre_mask[safe] & cm[:, None]).astype(np.int64)
        else:  # many genres: compare label by label
            gm = np.asarray(self.item_genres)[safe]  # [B, W, G]
            out = (gm[..., :, None] == np.where(clusters >= 0, clusters, -2)[:, None, None, :]).any(-1).sum(-1)
        return np.where(items >= 0, out, 0)

    def exposure_of(self, items: np.ndarray, table: np.ndarray) -> np.ndarray:
        if self.exposure_counts is None:
            return np.zeros(np.shape(items), dtype=np.int64)
        items = np.asarray(items)
        return np.where(items >= 0, self.exposure_counts[np.asarray(table)[:, None], np.maximum(items, 0)], 0)


def cluster_masks(clusters: np.ndarray) -> np.ndarray:
    c = np.asarray(clusters)
    bits = np.where(c >= 0, np.left_shift(np.uint64(1), np.maximum(c, 0).astype(np.uint64)), np.uint64(0))
    return np.bitwise_or.reduce(bits, axis=1).astype(np.uint64) if c.shape[1] else np.zeros(len(c), np.uint64)


# ------------------------------------------------------------------------------------------------
# batch context



class BatchContext:
    """A chunk of annotated records as padded matrices (see the module docstring).

    Attributes (``B`` records, ``C`` = the longest candidate list of the chunk, at least 1):
    ``items``, ``exposure``, ``exposure_rank``, ``overlap``, ``beam_rank`` ``[B, C]`` int64 (-1 pad);
    ``valid``, ``in_cluster`` ``[B, C]`` bool; ``lengths`` ``[B]``; ``target`` ``[B]``;
    ``history`` ``[B, L]`` (-1 = padding or unknown title); ``cluster`` ``[B, k]`` genre indices;
    ``exposure_table`` ``[B]`` (row of the state's exposure tables); ``sample_ids``, ``splits``.
    """

    def __init__(self, table: pa.Table, state: SamplingState, seed: int = 0, n: int = 1) -> None:
        self.table = table
        self.state = state
        self.seed = int(seed)
        self.n = int(n)
        self.size = table.num_rows
        lengths, items = list_parts(table.column("candidate_item_ids"))
        self.lengths = lengths
        self.width = max(int(lengths.max()) if self.size else 0, 1)
        self._mask = np.arange(self.width)[None, :] < lengths[:, None]
        self.items = pad(lengths, items.astype(np.int64, copy=False), -1, np.int64, self.width, self._mask)
        self.valid = self.items >= 0
        self.exposure = self._padded("candidate_exposure")
        self.overlap = self._padded("candidate_overlap")
        self.in_cluster = self.valid & (self.overlap > 0)
        self.target = table.column("target_item_id").to_numpy().astype(np.int64, copy=False)
        hl, hv = list_parts(table.column("history_item_ids"))
        self.history = pad(hl, hv.astype(np.int64, copy=False), -1, np.int64)
        cl, cv = list_parts(table.column("cluster"))
        self.cluster = pad(cl, cv.astype(np.int64), -1, np.int64)
        self.exposure_table = table.column("exposure_table").to_numpy().astype(np.int64)
        self._keys: np.ndarray | None = None
        self._emb: dict | None = None
        self._extra: dict[str, np.ndarray] = {}
        self._lazy: dict[str, np.ndarray] = {}

    def _padded(self, name: str, fill=0, dtype=np.int64) -> np.ndarray:
        _, v = list_parts(self.table.column(name))
        return pad(self.lengths, v.astype(dtype, copy=False), fill, dtype, self.width, self._mask)

    @property
    def exposure_rank(self) -> np.ndarray:
        if "exposure_rank" not in self._lazy:
            self._lazy["exposure_rank"] = self._padded("candidate_exposure_rank", -1)
        return self._lazy["exposure_rank"]

    @property
    def beam_rank(self) -> np.ndarray:
        if "beam_rank" not in self._lazy:
            self._lazy["beam_rank"] = self._padded("candidate_beam_rank", -1)
        return self._lazy["beam_rank"]

    @property
    def sample_ids(self) -> np.ndarray:
        if "sample_ids" not in self._lazy:
            self._lazy["sample_ids"] = self.table.column("sample_id").to_numpy(zero_copy_only=False)
        return self._lazy["sample_ids"]

    @property
    def splits(self) -> np.ndarray:
        if "splits" not in self._lazy:
            self._lazy["splits"] = self.table.column("split").to_numpy(zero_copy_only=False)
        return self._lazy["splits"]

    def __len__(self) -> int:
        return self.size

    # -- randomness --------------------------------------------------------------------------------
    @property
    def keys(self) -> np.ndarray:
        if self._keys is None:
            self._keys = record_keys(self.seed, self.table.column("sample_id"))
        return self._keys

    def uniforms(self, start: int, count: int) -> np.ndarray:
        return counter_uniforms(self.keys, start, count)

    # -- optional candidate columns ----------------------------------------------------------------
    def column(self, name: str) -> np.ndarray | None:
        """A padded float list column such as ``candidate_logprobs`` (NaN pad), or None if absent."""
        if name not in self._extra:
            if name not in self.table.column_names:
                return None
            _, v = list_parts(self.table.column(name))
            self._extra[name] = pad(self.lengths, v.astype(np.float64), np.nan, np.float64, self.width, self._mask)
        return self._extra[name]

    # -- LightGCN distances ------------------------------------------------------------------------
    def _embedding_arrays(self) -> dict:
        """Cheap per-batch masks; the distances are computed lazily, one anchor at a time."""
        if self._emb is None:
            st = self.state
            if not st.has_embeddings:
                raise RaydpoError("this strategy needs LightGCN item embeddings: pass lightgcn=... (or register it "
                                  "with needs_embeddings=True so that one is trained)")
            seen = st.seen
            embedded = self.valid & seen[np.maximum(self.items, 0)]
            hs = (self.history >= 0) & seen[np.maximum(self.history, 0)]
            chosen_ok = (self.target >= 0) & seen[np.maximum(self.target, 0)]
            self._emb = {"embedded": embedded, "history_seen": hs, "past_ok": hs.any(1), "chosen_ok": chosen_ok}
        return self._emb

    def _distance(self, kind: str) -> np.ndarray:
        """``[B, C]`` L2 distances of the candidates to the anchor (``past`` or ``chosen``), +inf where
        the candidate has no embedding. ``|e - a|^2 = |e|^2 + |a|^2 - 2 e.a`` over float64 vectors,
        so identical embeddings give identical distances (ties stay ties)."""
        key = "dist_" + kind
        emb = self._embedding_arrays()
        if key not in emb:
            E = self.state.embeddings
            if kind == "past":
                hs = emb["history_seen"]
                anchor = np.einsum("bl,bld->bd", hs.astype(np.float64), E[np.maximum(self.history, 0)])
                anchor /= np.maximum(hs.sum(1), 1)[:, None]
            else:
                anchor = E[np.maximum(self.target, 0)]
            if "cand_vectors" not in emb:
                emb["cand_vectors"] = E[np.maximum(self.items, 0)]
                emb["cand_sqnorm"] = self.state.sqnorms[np.maximum(self.items, 0)]
            dot = np.einsum("bcd,bd->bc", emb["cand_vectors"], anchor)
            d2 = emb["cand_sqnorm"] + np.einsum("bd,bd->b", anchor, anchor)[:, None] - 2.0 * dot
            emb[key] = np.where(emb["embedded"], np.sqrt(np.maximum(d2, 0.0)), np.inf)
        return emb[key]

    @property
    def embedded(self) -> np.ndarray:
        """``[B, C]``: the candidate has a LightGCN embedding (it was seen in training)."""
        return self._embedding_arrays()["embedded"]

    @property
    def past_ok(self) -> np.ndarray:
        """``[B]``: at least one history item has an embedding (the history centroid exists)."""
        return self._embedding_arrays()["past_ok"]

    @property
    def chosen_ok(self) -> np.ndarray:
        """``[B]``: the target has an embedding."""
        return self._embedding_arrays()["chosen_ok"]

    @property
    def dist_past(self) -> np.ndarray:
        """``[B, C]`` L2 distance to the mean embedding of the embedded history items (+inf: no embedding)."""
        return self._distance("past")

    @property
    def dist_chosen(self) -> np.ndarray:
        """``[B, C]`` L2 distance to the target's embedding (+inf: no embedding)."""
        return self._distance("chosen")

    def row(self, i: int) -> "SampleContext":
        return SampleContext(self, i)

    def __iter__(self):
        return (SampleContext(self, i) for i in range(self.size))

    # -- construction for tests and notebooks ------------------------------------------------------
    @classmethod
    def from_records(cls, records: Sequence[dict], state: SamplingState | None = None, seed: int = 0,
                     n: int = 1) -> "BatchContext":
        """A batch from hand-written records, e.g.
        ``{"items": [5, 7], "exposure": [3, 0], "overlap": [1, 0], "target": 1, "history": [2, 3]}``.

        Optional keys: ``sample_id`` (default ``"r{i}"``), ``exposure_rank``, ``cluster`` (genre
        indices), ``split`` (``"train"``), ``exposure_table`` (0), ``logprobs``. Missing
        ``exposure``/``overlap`` are looked up in ``state`` (exposure table 0, cluster overlap).
        """
        state = state or SamplingState(n_items=1 + max(
            [max(list(r.get("items", [])) + list(r.get("history", [])) + [int(r.get("target", 0))]) for r in records]
            or [0]))
        cols: dict[str, list] = {k: [] for k in (
            "sample_id", "split", "target_item_id", "history_item_ids", "cluster", "exposure_table",
            "candidate_item_ids", "candidate_beam_rank", "candidate_exposure", "candidate_exposure_rank",
            "candidate_overlap")}
        logprobs = []
        for i, r in enumerate(records):
            items = [int(x) for x in r.get("items", [])]
            table = int(r.get("exposure_table", 0))
            cluster = [int(x) for x in r.get("cluster", [])]
            if "exposure" in r:
                exp = [int(x) for x in r["exposure"]]
            else:
                exp = state.exposure_of(np.array([items], dtype=np.int64).reshape(1, -1),
                                        np.array([table]))[0].tolist()
            if "overlap" in r:
                ov = [int(x) for x in r["overlap"]]
            elif "in_cluster" in r:
                ov = [int(bool(x)) for x in r["in_cluster"]]
            else:
                ov = state.overlap(np.array([items], dtype=np.int64).reshape(1, -1),
                                   np.array([cluster or [-1]], dtype=np.int64))[0].tolist()
            if len(exp) != len(items) or len(ov) != len(items):
                raise RaydpoError(f"record {i}: exposure/overlap must have one value per item")
            cols["sample_id"].append(str(r.get("sample_id", f"r{i}")))
            cols["split"].append(r.get("split", "train"))
            cols["target_item_id"].append(int(r.get("target", -1)))
            cols["history_item_ids"].append([int(x) for x in r.get("history", [])])
            cols["cluster"].append(cluster)
            cols["exposure_table"].append(table)
            cols["candidate_item_ids"].append(items)
            cols["candidate_beam_rank"].append(list(range(len(items))))
            cols["candidate_exposure"].append(exp)
            cols["candidate_exposure_rank"].append([int(x) for x in r.get("exposure_rank", [-1] * len(items))])
            cols["candidate_overlap"].append(ov)
            logprobs.append([float(x) for x in r.get("logprobs", [0.0] * len(items))])
        arrays = {k: pa.array(v, type=pa.list_(pa.int64()) if k.startswith("candidate_") or k in (
            "history_item_ids", "cluster") else None) for k, v in cols.items()}
        arrays["exposure_table"] = pa.array(cols["exposure_table"], pa.int64())
        arrays["candidate_logprobs"] = pa.array(logprobs, pa.list_(pa.float64()))
        return cls(pa.table(arrays), state, seed=seed, n=n)


class SampleContext:
    """One annotated record: what a strategy function receives.

    Candidate arrays (same length, beam order, target/history/duplicates already filtered out):
    ``items`` (item ids), ``exposure`` (count in the exposure scope), ``exposure_rank`` (1 = most
    exposed, -1 = never seen), ``overlap`` (``|genres ∩ interest cluster|``), ``in_cluster``
    (``overlap > 0``), ``beam_rank`` (position in the original candidate list). Also ``target``,
    ``history`` (known item ids), ``cluster`` (genre indices; ``cluster_names``), ``n`` (negatives
    requested per pick), ``n_items``, ``seed``, ``sample_id``, ``split``; randomness via
    ``uniforms(count, start=0)`` or ``rng``; LightGCN distances via ``dist_past``, ``dist_chosen``,
    ``embedded``, ``past_ok``, ``chosen_ok`` (when embeddings were given).
    """

    __slots__ = ("batch", "i", "m", "_rng")

    def __init__(self, batch: BatchContext, i: int) -> None:
        self.batch = batch
        self.i = i
        self.m = int(batch.lengths[i])
        self._rng = None

    @classmethod
    def of(cls, state: SamplingState | None = None, seed: int = 0, n: int = 1, **record) -> "SampleContext":
        """A single hand-written record (see ``BatchContext.from_records``)."""
        return BatchContext.from_records([record], state=state, seed=seed, n=n).row(0)

    # identity
    @property
    def sample_id(self) -> str:
        return str(self.batch.sample_ids[self.i])

    @property
    def split(self) -> str:
        return str(self.batch.splits[self.i])

    @property
    def seed(self) -> int:
        return self.batch.seed

    @property
    def n(self) -> int:
        return self.batch.n

    @property
    def state(self) -> SamplingState:
        return self.batch.state

    @property
    def n_items(self) -> int:
        return self.batch.state.n_items

    # sample
    @property
    def target(self) -> int:
        return int(self.batch.target[self.i])

    @property
    def history(self) -> np.ndarray:
        h = self.batch.history[self.i]
        return h[h >= 0]

    @property
    def cluster(self) -> np.ndarray:
        c = self.batch.cluster[self.i]
        return c[c >= 0]

    @property
    def cluster_names(self) -> list[str]:
        return [self.state.genre_vocab[g] for g in self.cluster]

    # candidates
    @property
    def items(self) -> np.ndarray:
        return self.batch.items[self.i, : self.m]

    @property
    def exposure(self) -> np.ndarray:
        return self.batch.exposure[self.i, : self.m]

    @property
    def exposure_rank(self) -> np.ndarray:
        return self.batch.exposure_rank[self.i, : self.m]

    @property
    def overlap(self) -> np.ndarray:
        return self.batch.overlap[self.i, : self.m]

    @property
    def in_cluster(self) -> np.ndarray:
        return self.batch.in_cluster[self.i, : self.m]

    @property
    def beam_rank(self) -> np.ndarray:
        return self.batch.beam_rank[self.i, : self.m]

    @property
    def logprobs(self) -> np.ndarray | None:
        c = self.batch.column("candidate_logprobs")
        return None if c is None else c[self.i, : self.m]

    def genres(self, j: int) -> tuple[str, ...]:
        """Genre labels of candidate ``j``."""
        g = self.state.item_genres
        if g is None:
            return ()
        return tuple(self.state.genre_vocab[x] for x in g[self.items[j]] if x >= 0)

    # randomness
    @property
    def key(self) -> int:
        return int(self.batch.keys[self.i])

    def uniforms(self, count: int, start: int = 0) -> np.ndarray:
        """The record's counter-based uniforms ``start .. start+count-1`` (batch-independent)."""
        return counter_uniforms(self.batch.keys[self.i : self.i + 1], start, count)[0]

    @property
    def rng(self) -> np.random.Generator:
        """A numpy Generator seeded from (seed, sample_id) only."""
        if self._rng is None:
            k = self.key
            self._rng = np.random.default_rng(np.random.SeedSequence([k & 0xFFFFFFFF, k >> 32]))
        return self._rng

    # LightGCN
    @property
    def embedded(self) -> np.ndarray:
        return self.batch.embedded[self.i, : self.m]

    @property
    def dist_past(self) -> np.ndarray:
        return self.batch.dist_past[self.i, : self.m]

    @property
    def dist_chosen(self) -> np.ndarray:
        return self.batch.dist_chosen[self.i, : self.m]

    @property
    def past_ok(self) -> bool:
        return bool(self.batch.past_ok[self.i])

    @property
    def chosen_ok(self) -> bool:
        return bool(self.batch.chosen_ok[self.i])
