"""Uncertainty of the metrics: per-user results, bootstrap intervals and paired tests over users.

Every metric of :mod:`raydpo.evaluation.metrics` is a function of the multiset of test rows
(users) it is computed on. NDCG, HR and Predict_NotIn_Ratio are means of per-user contributions;
diversity, DivRatio, ORRatio, DGU and MGU are *population* metrics (distinct items, top-3 item
counts, genre distributions over all recommendations), not means. A :class:`PerUser` table keeps,
for each row, what every metric needs, so any metric can be recomputed on any subset or
resample of users (with repeats):

* :func:`metrics_from_per_user` recomputes the metrics on the full population (reproducing
  :func:`raydpo.evaluation.evaluate` exactly) or on a selection of rows;
* :func:`bootstrap_intervals` resamples users (percentile or BCa intervals), vectorised: the
  resamples are a count matrix ``R [B, N]`` and each metric is a matrix product of ``R`` with a
  per-user contribution array (item-count and genre-mass matrices for the population metrics);
* :func:`paired_comparison` compares two methods on the same users (paired bootstrap, or a paired
  permutation test that swaps the two methods' results user by user), and :func:`holm` corrects
  a family of p-values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from ..errors import DataError
from .metrics import METRIC_NAMES

Method = Literal["percentile", "bca"]
TestMethod = Literal["bootstrap", "permutation"]

PER_USER_FILE = "per_user.parquet"
FORMAT_VERSION = 1
_META_KEY = b"raydpo.per_user"
MEAN_METRICS = ("NDCG", "HR", "Predict_NotIn_Ratio")
POPULATION_METRICS = ("diversity", "DivRatio", "DGU", "MGU", "ORRatio")
PROTOCOLS = ("reference", "valid_only")
# distinct-item counts shrink on a resample with replacement (about 63% distinct users): their
# bootstrap distribution is centred on the point estimate before the interval is read off
DISTINCT_METRICS = ("diversity", "DivRatio")
_BATCH_CELLS = 4_000_000  # resamples x items per batch of the count matrices (~32 MB of float64)


# --- the per-user table ----------------------------------------------------------------------------


@dataclass
class PerUser:
    """Per-user results of one evaluation (one row per prediction row, in the split's order).

    rows           ``[N]`` row index in the split
    targets        ``[N]`` target item id (-1: not a catalog item; such a row counts in N but adds
                   no hit and no recommended items, as in the reference protocol)
    topk           ``[N, K]`` recommended item ids nearest first, ``K = max(ks)``
    ranks          ``[N]`` 0-based rank of the target in ``topk`` (-1: not in it)
    not_in         ``[N]`` bool, the extracted prediction text is not a catalog title
    history        per row, the item ids of its history that enter gh (prompt-quoted titles under
                   the ``reference`` protocol, the split's history under ``valid_only``)
    genre_weights  ``[n_items, G]`` the catalog's unit genre mass per item
    ks             the cut-offs evaluated
    protocol       ``reference`` or ``valid_only``
    meta           dataset name, split, source file ... (free-form, JSON-serialisable)
    """

    rows: np.ndarray
    targets: np.ndarray
    topk: np.ndarray
    ranks: np.ndarray
    not_in: np.ndarray
    history: list[np.ndarray]
    genre_weights: np.ndarray
    ks: tuple[int, ...]
    protocol: str = "reference"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.topk = np.asarray(self.topk, dtype=np.int64)
        self.ranks = np.asarray(self.ranks, dtype=np.int64)
        self.not_in = np.asarray(self.not_in, dtype=bool)
        self.history = [np.asarray(h, dtype=np.int64) for h in self.history]
        self.genre_weights = np.asarray(self.genre_weights, dtype=np.float64)
        self.ks = tuple(sorted({int(k) for k in self.ks}))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_items(self) -> int:
        return self.genre_weights.shape[0]

    @property
    def valid(self) -> np.ndarray:
        """Rows whose target is a catalog item."""
        return self.targets >= 0

    @property
    def gh_rows(self) -> np.ndarray:
        """Rows whose history enters gh: all rows (``reference``) or the valid ones (``valid_only``)."""
        return np.ones(len(self), dtype=bool) if self.protocol == "reference" else self.valid

    def contributions(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ndcg, hr)`` per row at ``k`` before dividing by N: ``1/log2(rank+2)`` and 1 for a hit."""
        hit = self.valid & (self.ranks >= 0) & (self.ranks < k)
        ndcg = np.zeros(len(self), dtype=np.float64)
        ndcg[hit] = 1.0 / np.log2(self.ranks[hit].astype(np.float64) + 2.0)
        return ndcg, hit.astype(np.float64)

    def rec_genre_mass(self, k: int) -> np.ndarray:
        """``[N, G]`` genre mass of each row's top-k items (zero for a row without a catalog target)."""
        m = self.genre_weights[self.topk[:, :k]].sum(axis=1)
        m[~self.valid] = 0.0
        return m

    def history_counts(self) -> np.ndarray:
        """``[N, n_items]`` would be large; instead ``[N, G]`` history genre mass per row (rows outside
        :attr:`gh_rows` are zero)."""
        g = self.genre_weights.shape[1]
        out = np.zeros((len(self), g), dtype=np.float64)
        for i, h in enumerate(self.history):
            if len(h):
                out[i] = self.genre_weights[h].sum(axis=0)
        out[~self.gh_rows] = 0.0
        return out

    hist_genre_mass = history_counts

    def frame(self):
        """A pandas DataFrame: ``row, target, rank, not_in_catalog, topk`` (list), ``history_items``
        (list), and per k ``NDCG@k``, ``HR@k`` (the row's contribution before dividing by N) and
        ``rec_genre_mass@k`` (list, genre mass of its top-k items); plus ``hist_genre_mass`` (list)."""
        return self._table().to_pandas()

    def _table(self):
        import pyarrow as pa

        def lists(values: list[np.ndarray], typ) -> pa.Array:
            offsets = np.zeros(len(values) + 1, dtype=np.int32)
            offsets[1:] = np.cumsum([len(v) for v in values])
            flat = np.concatenate(values) if values else np.zeros(0)
            return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, typ))

        cols: dict[str, pa.Array] = {
            "row": pa.array(self.rows, pa.int64()),
            "target": pa.array(self.targets, pa.int64()),
            "rank": pa.array(self.ranks, pa.int32()),
            "not_in_catalog": pa.array(self.not_in, pa.bool_()),
            "topk": lists(list(self.topk), pa.int32()),
            "history_items": lists(self.history, pa.int32()),
        }
        for k in self.ks:
            ndcg, hr = self.contributions(k)
            cols[f"NDCG@{k}"] = pa.array(ndcg, pa.float64())
            cols[f"HR@{k}"] = pa.array(hr, pa.float64())
            cols[f"rec_genre_mass@{k}"] = lists(list(self.rec_genre_mass(k)), pa.float64())
        cols["hist_genre_mass"] = lists(list(self.history_counts()), pa.float64())
        w = self.genre_weights
        nz = np.nonzero(w)
        meta = {"version": FORMAT_VERSION, "ks": list(self.ks), "protocol": self.protocol,
                "n_items": int(w.shape[0]), "n_genres": int(w.shape[1]),
                "genre_weights": {"item": nz[0].tolist(), "genre": nz[1].tolist(), "value": w[nz].tolist()},
                "meta": self.meta}
        table = pa.table(cols)
        return table.replace_schema_metadata({_META_KEY: json.dumps(meta)})

    def write(self, path: str | Path) -> Path:
        """Write a Parquet file atomically (the catalog's genre weights, ks and protocol go into the
        file's metadata, so the file alone recomputes every metric)."""
        import pyarrow.parquet as pq

        from ..io import atomic_path

        table = self._table()
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return Path(path)

    @classmethod
    def read(cls, path: str | Path) -> "PerUser":
        """Read a file written by :meth:`write`; a DataError naming the file/field otherwise."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from ..readers import check_file, one_line

        path = check_file(path, "per-user results file")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"not a readable Parquet file: {one_line(e)}", path=path) from None
        raw = (table.schema.metadata or {}).get(_META_KEY)
        if raw is None:
            raise DataError("not a raydpo per-user results file (no raydpo.per_user metadata; write one with "
                            "`raydpo evaluate --per-user`)", path=path)
        try:
            meta = json.loads(raw)
            ks = [int(k) for k in meta["ks"]]
            protocol = meta["protocol"]
            n_items, n_genres = int(meta["n_items"]), int(meta["n_genres"])
            gw = meta["genre_weights"]
            w = np.zeros((n_items, n_genres), dtype=np.float64)
            w[np.asarray(gw["item"], dtype=np.int64), np.asarray(gw["genre"], dtype=np.int64)] = np.asarray(
                gw["value"], dtype=np.float64)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise DataError(f"unreadable per-user metadata: {one_line(e)}", path=path, field="raydpo.per_user") from None
        if protocol not in PROTOCOLS:
            raise DataError(f"unknown protocol {protocol!r}", path=path, field="protocol")
        for c in ("row", "target", "rank", "not_in_catalog", "topk", "history_items"):
            if c not in table.column_names:
                raise DataError("missing column", path=path, field=c)
            if table.column(c).null_count:
                raise DataError("null values", path=path, field=c)
        n = table.num_rows
        if n == 0:
            raise DataError("no rows", path=path)

        def ints(c: str) -> np.ndarray:
            try:
                return table.column(c).to_numpy().astype(np.int64)
            except (pa.ArrowException, ValueError, TypeError) as e:
                raise DataError(f"expected integers: {one_line(e)}", path=path, field=c) from None

        def int_lists(c: str) -> list[np.ndarray]:
            col = table.column(c).combine_chunks()
            if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type):
                raise DataError(f"expected a list of item ids, got {col.type}", path=path, field=c)
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
            return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]

        top_lists = int_lists("topk")
        width = {len(t) for t in top_lists}
        if len(width) != 1 or max(ks) > width.pop():
            bad = next(i for i, t in enumerate(top_lists) if len(t) < max(ks))
            raise DataError(f"expected {max(ks)} recommended items per row", path=path, record=bad, field="topk")
        topk = np.stack(top_lists)
        history = int_lists("history_items")
        for name, arr in (("topk", topk), ("history_items", np.concatenate(history) if history else np.zeros(0))):
            if arr.size and (arr.min() < 0 or arr.max() >= n_items):
                raise DataError(f"item id outside the catalog of {n_items} items", path=path, field=name)
        targets = ints("target")
        if targets.min() < -1 or targets.max() >= n_items:
            raise DataError(f"target id outside the catalog of {n_items} items", path=path, field="target")
        ranks = ints("rank")
        if ranks.min() < -1 or ranks.max() >= topk.shape[1]:
            raise DataError("rank outside the recommended list", path=path, field="rank")
        out = cls(ints("row"), targets, topk, ranks, table.column("not_in_catalog").to_numpy(zero_copy_only=False),
                  history, w, tuple(ks), protocol, dict(meta.get("meta") or {}))
        out.meta.setdefault("path", str(path))
        return out

    def check_paired(self, other: "PerUser", names: tuple[str, str] = ("A", "B")) -> None:
        """A DataError unless ``other`` covers the same rows and targets (the same users) of the same
        catalog."""
        a, b = names
        where = other.meta.get("path") or other.meta.get("source")
        if len(self) != len(other):
            raise DataError(f"{b} has {len(other)} rows but {a} has {len(self)}: a paired comparison needs the "
                            "same users (the same split of the same dataset)", path=where)
        if self.genre_weights.shape != other.genre_weights.shape or not np.array_equal(self.genre_weights,
                                                                                      other.genre_weights):
            raise DataError(f"{b} was evaluated on another catalog than {a} ({other.n_items} vs {self.n_items} "
                            "items or different genres)", path=where)
        diff = np.flatnonzero((self.rows != other.rows) | (self.targets != other.targets))
        if len(diff):
            i = int(diff[0])
            raise DataError(f"row {i} of {b} has target {int(other.targets[i])} but {a} has {int(self.targets[i])}: "
                            "not the same users (another split or dataset?)", path=where, record=i, field="target")
        if self.protocol != other.protocol:
            raise DataError(f"{b} used protocol {other.protocol!r} but {a} used {self.protocol!r}", path=where,
                            field="protocol")


def _one_thread():
    """BLAS and OpenMP (torch) limited to one thread: the products here are small, and on a busy
    machine a multi-threaded call waits for its threads to be scheduled (2-8x slower measured on
    2 shared cores, docs/benchmarks.md)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        import torch  # noqa: F401  (its OpenMP runtime must be loaded when the libraries are listed)
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()  # listing the libraries costs ms: once per process
    return _CONTROLLER.limit(limits=1)


