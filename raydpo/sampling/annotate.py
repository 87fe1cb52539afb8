"""Annotate self-play candidates (method.md section 4), vectorised over all records.

Input: a candidates table (one row per sample: ``sample_id``, ``candidate_item_ids`` in beam order,
optionally ``candidate_titles``, ``candidate_logprobs``, ``candidate_scores``,
``candidate_ref_logprobs``) and the dataset the samples come from.

Per record the annotation joins the sample (target, history, split), drops candidates that are the
target or a history item (counted, order kept, method.md 3.5) and stable-deduplicates the rest
(counted); per candidate it adds

* ``candidate_exposure`` / ``candidate_exposure_rank``: the item's exposure count and rank in the
  configured scope (``raydpo.data.stats.exposure``). Default ``split_histories``, the reference:
  history slots of the split the sample belongs to (train candidates use train exposure, valid
  candidates valid exposure). ``candidates``, the research code's scope: the history slots of the
  *annotated records* of that split only (it counted over the candidate file it annotated; the two
  differ when the candidates cover part of a split). ``train_interactions``: one global table of
  train interactions. ``split`` is an alias of ``split_histories``.
* ``candidate_overlap``: ``|genres(item) ∩ interest cluster|`` (distinct labels), where the interest
  cluster is the sample's top-``cluster_k`` history genres (``raydpo.data.stats.interest_clusters``,
  optionally without ``ignore_genres`` / genres above ``ignore_genres_above`` of the catalog);
* ``candidate_in_cluster``: ``overlap > 0``;
* ``candidate_beam_rank``: the position in the original candidate list.

Candidate ids outside the catalog raise a ``DataError`` naming the record (``on_unknown_item=
"error"``, the default: the candidates were generated from another catalog) or are dropped and
counted (``"drop"``). Titles, when present, must match the catalog (``check_titles``). A record
whose candidates are all filtered keeps zero candidates: strategies that need candidates report it
as ``no_candidates``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..data.schema import Catalog, Dataset, Samples
from ..data.stats import Exposure, _count_sequence, _ranks_from_counts, cluster_genres, exposure, interest_clusters
from ..errors import DataError
from .context import SamplingState, cluster_masks, list_array, list_parts

OPTIONAL_FLOAT_COLUMNS = ("candidate_logprobs", "candidate_scores", "candidate_ref_logprobs")
EXPOSURE_SCOPES = ("split_histories", "candidates", "train_interactions")
AnnotationScope = Literal["split_histories", "split", "candidates", "train_interactions"]


@dataclass(frozen=True)
class AnnotationConfig:
    exposure_scope: AnnotationScope = "split_histories"
    cluster_k: int = 3
    ignore_genres: tuple[str, ...] = ()
    ignore_genres_above: float | None = None
    on_unknown_item: Literal["error", "drop"] = "error"
    check_titles: bool = True

    def __post_init__(self) -> None:
        if self.exposure_scope == "split":
            object.__setattr__(self, "exposure_scope", "split_histories")
        if self.exposure_scope not in EXPOSURE_SCOPES:
            raise DataError(f"unknown exposure scope {self.exposure_scope!r}; expected one of "
                            f"{', '.join(EXPOSURE_SCOPES)}", field="exposure_scope")
        if self.on_unknown_item not in ("error", "drop"):
            raise DataError(f"on_unknown_item must be 'error' or 'drop', got {self.on_unknown_item!r}",
                            field="on_unknown_item")
        if isinstance(self.cluster_k, bool) or not isinstance(self.cluster_k, (int, np.integer)) or self.cluster_k < 1:
            raise DataError(f"cluster_k must be an integer >= 1, got {self.cluster_k!r}", field="cluster_k")
        a = self.ignore_genres_above
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not 0 < a <= 1):
            raise DataError(f"ignore_genres_above must be in (0, 1], got {a!r}", field="ignore_genres_above")
        object.__setattr__(self, "ignore_genres", tuple(self.ignore_genres))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ignore_genres"] = list(self.ignore_genres)
        return d


@dataclass
class Annotated:
    """The annotated candidate table (one row per record, list columns per candidate) and what was
    counted on the way. ``exposure_counts[t]`` is exposure table ``exposure_tables[t]``; each record's
    ``exposure_table`` column says which table it uses."""

    table: pa.Table
    config: AnnotationConfig
    exposure_tables: tuple[str, ...]
    exposure_counts: np.ndarray
    exposure_ranks: np.ndarray
    counts: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.table.num_rows

    def state(self, catalog: Catalog, instruction: str | None = None, embeddings: np.ndarray | None = None,
              seen: np.ndarray | None = None, embedding_kind: str | None = None) -> SamplingState:
        return SamplingState(
            n_items=len(catalog), titles=pa.array(list(catalog.titles), pa.string()),
            genre_vocab=tuple(catalog.genre_vocab), item_genres=catalog.genre_matrix,
            exposure_counts=self.exposure_counts, exposure_ranks=self.exposure_ranks,
            exposure_tables=self.exposure_tables, embeddings=embeddings, seen=seen,
            embedding_kind=embedding_kind, instruction=instruction)

    def to_frame(self, catalog: Catalog, long: bool = False) -> pd.DataFrame:
        """Readable annotation. One row per record with list columns (``interest_cluster`` genre
        names, ``candidate_genres``), or with ``long=True`` one row per (record, candidate)."""
        t = self.table
        vocab = catalog.genre_vocab
        titles = np.array(catalog.titles, dtype=object)
        genres = np.empty(len(catalog), dtype=object)
        genres[:] = [list(g) for g in catalog.genres]
        cl_len, cl = list_parts(t.column("cluster"))
        if long:
            lengths, items = list_parts(t.column("candidate_item_ids"))
            rows = np.repeat(np.arange(t.num_rows), lengths)
            cl_names = _cluster_names(cl_len, cl, vocab)
            out = pd.DataFrame({
                "sample_id": t.column("sample_id").to_numpy(zero_copy_only=False)[rows],
                "split": t.column("split").to_numpy(zero_copy_only=False)[rows],
                "interest_cluster": [cl_names[r] for r in rows],
                "beam_rank": list_parts(t.column("candidate_beam_rank"))[1],
                "item_id": items,
                "title": titles[items],
                "genres": genres[items],
                "exposure": list_parts(t.column("candidate_exposure"))[1],
                "exposure_rank": list_parts(t.column("candidate_exposure_rank"))[1],
                "overlap": list_parts(t.column("candidate_overlap"))[1],
                "in_cluster": list_parts(t.column("candidate_in_cluster"))[1].astype(bool),
            })
            return out
        frame = t.drop_columns(["cluster"]).to_pandas()
        frame.insert(3, "interest_cluster", _cluster_names(cl_len, cl, vocab))
        frame["candidate_titles"] = [list(titles[np.asarray(c, dtype=np.int64)]) for c in frame["candidate_item_ids"]]
        frame["candidate_genres"] = [list(genres[np.asarray(c, dtype=np.int64)]) for c in frame["candidate_item_ids"]]
        return frame


def _cluster_names(lengths: np.ndarray, flat: np.ndarray, vocab: Sequence[str]) -> list[list[str]]:
    out, k = [], 0
    for n in lengths.tolist():
        out.append([vocab[g] for g in flat[k : k + n].tolist()])
        k += n
    return out


# ------------------------------------------------------------------------------------------------


def read_candidates_table(source: str | Path | pd.DataFrame | pa.Table) -> pa.Table:
    """A candidates table from a DataFrame, an Arrow table, a ``candidates.parquet`` file or a
    finished candidate-generation folder (``_SUCCESS`` + ``candidates.parquet``)."""
    if isinstance(source, pa.Table):
        table = source
    elif isinstance(source, pd.DataFrame):
        cols = [c for c in ("sample_id", "candidate_item_ids", "candidate_titles", *OPTIONAL_FLOAT_COLUMNS)
                if c in source.columns]
        if "sample_id" not in cols or "candidate_item_ids" not in cols:
            raise DataError("candidates need columns sample_id and candidate_item_ids",
                            field="sample_id" if "sample_id" not in cols else "candidate_item_ids")
        types = {"candidate_item_ids": pa.list_(pa.int64()), "candidate_titles": pa.list_(pa.string()),
                 **{c: pa.list_(pa.float64()) for c in OPTIONAL_FLOAT_COLUMNS}}
        arrays = {"sample_id": pa.array(source["sample_id"].astype(str).tolist(), pa.string())}
        for c in cols[1:]:
            vals = [None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in source[c]]
            arrays[c] = pa.array(vals, type=types[c])
        table = pa.table(arrays)
    else:
        p = Path(source)
        if p.is_dir():
            from ..errors import RaydpoError

            if not (p / "_SUCCESS").exists():
                raise RaydpoError(f"{p}: candidate generation is not complete (no _SUCCESS); rerun it to resume")
            p = p / "candidates.parquet"
        from ..readers import check_file, one_line

        check_file(p, "candidates file")
        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"not a readable Parquet file: {one_line(e)}", path=p) from None
        if table.num_rows == 0:
            raise DataError("no candidate records (the file has 0 rows)", path=p)
    path = _source_path(source)
    for c in ("sample_id", "candidate_item_ids"):
        if c not in table.column_names:
            raise DataError(f"missing column (the table has columns {table.column_names[:10]})", path=path, field=c)
    if not pa.types.is_list(table.schema.field("candidate_item_ids").type) and \
            not pa.types.is_large_list(table.schema.field("candidate_item_ids").type):
        raise DataError(f"expected a list of item ids, got column type {table.schema.field('candidate_item_ids').type}",
                        path=path, field="candidate_item_ids")
    if not pa.types.is_string(table.schema.field("sample_id").type):
        table = table.set_column(table.schema.get_field_index("sample_id"), "sample_id",
                                 pc.cast(table.column("sample_id"), pa.string()))
    return table


def _source_path(source) -> str | None:
    """The candidates file a source names (a folder means its ``candidates.parquet``), else None."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        return str(p / "candidates.parquet" if p.is_dir() else p)
    return None


