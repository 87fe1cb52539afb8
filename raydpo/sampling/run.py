"""Negative sampling end to end: annotate, select per strategy, build preference records, explain.

``sample_negatives`` runs locally (vectorised, in chunks); ``sample_negatives_ray`` runs the same
pure per-chunk function (``select_table``) as a Ray Data ``map_batches`` over the annotated table,
with the shared state (exposure tables, genre masks, LightGCN vectors) broadcast once through the
object store. Both give identical records, because every record's choice depends only on its own
annotation, the shared state and (seed, sample_id).

Output records follow ``raydpo.data.preference``: ``prompt = user_message(history_titles,
instruction)``, ``chosen = response_text(target_title)``, ``rejected = [response_text(t) ...]``
(variable length, never padded), ``chosen_item_id``, ``rejected_item_ids``, ``strategy``. Records
whose selection is empty are dropped and counted by reason. The summary (``summarize``) explains
the result: fallbacks fired, drops, share of in-cluster negatives, the negatives' mean exposure
against the catalog and the candidate pool, duplicates avoided, candidate filtering counts.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..data.preference import PREFERENCE_SCHEMA, to_pairs, write_preferences
from ..data.schema import Dataset
from ..errors import RaydpoError
from ..io import write_json
from ..prompt import DEFAULT_INSTRUCTION, HISTORY_LEAD, QUESTION, response_text, user_message
from .annotate import AnnotationConfig, Annotated, annotate
from .context import BatchContext, SamplingState, list_array
from .lightgcn import LightGCN, LightGCNConfig
from .strategies import Strategy, apply_strategy, get_strategy

log = logging.getLogger(__name__)

OUTPUT_SCHEMA = pa.schema([
    ("row", pa.int64()), ("sample_id", pa.string()), ("prompt", pa.string()), ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())), ("chosen_item_id", pa.int64()), ("rejected_item_ids", pa.list_(pa.int64())),
    ("strategy", pa.string()), ("fallback", pa.string()), ("duplicates_avoided", pa.int64()),
    ("n_negatives", pa.int64()), ("neg_in_cluster", pa.int64()), ("neg_exposure_sum", pa.int64()),
    ("neg_zero_exposure", pa.int64()), ("neg_from_candidates", pa.int64()), ("neg_in_history", pa.int64()),
    ("n_candidates", pa.int64()), ("cand_in_cluster", pa.int64()), ("cand_exposure_sum", pa.int64()),
    ("exposure_table", pa.int64()),
])


# ------------------------------------------------------------------------------------------------
# the pure per-chunk function


def select_table(table: pa.Table, state: SamplingState, strategy: "str | Strategy", n: int, seed: int,
                 engine: str = "auto") -> pa.Table:
    """Apply ``strategy`` to a chunk of the annotated table: one output row per input row (dropped
    records have no negatives), preference fields plus the per-record statistics of the summary."""
    st = get_strategy(strategy)
    b = BatchContext(table, state, seed=seed, n=n)
    picks, labels, dups = apply_strategy(st, b, engine)
    present = picks >= 0
    k = present.sum(1)
    flat = picks[present]
    ov = state.overlap(picks, b.cluster)
    exp = state.exposure_of(picks, b.exposure_table)
    from_cand = (picks[:, :, None] == b.items[:, None, :]).any(-1) & present
    in_hist = (picks[:, :, None] == b.history[:, None, :]).any(-1) & present
    titles = state.titles if state.titles is not None else pa.array([str(i) for i in range(state.n_items)])
    rejected = list_array(k, _quote(titles.take(pa.array(flat, pa.int64()))), pa.string())
    cols = {
        "row": table.column("row"),
        "sample_id": table.column("sample_id"),
        "prompt": render_prompts(table.column("history_titles"), state.instruction),
        "chosen": _chosen(table.column("target_title")),
        "rejected": rejected,
        "chosen_item_id": table.column("target_item_id"),
        "rejected_item_ids": list_array(k, flat.astype(np.int64), pa.int64()),
        "strategy": pa.array(np.full(len(b), st.name, dtype=object), pa.string()),
        "fallback": pa.array(labels, pa.string()),
        "duplicates_avoided": pa.array(dups.astype(np.int64)),
        "n_negatives": pa.array(k.astype(np.int64)),
        "neg_in_cluster": pa.array(((ov > 0) & present).sum(1).astype(np.int64)),
        "neg_exposure_sum": pa.array(np.where(present, exp, 0).sum(1).astype(np.int64)),
        "neg_zero_exposure": pa.array(((exp == 0) & present).sum(1).astype(np.int64)),
        "neg_from_candidates": pa.array(from_cand.sum(1).astype(np.int64)),
        "neg_in_history": pa.array(in_hist.sum(1).astype(np.int64)),
        "n_candidates": pa.array(b.lengths.astype(np.int64)),
        "cand_in_cluster": pa.array(b.in_cluster.sum(1).astype(np.int64)),
        "cand_exposure_sum": pa.array(np.where(b.valid, b.exposure, 0).sum(1).astype(np.int64)),
        "exposure_table": pa.array(b.exposure_table.astype(np.int64)),
    }
    return pa.table({f.name: _cast(cols[f.name], f.type) for f in OUTPUT_SCHEMA}, schema=OUTPUT_SCHEMA)


def _cast(arr, type_):
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr if arr.type == type_ else arr.cast(type_)


def _quote(titles: pa.Array) -> pa.Array:
    """``response_text`` over an Arrow string array (checked against it on the first value)."""
    out = pc.binary_join_element_wise('"', titles, '"', "")
    if len(titles) and out[0].as_py() != response_text(titles[0].as_py()):
        return pa.array([response_text(t) for t in titles.to_pylist()], pa.string())
    return out


def _chosen(target_titles) -> pa.Array:
    t = target_titles.combine_chunks() if isinstance(target_titles, pa.ChunkedArray) else target_titles
    return _quote(t)


def render_prompts(history_titles, instruction: str | None) -> pa.Array:
    """``user_message(history, instruction)`` for every row, vectorised in Arrow. The vectorised
    text is checked against ``user_message`` on three rows (first, middle, last) and falls back to
    calling it per row if they differ (e.g. after a change of the prompt format); rows with an empty
    history always go through ``user_message``."""
    h = history_titles.combine_chunks() if isinstance(history_titles, pa.ChunkedArray) else history_titles
    n = len(h)
    head = f"{instruction or DEFAULT_INSTRUCTION}\n{HISTORY_LEAD}\""
    tail = f"\".\n{QUESTION}"
    out = pc.binary_join_element_wise(head, pc.binary_join(h, '", "'), tail, "")
    lens = pc.fill_null(pc.list_value_length(h), 0).to_numpy(zero_copy_only=False)
    checks = sorted({0, n // 2, n - 1} & set(np.flatnonzero(lens > 0).tolist())) if n else []
    if any(out[i].as_py() != user_message(h[i].as_py(), instruction) for i in checks):
        return pa.array([user_message(x or [], instruction) for x in h.to_pylist()], pa.string())
    empty = np.flatnonzero(lens == 0)
    if len(empty):
        vals = out.to_pylist()
        for i in empty.tolist():
            vals[i] = user_message(h[i].as_py() or [], instruction)
        out = pa.array(vals, pa.string())
    return out


# ------------------------------------------------------------------------------------------------
# preparation shared by the local and the Ray path


def _resolve_lightgcn(dataset: Dataset, st: Strategy, lightgcn, embedding_kind: str, lightgcn_config, seed: int):
    """``(embeddings, seen, info)`` for strategies that need them (None otherwise)."""
    if lightgcn is None and not st.needs_embeddings:
        return None, None, None
    if lightgcn is None:
        cfg = lightgcn_config or LightGCNConfig(seed=seed)
        model = LightGCN.fit(dataset, cfg)
        info = {"trained": True, **model.summary(), "embedding_kind": embedding_kind}
        return model.embeddings(embedding_kind), model.seen, info
    if isinstance(lightgcn, (str, Path)):
        model = LightGCN.load(lightgcn)
        info = {"trained": False, "path": str(lightgcn), **model.summary(), "embedding_kind": embedding_kind}
        return model.embeddings(embedding_kind), model.seen, info
    if isinstance(lightgcn, LightGCN):
        info = {"trained": False, **lightgcn.summary(), "embedding_kind": embedding_kind}
        return lightgcn.embeddings(embedding_kind), lightgcn.seen, info
    if isinstance(lightgcn, tuple):
        emb, seen = lightgcn
        return np.asarray(emb), np.asarray(seen, dtype=bool), {"trained": False, "given": "array"}
    emb = np.asarray(lightgcn)
    return emb, np.ones(emb.shape[0], dtype=bool), {"trained": False, "given": "array"}


def prepare(dataset: Dataset, candidates, strategy, seed: int = 0, n_negatives: int | None = None, *,
            annotation: AnnotationConfig | None = None, lightgcn=None, embedding_kind: str = "propagated",
            lightgcn_config: LightGCNConfig | None = None, **annotate_overrides):
    """``(strategy, annotated, state, n, info)``; ``candidates`` may already be ``Annotated``."""
    st = get_strategy(strategy)
    n = int(n_negatives) if n_negatives is not None else st.default_n
    if n < 1:
        raise RaydpoError(f"n_negatives must be >= 1, got {n}")
    t0 = time.perf_counter()
    if isinstance(candidates, Annotated):
        if annotation is not None or annotate_overrides:
            raise RaydpoError(f"the candidates are already annotated ({candidates.config}); annotation options "
                              f"{sorted(annotate_overrides) or ['annotation']} apply to annotate()")
        ann = candidates
    else:
        ann = annotate(dataset, candidates, annotation, **annotate_overrides)
    t1 = time.perf_counter()
    emb, seen, lg_info = _resolve_lightgcn(dataset, st, lightgcn, embedding_kind, lightgcn_config, seed)
    t2 = time.perf_counter()
    state = ann.state(dataset.catalog, instruction=dataset.instruction, embeddings=emb, seen=seen,
                      embedding_kind=embedding_kind if emb is not None else None)
    info = {"annotate_seconds": t1 - t0, "lightgcn_seconds": t2 - t1, "lightgcn": lg_info}
    return st, ann, state, n, info


# ------------------------------------------------------------------------------------------------
# local and Ray runs


def sample_negatives(dataset: Dataset, candidates, strategy, seed: int = 0, n_negatives: int | None = None, *,
                     engine: str = "auto", batch_size: int = 16384, annotation: AnnotationConfig | None = None,
                     lightgcn=None, embedding_kind: str = "propagated", lightgcn_config: LightGCNConfig | None = None,
                     **annotate_overrides) -> tuple[pd.DataFrame, dict]:
    """Preference records for ``strategy`` and the run's summary (see the module docstring).

    ``candidates``: a DataFrame/Arrow table/Parquet path/candidate folder, or an ``Annotated``
    (annotate once, sample many strategies). ``n_negatives``: negatives per pick (default: the
    strategy's). ``lightgcn``: a ``LightGCN``, an ``.npz`` saved by it, an ``[I, d]`` array, or
    None (trained on the train split when the strategy needs it). ``annotate_overrides``:
    ``AnnotationConfig`` fields (``exposure_scope``, ``cluster_k``, ``ignore_genres``, ...).
    """
    t0 = time.perf_counter()
    st, ann, state, n, info = prepare(dataset, candidates, strategy, seed, n_negatives, annotation=annotation,
                                      lightgcn=lightgcn, embedding_kind=embedding_kind,
                                      lightgcn_config=lightgcn_config, **annotate_overrides)
    t1 = time.perf_counter()
    parts = [select_table(ann.table.slice(lo, batch_size), state, st, n, seed, engine)
             for lo in range(0, max(len(ann), 1), batch_size)] if len(ann) else \
        [select_table(ann.table, state, st, n, seed, engine)]
    out = pa.concat_tables(parts)
    info["select_seconds"] = time.perf_counter() - t1
    return finish(out, st, ann, state, n, seed, info, engine=engine, runner="local", t0=t0)


def _ray_select(batch: pa.Table, state_ref, strategy, n: int, seed: int, engine: str) -> pa.Table:
    state = _get_state(state_ref)
    return select_table(batch, state, strategy, n, seed, engine)


_STATE_CACHE: dict = {}


def _get_state(ref):
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _STATE_CACHE:
        _STATE_CACHE.clear()
        _STATE_CACHE[key] = ray.get(ref)
    return _STATE_CACHE[key]


def sample_negatives_ray(dataset: Dataset, candidates, strategy, seed: int = 0, n_negatives: int | None = None, *,
                         engine: str = "auto", batch_size: int = 16384, block_rows: int | None = None,
                         num_cpus: float = 0.5, concurrency: int | None = None,
                         annotation: AnnotationConfig | None = None, lightgcn=None,
                         embedding_kind: str = "propagated", lightgcn_config: LightGCNConfig | None = None,
                         **annotate_overrides) -> tuple[pd.DataFrame, dict]:
    """``sample_negatives`` as a Ray Data ``map_batches`` over the annotated table (same output).

    Annotation (vectorised) and LightGCN training run on the driver; the selection runs in Ray
    tasks of ``num_cpus`` CPUs each (fractional by default: on a small machine whole-CPU tasks
    starve Ray Data's own operators), on blocks of ``block_rows`` records (default: enough blocks
    for every CPU) and batches of ``batch_size``. Ray is started if it is not running
    (``RAY_ADDRESS`` selects a cluster).
    """
    import ray

    t0 = time.perf_counter()
    if not ray.is_initialized():
        from ..storage import ray_init

        ray_init(log_to_driver=False)  # Ray's convention; prints which cluster it joined
    st, ann, state, n, info = prepare(dataset, candidates, strategy, seed, n_negatives, annotation=annotation,
                                      lightgcn=lightgcn, embedding_kind=embedding_kind,
                                      lightgcn_config=lightgcn_config, **annotate_overrides)
    t1 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    payload: "str | Strategy" = st.name if st.builtin else _by_value(st)
    state_ref = ray.put(state)
    total = len(ann)
    if total == 0:
        out = select_table(ann.table, state, st, n, seed, engine)
    else:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        rows = block_rows or max(1024, -(-total // (4 * cpus)))
        blocks = [ann.table.slice(lo, rows) for lo in range(0, total, rows)]
        ds = ray.data.from_arrow(blocks).map_batches(
            _ray_select, batch_format="pyarrow", batch_size=batch_size, num_cpus=num_cpus, concurrency=concurrency,
            fn_kwargs=dict(state_ref=state_ref, strategy=payload, n=n, seed=seed, engine=engine))
        tables = [t for t in ray.get(list(ds.to_arrow_refs())) if t.num_rows]
        out = pa.concat_tables([t.cast(OUTPUT_SCHEMA) for t in tables]).sort_by("row")
    info["select_seconds"] = time.perf_counter() - t1
    return finish(out, st, ann, state, n, seed, info, engine=engine, runner="ray", t0=t0)


def _by_value(st: Strategy) -> Strategy:
    """Ship a user strategy's module by value, so Ray workers need not import it."""
    import ray.cloudpickle as cp

    for f in (st.fn, st.batch):
        mod = getattr(f, "__module__", None)
        if f is not None and mod and mod != "__main__" and not mod.startswith("raydpo.") and mod in sys.modules:
            try:
                cp.register_pickle_by_value(sys.modules[mod])
            except (ValueError, TypeError):  # builtins / already registered
                pass
    return st


# ------------------------------------------------------------------------------------------------
# summary and output


def finish(out: pa.Table, st: Strategy, ann: Annotated, state: SamplingState, n: int, seed: int, info: dict, *,
           engine: str, runner: str, t0: float) -> tuple[pd.DataFrame, dict]:
    summary = summarize(out, st, ann, state, n, seed, info, engine=engine, runner=runner)
    frame = preference_frame(out)
    kept = out.column("n_negatives").to_numpy() > 0
    if not kept.all():  # filter in pandas (references) rather than copying the Arrow strings
        frame = frame[kept].reset_index(drop=True)
    summary["seconds"]["total"] = round(time.perf_counter() - t0, 3)
    return frame, summary


def preference_frame(table: pa.Table) -> pd.DataFrame:
    """The preference columns as pandas, list columns as Python lists."""
    cols = [c for c in PREFERENCE_SCHEMA.names if c in table.column_names]
    t = table.select(cols)
    frame = t.drop_columns(["rejected", "rejected_item_ids"]).to_pandas()
    frame.insert(cols.index("rejected"), "rejected", t.column("rejected").to_pylist())
    frame.insert(cols.index("rejected_item_ids"), "rejected_item_ids", t.column("rejected_item_ids").to_pylist())
    return frame[cols]


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy()


def summarize(out: pa.Table, st: Strategy, ann: Annotated, state: SamplingState, n: int, seed: int, info: dict,
              engine: str = "auto", runner: str = "local") -> dict:
    """The run's explanation (see the module docstring); ``out`` is the ``select_table`` output
    of all records, dropped ones included."""
    N = out.num_rows
    k = _col(out, "n_negatives")
    labels = out.column("fallback").to_numpy(zero_copy_only=False)
    kept = k > 0
    reasons: dict[str, int] = {}
    dropped: dict[str, int] = {}
    if N:
        uniq, inv = np.unique(labels.astype(str), return_inverse=True)
        cnt_all = np.bincount(inv, minlength=len(uniq))
        cnt_drop = np.bincount(inv[~kept], minlength=len(uniq))
        for lab, c, cd in zip(uniq.tolist(), cnt_all.tolist(), cnt_drop.tolist()):
            for r in (lab.split("+") if lab else []):
                reasons[r] = reasons.get(r, 0) + c
            if cd:
                key = lab or "empty_selection"
                dropped[key] = dropped.get(key, 0) + cd
    total = int(k.sum())
    expected = st.picks * n
    tables = _col(out, "exposure_table")
    cat_means = (state.exposure_counts.mean(1) if state.exposure_counts is not None and
                 state.exposure_counts.size else np.zeros(1))
    neg_exp = float(_col(out, "neg_exposure_sum").sum()) / total if total else None
    cat_mean = float(np.average(cat_means[tables[kept]], weights=k[kept])) if total else None
    n_cand = int(_col(out, "n_candidates").sum())
    summary = {
        "strategy": st.name,
        "rule": st.headline,
        "seed": int(seed),
        "n_negatives": int(n),
        "runner": runner,
        "engine": engine if engine != "auto" else ("batch" if st.batch is not None else "record"),
        "records": {"in": int(N), "out": int(kept.sum()), "dropped": dict(sorted(dropped.items())),
                    "dropped_total": int((~kept).sum())},
        "fallbacks": {r: {"count": c, "share": round(c / N, 6)} for r, c in sorted(reasons.items())},
        "negatives": {
            "total": total,
            "per_record": round(total / max(int(kept.sum()), 1), 4),
            "expected_per_record": expected,
            "short_records": int(((k > 0) & (k < expected)).sum()),
            "in_cluster_share": round(float(_col(out, "neg_in_cluster").sum()) / total, 6) if total else None,
            "mean_exposure": round(neg_exp, 6) if neg_exp is not None else None,
            "catalog_mean_exposure": round(cat_mean, 6) if cat_mean is not None else None,
            "exposure_vs_catalog": round(neg_exp / cat_mean, 6) if total and cat_mean else None,
            "zero_exposure_share": round(float(_col(out, "neg_zero_exposure").sum()) / total, 6) if total else None,
            "from_candidates_share": round(float(_col(out, "neg_from_candidates").sum()) / total, 6) if total else None,
            "in_history": int(_col(out, "neg_in_history").sum()),
        },
        "duplicates_avoided": int(_col(out, "duplicates_avoided").sum()),
        "candidate_pool": {
            "mean_exposure": round(float(_col(out, "cand_exposure_sum").sum()) / n_cand, 6) if n_cand else None,
            "in_cluster_share": round(float(_col(out, "cand_in_cluster").sum()) / n_cand, 6) if n_cand else None,
        },
        "candidates": ann.counts,
        "annotation": {**ann.config.to_dict(), "exposure_tables": list(ann.exposure_tables)},
        "lightgcn": info.get("lightgcn"),
        "seconds": {"annotate": round(info.get("annotate_seconds", 0.0), 3),
                    "lightgcn": round(info.get("lightgcn_seconds", 0.0), 3),
                    "select": round(info.get("select_seconds", 0.0), 3)},
    }
    if summary["lightgcn"] is None:
        del summary["lightgcn"]
    return summary


def format_summary(s: dict) -> str:
    """A short human-readable report of a summary."""
    neg, rec, pool = s["negatives"], s["records"], s["candidate_pool"]
    lines = [f"strategy {s['strategy']} (seed {s['seed']}, n {s['n_negatives']}, {s['runner']}/{s['engine']}): "
             f"{rec['out']}/{rec['in']} records, {neg['total']} negatives ({neg['per_record']} per record)",
             f"  rule: {s['rule']}"]
    if rec["dropped"]:
        lines.append("  dropped: " + ", ".join(f"{r} {c}" for r, c in rec["dropped"].items()))
    if s["fallbacks"]:
        lines.append("  fallbacks: " + ", ".join(f"{r} {v['count']} ({100 * v['share']:.1f}%)"
                                                 for r, v in s["fallbacks"].items()))
    else:
        lines.append("  fallbacks: none fired")

    def f(x, p=3):
        return "-" if x is None else f"{x:.{p}f}"

    lines.append(f"  in-cluster negatives {f(neg['in_cluster_share'] and 100 * neg['in_cluster_share'], 1)}% "
                 f"(candidate pool {f(pool['in_cluster_share'] and 100 * pool['in_cluster_share'], 1)}%)")
    lines.append(f"  mean exposure of negatives {f(neg['mean_exposure'])} vs catalog {f(neg['catalog_mean_exposure'])}"
                 f" (x{f(neg['exposure_vs_catalog'], 2)}), candidate pool {f(pool['mean_exposure'])}; "
                 f"zero-exposure {f(neg['zero_exposure_share'] and 100 * neg['zero_exposure_share'], 1)}%")
    c = s["candidates"]
    lines.append(f"  duplicates avoided {s['duplicates_avoided']}; short records {neg['short_records']}; "
                 f"candidates filtered: target {c['filtered_target']}, history {c['filtered_history']}, "
                 f"duplicates {c['duplicates_removed']}, unknown {c['unknown_items_dropped']}")
    sec = s["seconds"]
    lines.append(f"  time: annotate {sec['annotate']} s, lightgcn {sec['lightgcn']} s, select {sec['select']} s, "
                 f"total {sec.get('total', '-')} s")
    return "\n".join(lines)


def summary_path(out: str | Path) -> Path:
    """``out.parquet`` -> ``out.summary.json`` (beside the dataset)."""
    out = Path(out)
    return out.with_name(out.name[: -len(out.suffix)] + ".summary.json") if out.suffix else \
        out.with_name(out.name + ".summary.json")


def write_output(frame: pd.DataFrame, summary: dict, out: str | Path, pairs: str | None = None) -> tuple[Path, Path]:
    """Write the preference dataset (``.parquet`` or ``.jsonl``) and its summary beside it, each atomically.

    ``pairs=None`` writes lists (``rejected: [...]``, S-DPO); ``"first"`` / ``"explode"`` write TRL's
    pair format (``rejected`` a string: the first negative, or one row per negative) via
    ``raydpo.data.preference.to_pairs``. ``read_preferences`` reads both."""
    out = Path(out)
    if out.suffix not in (".parquet", ".jsonl"):
        raise RaydpoError(f"{out}: the output must end in .parquet or .jsonl")
    cols = [c for c in PREFERENCE_SCHEMA.names if c in frame.columns]
    data = frame[cols]
    if pairs is not None:
        if pairs not in ("first", "explode"):
            raise RaydpoError(f"pairs must be 'first' or 'explode', got {pairs!r}")
        data = to_pairs(data, mode=pairs)
    from ..outputs import record_file

    write_preferences(data, out)
    fmt = f"pairs-{pairs}" if pairs else "lists"
    sp = write_json(summary_path(out), {**summary, "output": str(out), "format": fmt})
    record_file(out, "negatives")
    record_file(sp, "negatives-summary")
    return out, sp


def sample_to_file(dataset: Dataset, candidates, strategies: "str | Sequence[str]", out: str | Path, *,
                   seed: int = 0, n_negatives: int | None = None, use_ray: bool = False, quiet: bool = False,
                   fmt: str = "parquet", pairs: str | None = None, **kwargs) -> list[dict]:
    """Run one or more strategies (annotating once), write each dataset + summary, print the summaries.

    ``candidates``: as for :func:`sample_negatives`, ``Annotated`` included.

    ``out``: a ``.parquet``/``.jsonl`` file for one strategy, or a folder that receives
    ``<strategy>.<fmt>`` per strategy.
    """
    names = [strategies] if isinstance(strategies, str) else list(strategies)
    out = Path(out)
    single = out.suffix in (".parquet", ".jsonl")
    if single and len(names) != 1:
        raise RaydpoError(f"{out}: one output file but {len(names)} strategies; give a folder instead")
    for nm in names:
        get_strategy(nm)  # fail before any work on an unknown name
    ann_keys = {f for f in AnnotationConfig.__dataclass_fields__}
    ann_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in ann_keys}
    t0 = time.perf_counter()
    if isinstance(candidates, Annotated):  # annotated once by the caller, e.g. for several n
        if ann_kwargs or kwargs.get("annotation") is not None:
            raise RaydpoError(f"the candidates are already annotated ({candidates.config}); annotation options "
                              "apply to annotate()")
        ann = candidates
    else:
        ann = annotate(dataset, candidates, kwargs.pop("annotation", None), **ann_kwargs)
    annotate_s = time.perf_counter() - t0
    runner = sample_negatives_ray if use_ray else sample_negatives
    if kwargs.get("lightgcn") is None and any(get_strategy(nm).needs_embeddings for nm in names):
        kwargs["lightgcn"] = LightGCN.fit(dataset, kwargs.pop("lightgcn_config", None) or LightGCNConfig(seed=seed))
    summaries = []
    if not single:
        from ..outputs import claim_folder

        claim_folder(out, "negatives")
    for nm in names:
        frame, summary = runner(dataset, ann, nm, seed=seed, n_negatives=n_negatives, **kwargs)
        summary["seconds"]["annotate"] = round(annotate_s, 3)
        path = out if single else out / f"{nm}.{fmt}"
        write_output(frame, summary, path, pairs=pairs)
        summary["output"] = str(path)
        if not quiet:
            print(format_summary(summary))
            print(f"  wrote {path} and {summary_path(path).name}")
        summaries.append(summary)
    return summaries