_CONTROLLER = None


def _check_ks(table: PerUser, ks: Sequence[int] | None) -> list[int]:
    if ks is None:
        return list(table.ks)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DataError(f"k must be positive integers, got {ks}", field="k")
    if ks[-1] > table.topk.shape[1]:
        raise DataError(f"k={ks[-1]} exceeds the {table.topk.shape[1]} items kept per row "
                        f"(evaluated at k={list(table.ks)})", path=table.meta.get("path"), field="k")
    return ks


def _check_metrics(metrics: Sequence[str] | None) -> list[str]:
    if metrics is None:
        return list(METRIC_NAMES)
    bad = [m for m in metrics if m not in METRIC_NAMES]
    if bad:
        raise DataError(f"unknown metric {bad[0]!r}; expected some of {', '.join(METRIC_NAMES)}", field="metrics")
    return list(dict.fromkeys(metrics))


def _select(table: PerUser, users) -> np.ndarray:
    n = len(table)
    if users is None:
        return np.arange(n)
    u = np.asarray(users)
    if u.dtype == bool:
        if u.shape != (n,):
            raise ValueError(f"a boolean selection needs {n} entries, got {u.shape}")
        return np.flatnonzero(u)
    u = u.astype(np.int64).ravel()
    if u.size and (u.min() < 0 or u.max() >= n):
        raise ValueError(f"user positions must lie in [0, {n})")
    return u