def annotate(dataset: Dataset, candidates, config: AnnotationConfig | None = None, **overrides) -> Annotated:
    """Annotate candidates against ``dataset`` (see the module docstring). ``overrides`` are
    ``AnnotationConfig`` fields, e.g. ``annotate(ds, cands, ignore_genres_above=0.9)``.

    Every DataError about the candidates names the candidates file when they come from one."""
    cfg = config or AnnotationConfig()
    if overrides:
        cfg = AnnotationConfig(**{**cfg.to_dict(), **overrides})
    try:
        return _annotate(dataset, candidates, cfg)
    except DataError as e:
        path = _source_path(candidates)
        if e.path is not None or path is None:
            raise
        raise DataError(e.reason, path=path, record=e.record, field=e.field) from None


def _annotate(dataset: Dataset, candidates, cfg: AnnotationConfig) -> Annotated:
    catalog = dataset.catalog
    n_items = len(catalog)
    table = read_candidates_table(candidates)
    S = table.num_rows

    # ---- join the samples ------------------------------------------------------------------------
    sample_ids = table.column("sample_id").to_numpy(zero_copy_only=False)
    if pd.isna(sample_ids).any():
        raise DataError("missing sample_id", record=int(np.flatnonzero(pd.isna(sample_ids))[0]), field="sample_id")
    ids_index = pd.Index(sample_ids)
    if ids_index.has_duplicates:
        dup = ids_index[ids_index.duplicated()][0]
        raise DataError(f"sample {dup!r} has more than one candidate record", record=dup, field="sample_id")
    frame = dataset.samples.frame
    samples_index = pd.Index(frame["sample_id"].astype(str))
    if samples_index.has_duplicates:
        raise DataError("the dataset's sample ids are not unique", path=dataset.samples.path or dataset.name,
                        field="sample_id")
    rows = samples_index.get_indexer(ids_index)
    missing = np.flatnonzero(rows < 0)
    if len(missing):
        ex = [str(sample_ids[i]) for i in missing[:3]]
        raise DataError(f"{len(missing)} candidate record(s) name samples that are not in dataset "
                        f"{dataset.name!r}, e.g. {ex}", record=ex[0], field="sample_id")
    joined = frame.iloc[rows].reset_index(drop=True)  # object columns: references, no copies of lists
    split = joined["split"].to_numpy(dtype=object)
    target = joined["target_item_id"].to_numpy(dtype=np.int64)
    hist_obj = joined["history_item_ids"].to_numpy(dtype=object)
    hl = np.fromiter((len(h) for h in hist_obj), dtype=np.int64, count=len(hist_obj))
    hv = np.concatenate([np.asarray(h, dtype=np.int64) for h in hist_obj]) if hl.sum() else np.empty(0, np.int64)
    cat_titles = pa.array(list(catalog.titles), pa.string())

    # ---- flatten the candidates ------------------------------------------------------------------
    lengths, flat = list_parts(table.column("candidate_item_ids"))
    flat = flat.astype(np.int64, copy=False) if len(flat) else np.empty(0, np.int64)
    N = len(flat)
    r = np.repeat(np.arange(S), lengths)
    starts = np.cumsum(lengths) - lengths
    beam_rank = np.arange(N) - np.repeat(starts, lengths)
    unknown = (flat < 0) | (flat >= n_items)
    if unknown.any():
        j = int(np.flatnonzero(unknown)[0])
        if cfg.on_unknown_item == "error":
            raise DataError(f"candidate item id {int(flat[j])} is not in the catalog (0..{n_items - 1}); "
                            f"{int(unknown.sum())} such candidate(s) in all. Were the candidates generated from "
                            "another catalog? (on_unknown_item='drop' drops and counts them)",
                            record=str(sample_ids[r[j]]), field="candidate_item_ids")
    if cfg.check_titles and "candidate_titles" in table.column_names and N:
        col = table.column("candidate_titles")
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        got_len = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
        if not np.array_equal(got_len, lengths):
            i = int(np.flatnonzero(got_len != lengths)[0])
            raise DataError("candidate_titles and candidate_item_ids differ in length", record=str(sample_ids[i]),
                            field="candidate_titles")
        got_titles = col.flatten()
        # hash lookup of each title in the catalog, compared as ids (no 10M-string copies)
        got_ids = pc.fill_null(pc.index_in(got_titles, value_set=cat_titles), -1).to_numpy(
            zero_copy_only=False).astype(np.int64, copy=False)
        wrong = ~unknown & (got_ids != flat)
        if wrong.any():
            jj = int(np.flatnonzero(wrong)[0])
            raise DataError(f"candidate title {got_titles[jj].as_py()!r} does not match catalog item {int(flat[jj])} "
                            f"({catalog.titles[int(flat[jj])]!r}): the candidates come from another catalog",
                            record=str(sample_ids[r[jj]]), field="candidate_titles")

    # ---- filter: unknown, target, history, duplicates (stable) -----------------------------------
    safe = np.where(unknown, -2, flat)
    is_target = safe == target[r]
    hist = _pad_history(hl, hv)
    is_hist = np.zeros(N, dtype=bool)
    for col in range(hist.shape[1]):
        h = hist[r, col]
        is_hist |= (h >= 0) & (h == safe)
    is_hist &= ~is_target
    keep = ~unknown & ~is_target & ~is_hist
    dup = _duplicates(flat, keep, r, lengths, n_items)
    keep &= ~dup
    per_row = lambda m: np.bincount(r[m], minlength=S).astype(np.int64)  # noqa: E731
    n_unknown, n_target, n_hist, n_dup = per_row(unknown), per_row(is_target), per_row(is_hist), per_row(dup)
    items = flat[keep]
    rk = r[keep]
    new_len = np.bincount(rk, minlength=S).astype(np.int64)

    # ---- exposure --------------------------------------------------------------------------------
    if cfg.exposure_scope in ("split_histories", "candidates"):
        names = tuple(s for s in ("train", "valid", "test") if (split == s).any())
        if cfg.exposure_scope == "split_histories":
            tables = [exposure(catalog, dataset.samples, scope="split_histories", split=s) for s in names]
        else:
            tables = [_record_exposure(hist, split == s, n_items) for s in names]
        code = {s: i for i, s in enumerate(names)}
        exp_table = pd.Series(split, dtype=object).map(code).to_numpy(dtype=np.int64)
    else:
        names = ("train_interactions",)
        tables = [exposure(catalog, dataset.samples, scope="train_interactions")]
        exp_table = np.zeros(S, dtype=np.int64)
    counts_tab = np.stack([t.counts for t in tables]) if tables else np.zeros((0, n_items), np.int64)
    ranks_tab = np.stack([t.ranks for t in tables]) if tables else np.zeros((0, n_items), np.int64)
    cand_exp = counts_tab[exp_table[rk], items] if len(items) else np.empty(0, np.int64)
    cand_rank = ranks_tab[exp_table[rk], items] if len(items) else np.empty(0, np.int64)

    # ---- interest clusters and overlap -----------------------------------------------------------
    allowed = cluster_genres(catalog, cfg.ignore_genres, cfg.ignore_genres_above)
    joined_samples = _PaddedSamples(joined, matrix=hist)
    clusters = interest_clusters(catalog, joined_samples, k=cfg.cluster_k, ignore_genres=cfg.ignore_genres,
                                 ignore_genres_above=cfg.ignore_genres_above) if S else \
        np.zeros((0, cfg.cluster_k), np.int64)
    state = SamplingState(n_items=n_items, genre_vocab=tuple(catalog.genre_vocab), item_genres=catalog.genre_matrix)
    overlap = _overlap_flat(state, items, rk, clusters)
    cl_len = (clusters >= 0).sum(1)
    cl_vals = clusters[clusters >= 0]  # rows keep their order (weight desc, first appearance)

    # ---- assemble --------------------------------------------------------------------------------
    cols = {
        "row": pa.array(np.arange(S, dtype=np.int64)),
        "sample_id": pa.array(sample_ids.astype(object) if S else [], pa.string()),
        "split": pa.array(split, pa.string()),
        "target_item_id": pa.array(target),
        "target_title": _titles(cat_titles, target, joined["target_title"].to_numpy(dtype=object)),
        "history_item_ids": list_array(hl, hv, pa.int64()),
        "history_titles": _history_titles(cat_titles, hl, hv, joined["history_titles"].to_numpy(dtype=object)),
        "cluster": list_array(cl_len, cl_vals.astype(np.int32), pa.int32()),
        "exposure_table": pa.array(exp_table.astype(np.int8)),
        "candidate_item_ids": list_array(new_len, items, pa.int64()),
        "candidate_beam_rank": list_array(new_len, beam_rank[keep].astype(np.int32), pa.int32()),
        "candidate_exposure": list_array(new_len, cand_exp, pa.int64()),
        "candidate_exposure_rank": list_array(new_len, cand_rank, pa.int64()),
        "candidate_overlap": list_array(new_len, overlap.astype(np.int32), pa.int32()),
        "candidate_in_cluster": list_array(new_len, overlap > 0, pa.bool_()),
        "n_filtered_target": pa.array(n_target.astype(np.int32)),
        "n_filtered_history": pa.array(n_hist.astype(np.int32)),
        "n_duplicates_removed": pa.array(n_dup.astype(np.int32)),
        "n_unknown_dropped": pa.array(n_unknown.astype(np.int32)),
    }
    for name in OPTIONAL_FLOAT_COLUMNS:
        if name in table.column_names:
            ln, vals = list_parts(table.column(name))
            if not np.array_equal(ln, lengths):
                i = int(np.flatnonzero(ln != lengths)[0])
                raise DataError(f"{name} and candidate_item_ids differ in length", record=str(sample_ids[i]),
                                field=name)
            cols[name] = list_array(new_len, vals.astype(np.float64, copy=False)[keep], pa.float64())
    out = pa.table(cols)
    counts = {
        "records": int(S),
        "candidates_in": int(N),
        "candidates_kept": int(len(items)),
        "filtered_target": int(n_target.sum()),
        "filtered_history": int(n_hist.sum()),
        "duplicates_removed": int(n_dup.sum()),
        "unknown_items_dropped": int(n_unknown.sum()),
        "records_without_candidates": int((new_len == 0).sum()),
        "mean_candidates": round(float(new_len.mean()), 4) if S else 0.0,
        "cluster_genres": [g for g, ok in zip(catalog.genre_vocab, allowed) if ok],
        "candidate_in_cluster_share": round(float((overlap > 0).mean()), 6) if len(items) else None,
    }
    return Annotated(table=out, config=cfg, exposure_tables=names, exposure_counts=counts_tab,
                     exposure_ranks=ranks_tab, counts=counts)