def metrics_from_per_user(table: PerUser, ks: Sequence[int] | None = None,
                          users: np.ndarray | None = None) -> dict[int, dict[str, float]]:
    """Every metric at every k, as :func:`raydpo.evaluation.evaluate` returns them, on all rows
    (``users=None``: reproduces the evaluation exactly) or on ``users`` (row positions, repeats
    allowed, or a boolean mask).

    The computation is :func:`raydpo.evaluation.metrics.compute_metrics` itself on the selected
    rows, so the full population gives the evaluator's numbers bit for bit.
    """
    import torch

    from .metrics import Protocol, compute_metrics

    ks = _check_ks(table, ks)
    idx = _select(table, users)
    gh_sel = idx[table.gh_rows[idx]]
    hist = [table.history[i] for i in gh_sel]
    flat = np.concatenate(hist) if hist else np.zeros(0, dtype=np.int64)
    gh = np.bincount(flat, minlength=table.n_items).astype(np.float64) @ table.genre_weights
    gh_t = torch.from_numpy(gh)
    with _one_thread():
        return compute_metrics(
            torch.from_numpy(table.topk[idx]), torch.from_numpy(table.ranks[idx]),
            torch.from_numpy(table.targets[idx]), torch.from_numpy(table.genre_weights), gh_t,
            torch.from_numpy(table.not_in[idx]), ks, Protocol.named(table.protocol), history_genre_mass_valid=gh_t)