def _record_exposure(hist: np.ndarray, rows: np.ndarray, n_items: int) -> Exposure:
    """Exposure over the history slots of the annotated records ``rows`` (``hist``: ``[S, H]``
    padded with -1), in record order: the research code's ``build_exposure_count`` over the
    candidate file it annotates (method.md section 4)."""
    h = hist[rows]
    flat = h[h >= 0]  # row-major: records in order, each history oldest first
    counts, first = _count_sequence(flat, n_items)
    return Exposure(counts=counts, ranks=_ranks_from_counts(counts, first), scope="candidates")


def _duplicates(flat: np.ndarray, keep: np.ndarray, rows: np.ndarray, lengths: np.ndarray, n_items: int) -> np.ndarray:
    """Mask of kept entries that repeat an earlier kept entry of the same row (stable de-duplication).

    Rows are short: sort each padded row to find the (rare) rows with a repeat, then mark repeats
    exactly only inside those rows."""
    N = len(flat)
    dup = np.zeros(N, dtype=bool)
    if not N:
        return dup
    S = len(lengths)
    width = int(lengths.max())
    if width <= 64 and S * width <= (1 << 26):
        from .context import pad

        vals = np.where(keep, flat, -2 - np.arange(N))  # dropped entries never collide
        m = np.sort(pad(lengths, vals, -1, np.int64, width), axis=1)
        has = ((m[:, 1:] == m[:, :-1]) & (m[:, 1:] >= 0)).any(1)
        if not has.any():
            return dup
        sel = has[rows]
    else:
        sel = np.ones(N, dtype=bool)
    idx = np.flatnonzero(sel)
    key = rows[idx].astype(np.int64) * (n_items + 1) + np.where(keep[idx], flat[idx], n_items)
    dup[idx] = pd.Series(key).duplicated(keep="first").to_numpy() & keep[idx]
    return dup


def _pad_history(lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    from .context import pad

    return pad(lengths, values.astype(np.int64) if len(values) else np.empty(0, np.int64), -1, np.int64)


@dataclass(frozen=True)
class _PaddedSamples(Samples):
    """Samples whose padded history matrix is already built (vectorised from Arrow)."""

    matrix: np.ndarray | None = None

    def history_matrix(self, max_len: int | None = None) -> np.ndarray:
        if max_len is None and self.matrix is not None:
            return self.matrix
        return super().history_matrix(max_len)


def _titles(cat_titles: pa.Array, ids: np.ndarray, given: np.ndarray) -> pa.Array:
    """Target titles: the catalog title of each known id (Arrow ``take``), the given text for unknown
    ids (-1). Spot-checks that known ids carry their catalog title and otherwise uses the given text."""
    ids = np.asarray(ids, dtype=np.int64)
    if not _consistent(cat_titles, ids, given):
        return pa.array(list(given), pa.string())
    out = cat_titles.take(pa.array(np.maximum(ids, 0)))
    unknown = ids < 0
    if unknown.any():
        out = pc.replace_with_mask(out, pa.array(unknown), pa.array(list(given[unknown]), pa.string()))
    return out


def _history_titles(cat_titles: pa.Array, lengths: np.ndarray, flat_ids: np.ndarray, given: np.ndarray) -> pa.Array:
    """History titles as a list column, built from the ids as ``_titles`` does (unknown ids keep their text)."""
    n = len(given)
    probe = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 64)).astype(np.int64)) if n else np.empty(0, np.int64)
    starts = np.cumsum(lengths) - lengths
    ok = all(len(given[i]) == lengths[i] and all(
        t == cat_titles[int(x)].as_py()
        for t, x in zip(given[i], flat_ids[starts[i]: starts[i] + lengths[i]]) if x >= 0)
        for i in probe.tolist())
    if not ok:
        return pa.array([list(g) for g in given], pa.list_(pa.string()))
    vals = cat_titles.take(pa.array(np.maximum(flat_ids, 0)))
    unknown = flat_ids < 0
    if unknown.any():
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(len(flat_ids)) - np.repeat(starts, lengths)
        texts = [given[r][c] for r, c in zip(rows[unknown].tolist(), cols[unknown].tolist())]
        vals = pc.replace_with_mask(vals, pa.array(unknown), pa.array(texts, pa.string()))
    return list_array(lengths, vals, pa.string())


def _consistent(cat_titles: pa.Array, ids: np.ndarray, given: np.ndarray) -> bool:
    n = len(ids)
    probe = np.unique(np.linspace(0, max(n - 1, 0), num=min(n, 256)).astype(np.int64)) if n else []
    return all(ids[i] < 0 or cat_titles[int(ids[i])].as_py() == given[i] for i in probe)


def _overlap_flat(state: SamplingState, items: np.ndarray, rows: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    if not len(items):
        return np.empty(0, np.int64)
    if state.item_genre_mask is not None:
        cm = cluster_masks(clusters)
        return np.bitwise_count(state.item_genre_mask[items] & cm[rows]).astype(np.int64)
    out = np.empty(len(items), dtype=np.int64)
    step = 1 << 20
    for lo in range(0, len(items), step):
        sl = slice(lo, lo + step)
        out[sl] = state.overlap(items[sl, None], clusters[rows[sl]])[:, 0]
    return out