# --- vectorised metrics over many weightings of the users ------------------------------------------


class _Prepared:
    """Per-user contribution arrays of one table, so that the metrics on a weighting ``R [b, N]``
    of the users (bootstrap counts, permutation masks) are matrix products.

    ``sums(R)`` gives additive statistics (sums over users), ``finish(sums)`` the metrics: the
    split lets a permutation test add the sums of two tables before finishing.

    One dense product ``R @ D`` gives every per-user sum (row counts, hits, NDCG, not-in-catalog,
    genre masses of the histories and of the top-k lists); the item counts of the top-k lists are
    a sparse product (``items x users``, float32: exact for counts below 2**24), accumulated from
    one k to the next. ``items`` orders the item columns by popularity, so the three largest
    counts are found among the first columns (checked against the maximum of the others).
    """

    HEAD = 32

    def __init__(self, table: PerUser, ks: Sequence[int], items: np.ndarray, metrics: Sequence[str]):
        from scipy import sparse

        self.ks = list(ks)
        self.metrics = list(metrics)
        self.population = any(m in POPULATION_METRICS for m in metrics)
        self.reference = table.protocol == "reference"
        self.n_items = table.n_items
        n = len(table)
        valid = table.valid
        cols: list[np.ndarray] = [np.ones(n), valid.astype(np.float64), table.not_in.astype(np.float64)]
        self.at: dict = {"n_all": 0, "n_valid": 1, "not_in": 2}
        for k in self.ks:
            ndcg, hr = table.contributions(k)
            self.at[("ndcg", k)] = len(cols)
            cols.append(ndcg)
            self.at[("hr", k)] = len(cols)
            cols.append(hr)
        self.spans: dict = {}
        if self.population:
            g = table.genre_weights.shape[1]
            blocks = [table.history_counts()] + [table.rec_genre_mass(k) for k in self.ks]
            for key, block in zip(["gh"] + [("gp", k) for k in self.ks], blocks):
                self.spans[key] = (len(cols), len(cols) + g)
                cols.extend(block.T)
            remap = np.full(table.n_items, -1, dtype=np.int64)
            remap[items] = np.arange(len(items))
            self.n_cols = len(items)
            rows = np.flatnonzero(valid)
            self.steps = []  # per k: the items at ranks [previous k, k) as an items x users matrix
            prev = 0
            for k in self.ks:
                c = remap[table.topk[rows, prev:k]].ravel()
                a = sparse.csr_matrix((np.ones(len(c), dtype=np.float32), (c, np.repeat(rows, k - prev))),
                                      shape=(len(items), n))
                self.steps.append(a)
                prev = k
        self.dense = np.ascontiguousarray(np.column_stack(cols))

    def sums(self, rt: np.ndarray) -> dict:
        """``rt [N, b]``: the weight of each user (row) in each of b weightings (columns)."""
        d = rt.T @ self.dense
        s: dict = {key: d[:, j] for key, j in self.at.items()}
        for key, (lo, hi) in self.spans.items():
            s[key] = d[:, lo:hi]
        if self.population:
            rt32 = np.ascontiguousarray(rt, dtype=np.float32)
            counts = None
            for k, a in zip(self.ks, self.steps):
                step = a @ rt32  # [U, b]: how often each item is recommended in each weighting
                counts = step if counts is None else counts + step
                s[("counts", k)] = counts
        return s

    def _top3(self, c: np.ndarray) -> np.ndarray:
        """Sum of the three largest counts of each column of ``c [U, b]``."""
        top = min(3, self.n_items)
        u = c.shape[0]
        if u <= top:
            return c.sum(axis=0, dtype=np.float64)
        head = min(u, max(self.HEAD, top))
        best = np.partition(c[:head].T, head - top, axis=1)[:, -top:]
        out = best.sum(axis=1, dtype=np.float64)
        if head < u:
            bad = np.flatnonzero(c[head:].max(axis=0) > best.min(axis=1))
            if len(bad):
                out[bad] = np.partition(c[:, bad].T, u - top, axis=1)[:, -top:].sum(axis=1, dtype=np.float64)
        return out

    def finish(self, s: dict) -> dict[int, dict[str, np.ndarray]]:
        n_all = s["n_all"]
        n = n_all if self.reference else s["n_valid"]
        out: dict[int, dict[str, np.ndarray]] = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.population:
                gh = s["gh"] / s["gh"].sum(axis=1, keepdims=True)
            for k in self.ks:
                m: dict[str, np.ndarray] = {}
                m["NDCG"] = s[("ndcg", k)] / n
                m["HR"] = s[("hr", k)] / n
                m["Predict_NotIn_Ratio"] = s["not_in"] / n_all
                if self.population:
                    c = s[("counts", k)]
                    div = np.count_nonzero(c, axis=0).astype(np.float64)
                    m["diversity"] = div
                    m["DivRatio"] = div / (n * k)
                    m["ORRatio"] = self._top3(c) / (k * n)
                    gp = s[("gp", k)]
                    d = gp / gp.sum(axis=1, keepdims=True) - gh
                    m["DGU"] = d.max(axis=1) - d.min(axis=1) if d.shape[1] else np.full(len(n), np.nan)
                    m["MGU"] = np.abs(d).mean(axis=1) if d.shape[1] else np.full(len(n), np.nan)
                out[k] = {name: m[name] for name in self.metrics}
        return out


def _add(a: dict, b: dict) -> dict:
    return {key: a[key] + b[key] for key in a}


def _union_items(tables: Sequence[PerUser], ks: Sequence[int]) -> np.ndarray:
    """The items recommended (at the largest k, to a row with a catalog target) by any of the
    tables, most recommended first."""
    k = max(ks)
    flat = np.concatenate([t.topk[t.valid, :k].ravel() for t in tables])
    items, counts = np.unique(flat, return_counts=True)
    return items[np.argsort(-counts, kind="stable")]


def _batch_size(n_users: int, n_cols: int) -> int:
    return max(1, min(_BATCH_CELLS // max(n_users, n_cols, 1), 4096))


def _resample_batches(n: int, n_resamples: int, seed: int, batch: int) -> Iterator[np.ndarray]:
    """Bootstrap count matrices ``[n, b]``: column j counts how often each user is drawn in resample j.

    The draws are ``default_rng(seed).integers(0, n, (n_resamples, n))`` (one call while it fits in
    memory), the same resamples as ``scipy.stats.bootstrap(..., rng=default_rng(seed))``.
    """
    rng = np.random.default_rng(seed)
    whole = n_resamples * n <= 20_000_000
    idx_all = rng.integers(0, n, (n_resamples, n)) if whole else None
    for start in range(0, n_resamples, batch):
        b = min(batch, n_resamples - start)
        idx = idx_all[start:start + b] if whole else rng.integers(0, n, (b, n))
        flat = (idx + (np.arange(b) * n)[:, None]).ravel()  # row-local writes: cache friendly
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64).T


def _jackknife_batches(n: int, batch: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch):
        b = min(batch, n - start)
        r = np.ones((n, b), dtype=np.float64)
        r[start + np.arange(b), np.arange(b)] = 0.0
        yield r


def _collect(preps: Sequence[_Prepared], batches: Iterator[np.ndarray]) -> list[dict[int, dict[str, np.ndarray]]]:
    """Each table's metric distribution over the same weightings of the users."""
    parts: list[list[dict]] = [[] for _ in preps]
    for r in batches:
        for i, p in enumerate(preps):
            parts[i].append(p.finish(p.sums(r)))
    out = []
    for i, p in enumerate(preps):
        out.append({k: {m: np.concatenate([b[k][m] for b in parts[i]]) for m in p.metrics} for k in p.ks})
    return out


def _interval(theta_b: np.ndarray, theta_hat: float, alpha: float, method: str,
              jack: np.ndarray | None, center: bool = False) -> tuple[float, float]:
    """Percentile or BCa interval from a bootstrap distribution (scipy.stats.bootstrap's formulas);
    a degenerate distribution (every resample equal, or BCa undefined) gives the percentile one.
    ``center``: shift the distribution by the bootstrap bias (``theta_hat - mean``) first and read
    the percentile interval (for the distinct-item metrics, see :data:`DISTINCT_METRICS`)."""
    from scipy.special import ndtr, ndtri

    theta_b = theta_b[np.isfinite(theta_b)]
    if theta_b.size == 0:
        return float("nan"), float("nan")
    if center and np.isfinite(theta_hat):
        lo, hi = np.quantile(theta_b, [alpha, 1 - alpha]) + (theta_hat - theta_b.mean())
        return float(lo), float(hi)
    lo_q, hi_q = alpha, 1 - alpha
    if method == "bca" and jack is not None and np.isfinite(theta_hat):
        b = theta_b.size
        # resamples equal to the estimate count half (scipy's rule); equal up to rounding is equal
        # (the resampled sums add the same per-user terms in another order)
        tol = 1e-12 * max(1.0, abs(theta_hat))
        pct = (np.count_nonzero(theta_b < theta_hat - tol) + np.count_nonzero(theta_b <= theta_hat + tol)) / (2 * b)
        z0 = ndtri(pct)
        u = jack.mean() - jack
        den = (u ** 2).sum()
        a_hat = (u ** 3).sum() / (6 * den ** 1.5) if den > 0 else 0.0
        za = ndtri(alpha)
        q1 = ndtr(z0 + (z0 + za) / (1 - a_hat * (z0 + za)))
        q2 = ndtr(z0 + (z0 - za) / (1 - a_hat * (z0 - za)))
        if np.isfinite(q1) and np.isfinite(q2):
            lo_q, hi_q = float(q1), float(q2)
    lo, hi = np.quantile(theta_b, [lo_q, hi_q])
    return float(lo), float(hi)


def _check_resampling(n_resamples: int, confidence: float, method: str | None = None) -> None:
    if int(n_resamples) < 1:
        raise DataError(f"the number of resamples must be at least 1, got {n_resamples}", field="resamples")
    if not 0.0 < float(confidence) < 1.0:
        raise DataError(f"the confidence must lie strictly between 0 and 1, got {confidence}", field="confidence")
    if method is not None and method not in ("percentile", "bca"):
        raise DataError(f"unknown interval method {method!r}; expected 'percentile' or 'bca'", field="method")


def bootstrap_intervals(per_user: PerUser, ks: Sequence[int] | None = None, n_resamples: int = 10000,
                        confidence: float = 0.95, method: Method = "percentile", seed: int = 0,
                        metrics: Sequence[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    """``{k: {metric: {"value", "ci_low", "ci_high"}}}``: the point estimate on all users and the
    bootstrap interval over users (resampled with replacement; ``percentile`` or ``bca``).

    Every metric is recomputed on each resample (population metrics too: distinct items, top-3
    counts and genre distributions of the resampled users). ``value`` is the evaluator's number
    (:func:`metrics_from_per_user`).
    """
    return _intervals_and_diffs({"_": per_user}, None, ks, n_resamples, confidence, method, seed, metrics)[0]["_"]


def _intervals_and_diffs(*args, **kw):
    """Intervals of every table, and (with ``baseline``) each table's paired difference to it, all
    on the same bootstrap resamples of the users (one pass per table)."""
    with _one_thread():
        return _intervals_and_diffs_impl(*args, **kw)


def _intervals_and_diffs_impl(named: dict[str, PerUser], baseline: str | None, ks, n_resamples: int,
                              confidence: float, method: str, seed: int, metrics, test: str = "bootstrap"):
    _check_resampling(n_resamples, confidence, method)
    tables = list(named.values())
    first = tables[0]
    ks = _check_ks(first, ks)
    for t in tables[1:]:
        _check_ks(t, ks)
    metrics = _check_metrics(metrics)
    alpha = (1 - confidence) / 2
    n = len(first)
    items = _union_items(tables, ks)
    preps = [_Prepared(t, ks, items, metrics) for t in tables]
    batch = _batch_size(n, len(items) * len(ks) if preps[0].population else 1)
    dists = _collect(preps, _resample_batches(n, int(n_resamples), seed, batch))
    need_jack = method == "bca"
    jacks = _collect(preps, _jackknife_batches(n, batch)) if need_jack else [None] * len(preps)
    # the evaluator's numbers: the point estimates, and the reference of BCa's bias correction and
    # of the tests (discrete metrics tie with resamples exactly)
    exact = [metrics_from_per_user(t, ks) for t in tables]
    points = exact
    names = list(named)
    intervals: dict[str, dict] = {}
    for i, name in enumerate(names):
        out: dict[int, dict[str, dict[str, float]]] = {}
        for k in ks:
            out[k] = {}
            for m in metrics:
                lo, hi = _interval(dists[i][k][m], points[i][k][m], alpha, method,
                                   jacks[i][k][m] if need_jack else None, center=m in DISTINCT_METRICS)
                out[k][m] = {"value": float(exact[i][k][m]), "ci_low": lo, "ci_high": hi}
        intervals[name] = out
    diffs: dict[str, dict] = {}
    if baseline is not None:
        j = names.index(baseline)
        for i, name in enumerate(names):
            if i == j:
                continue
            if test == "bootstrap":
                diffs[name] = _bootstrap_diff(dists[i], dists[j], points[i], points[j], exact[i], exact[j],
                                              jacks[i], jacks[j], ks, metrics, alpha, method)
            else:
                diffs[name] = _permutation_diff(tables[i], tables[j], items, ks, metrics, n_resamples, seed,
                                                alpha, exact[i], exact[j], dists[i], dists[j], points[i], points[j],
                                                jacks[i], jacks[j], method)
    return intervals, diffs


def _bootstrap_p(diff_b: np.ndarray, d_hat: float, center_on_mean: bool = False) -> float:
    """Two-sided p-value of the paired bootstrap: the share of resampled differences, centred on
    the observed one (on their mean for the distinct-item metrics), at least as far from 0 as the
    observed difference, ``(count + 1) / (B + 1)``."""
    diff_b = diff_b[np.isfinite(diff_b)]
    if not np.isfinite(d_hat) or diff_b.size == 0:
        return float("nan")
    gamma = 1e-12 * max(1.0, abs(d_hat))
    centre = diff_b.mean() if center_on_mean else d_hat
    count = np.count_nonzero(np.abs(diff_b - centre) >= abs(d_hat) - gamma)
    return float((count + 1) / (diff_b.size + 1))


def _diff_entry(diff_b, d_point, d_exact, jack, alpha, method, p, metric) -> dict[str, float]:
    lo, hi = _interval(diff_b, d_point, alpha, method, jack, center=metric in DISTINCT_METRICS)
    return {"diff": float(d_exact), "diff_ci_low": lo, "diff_ci_high": hi, "p_value": p}


def _bootstrap_diff(da, db, pa, pb, ea, eb, ja, jb, ks, metrics, alpha, method) -> dict:
    out: dict[int, dict[str, dict[str, float]]] = {}
    for k in ks:
        out[k] = {}
        for m in metrics:
            diff_b = da[k][m] - db[k][m]
            d_point = pa[k][m] - pb[k][m]
            jack = ja[k][m] - jb[k][m] if ja is not None else None
            out[k][m] = _diff_entry(diff_b, d_point, ea[k][m] - eb[k][m], jack, alpha, method,
                                    _bootstrap_p(diff_b, d_point, m in DISTINCT_METRICS), m)
    return out


def _permutation_diff(a: PerUser, b: PerUser, items, ks, metrics, n_resamples, seed, alpha, ea, eb,
                      da, db, pa, pb, ja, jb, method) -> dict:
    """Paired permutation test: each resample swaps the two methods' results for a random half of
    the users (each user independently), recomputes both pseudo-methods' metrics and their
    difference. p is scipy.stats.permutation_test's two-sided value; the interval of the
    difference is still the paired bootstrap one (a permutation null has no interval)."""
    n = len(a)
    prep_a = _Prepared(a, ks, items, metrics)
    prep_b = _Prepared(b, ks, items, metrics)
    batch = _batch_size(n, len(items) * len(ks) if prep_a.population else 1)
    rng = np.random.default_rng(seed)
    null: dict[int, dict[str, list]] = {k: {m: [] for m in metrics} for k in ks}
    for start in range(0, int(n_resamples), batch):
        size = min(batch, int(n_resamples) - start)
        swap = (rng.random((n, size)) < 0.5).astype(np.float64)
        keep = 1.0 - swap
        sa, sb = prep_a.sums(keep), prep_b.sums(swap)
        xa, xb = prep_a.sums(swap), prep_b.sums(keep)
        ma = prep_a.finish(_add(sa, sb))   # a's results on kept users, b's on swapped ones
        mb = prep_a.finish(_add(xb, xa))   # the complement
        for k in ks:
            for m in metrics:
                null[k][m].append(ma[k][m] - mb[k][m])
    out: dict[int, dict[str, dict[str, float]]] = {}
    for k in ks:
        out[k] = {}
        for m in metrics:
            t = np.concatenate(null[k][m])
            t_obs = pa[k][m] - pb[k][m]
            diff_b = da[k][m] - db[k][m]
            jack = ja[k][m] - jb[k][m] if ja is not None else None
            out[k][m] = _diff_entry(diff_b, t_obs, ea[k][m] - eb[k][m], jack, alpha, method,
                                    _permutation_p(t, t_obs), m)
    return out


def _permutation_p(null: np.ndarray, observed: float) -> float:
    """scipy.stats.permutation_test's two-sided p-value for a randomised (not exact) null."""
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or null.size == 0:
        return float("nan")
    gamma = abs(1e-14 * observed)
    less = (np.count_nonzero(null <= observed + gamma) + 1) / (null.size + 1)
    greater = (np.count_nonzero(null >= observed - gamma) + 1) / (null.size + 1)
    return float(min(1.0, 2 * min(less, greater)))


def paired_comparison(a: PerUser, b: PerUser, ks: Sequence[int] | None = None, n_resamples: int = 10000,
                      seed: int = 0, method: TestMethod = "bootstrap", confidence: float = 0.95,
                      metrics: Sequence[str] | None = None,
                      interval: Method = "percentile") -> dict[int, dict[str, dict[str, float]]]:
    """``{k: {metric: {"diff", "diff_ci_low", "diff_ci_high", "p_value"}}}`` with ``diff = metric(a) -
    metric(b)`` on the same users; two-sided p-value of the paired bootstrap or paired permutation
    test. Identical inputs give diff 0 and p = 1."""
    if method not in ("bootstrap", "permutation"):
        raise DataError(f"unknown test {method!r}; expected 'bootstrap' or 'permutation'", field="method")
    a.check_paired(b)
    _, diffs = _intervals_and_diffs({"a": a, "b": b}, "b", ks, n_resamples, confidence, interval, seed, metrics,
                                    test=method)
    return diffs["a"]


def flatten_metrics(nested: dict) -> dict[str, Any]:
    """``{k: {name: v}}`` -> ``{"name@k": v}`` (the flat names of trial results and tables)."""
    return {f"{name}@{k}": v for k, m in nested.items() for name, v in m.items()}


# ---- several seeds per configuration (a search's ``repeats``): the same user resamples for every
# seed and both sides, each metric averaged over the seeds


def _check_same_users(groups: Sequence[Sequence]) -> None:
    first = groups[0][0]
    for g in groups:
        for pu in g:
            first.check_paired(pu, ("seed 0", "another seed or trial"))


def _seed_averaged(groups: Sequence[Sequence], metrics: Sequence[str], n_resamples: int, seed: int):
    """For each group (the seeds of one configuration): the exact seed-averaged metrics and their
    bootstrap distribution, every table resampled with the same user counts (users are the unit:
    a user drawn twice counts twice in every seed and in both configurations). Vectorised with
    the weighting machinery above."""
    _check_same_users(groups)
    tables = [t for g in groups for t in g]
    ks = list(tables[0].ks)
    items = _union_items(tables, ks)
    preps = [_Prepared(t, ks, items, metrics) for t in tables]
    n = len(tables[0])
    batch = _batch_size(n, len(items) * len(ks) if preps[0].population else 1)
    dists = _collect(preps, _resample_batches(n, int(n_resamples), seed, batch))
    exact = [metrics_from_per_user(t, ks) for t in tables]
    out, i = [], 0
    for g in groups:
        j = i + len(g)
        dist = {f"{m}@{k}": np.mean([dists[x][k][m] for x in range(i, j)], axis=0) for k in ks for m in metrics}
        point = {f"{m}@{k}": float(np.mean([exact[x][k][m] for x in range(i, j)])) for k in ks for m in metrics}
        out.append((point, dist))
        i = j
    return out


def _metric_names(metrics: Sequence[str] | None) -> list[str]:
    return sorted({m.partition("@")[0] for m in metrics}) if metrics else list(METRIC_NAMES)


def user_intervals(pus: Sequence, confidence: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> dict[str, tuple[float, float]]:
    """``{"NDCG@10": (low, high), ...}``: bootstrap interval over users of each metric averaged over
    the seeds ``pus`` (per-user results of the same users)."""
    if len(pus) == 1:
        res = bootstrap_intervals(pus[0], n_resamples=n_resamples, confidence=confidence, seed=seed)
        return {f"{name}@{k}": (d["ci_low"], d["ci_high"]) for k, m in res.items() for name, d in m.items()}
    ((point, dist),) = _seed_averaged([pus], _metric_names(None), n_resamples, seed)
    alpha = (1 - confidence) / 2
    return {m: _interval(dist[m], point[m], alpha, "percentile", None, center=m.split("@")[0] in DISTINCT_METRICS)
            for m in point}


def paired_difference(a: Sequence, b: Sequence, metrics: Sequence[str], confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{"NDCG@10": {diff, diff_ci_low, diff_ci_high, p_value}}``: the seed-averaged metric of
    ``a`` minus that of ``b`` on the same users, paired bootstrap over users, two-sided p (the
    p-value and interval rules of :func:`paired_comparison`)."""
    names = _metric_names(metrics)
    if len(a) == 1 and len(b) == 1:
        res = flatten_metrics(paired_comparison(a[0], b[0], n_resamples=n_resamples, confidence=confidence, seed=seed,
                                         metrics=names))
        return {m: dict(res[m]) for m in metrics}
    (pa, da), (pb, db) = _seed_averaged([a, b], names, n_resamples, seed)
    alpha = (1 - confidence) / 2
    out = {}
    for m in metrics:
        distinct = m.split("@")[0] in DISTINCT_METRICS
        diff_b, d = da[m] - db[m], pa[m] - pb[m]
        lo, hi = _interval(diff_b, d, alpha, "percentile", None, center=distinct)
        p = 1.0 if d == 0 and np.all(diff_b == 0) else _bootstrap_p(diff_b, d, distinct)
        out[m] = {"diff": d, "diff_ci_low": lo, "diff_ci_high": hi, "p_value": p}
    return out


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order (monotone, capped at 1; NaN kept)."""
    p = np.asarray(p_values, dtype=np.float64).ravel()
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def compare(named: dict[str, PerUser], baseline: str | None = None, ks: Sequence[int] | None = None,
            n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0, test: TestMethod = "bootstrap",
            metrics: Sequence[str] | None = None, interval: Method = "percentile") -> dict:
    """The JSON object of ``raydpo compare``: each method's value and interval per k and metric,
    and for each method but the baseline its paired difference to the baseline, the p-value and
    the Holm-corrected p-value (over every comparison in the object), and ``significant``
    (``p_holm < 1 - confidence``)."""
    if not named:
        raise DataError("nothing to compare")
    if test not in ("bootstrap", "permutation"):
        raise DataError(f"unknown test {test!r}; expected 'bootstrap' or 'permutation'", field="test")
    names = list(named)
    baseline = names[0] if baseline is None else baseline
    if baseline not in named:
        raise DataError(f"the baseline {baseline!r} is not one of the methods compared ({', '.join(names)})",
                        field="baseline")
    base = named[baseline]
    for name in names:
        if name != baseline:
            base.check_paired(named[name], (baseline, name))
    if ks is None:
        ks = sorted(set.intersection(*(set(t.ks) for t in named.values())))
    metrics = _check_metrics(metrics)
    intervals, diffs = _intervals_and_diffs(named, baseline if len(names) > 1 else None, ks, n_resamples,
                                            confidence, interval, seed, metrics, test=test)
    ks = sorted(intervals[baseline])
    keys = [(name, k, m) for name in diffs for k in ks for m in metrics]
    adjusted = holm([diffs[name][k][m]["p_value"] for name, k, m in keys])
    for (name, k, m), p in zip(keys, adjusted):
        diffs[name][k][m]["p_holm"] = float(p)
        diffs[name][k][m]["significant"] = bool(p < 1 - confidence)
    methods = {}
    for name in names:
        methods[name] = {str(k): {m: {**intervals[name][k][m], **(diffs[name][k][m] if name in diffs else {})}
                                  for m in metrics} for k in ks}
    return {"baseline": baseline, "confidence": confidence, "n_resamples": int(n_resamples), "test": test,
            "interval": interval, "seed": seed, "ks": ks, "metrics": metrics, "users": len(base),
            "methods": methods}


def format_interval(value: float, lo: float, hi: float, style: Literal["pm", "bracket"] = "pm",
                    digits: int = 4) -> str:
    """``0.0211 ± 0.0040`` (the larger half-width) or ``0.0211 [0.0171, 0.0251]``."""
    if style == "bracket":
        return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
    half = max(hi - value, value - lo)
    return f"{value:.{digits}f} ± {half:.{digits}f}"
