"""Negative sampling at scale: raydpo's vectorised path against a per-record Python baseline.

A *record* is one row of ``candidates.parquet``: one sample with its candidate list (here
``--candidates`` = 10 items, so 1M records = 10M candidate items). The data is synthetic
(``raydpo.data.synthetic``, 1M users, train + valid splits); candidates are seeded random catalog
items in a fixed order, 10 % of records with the target and 20 % with a history item among them (to
be filtered), as unconstrained generation would produce.

Measured, on the same data in one run:

* raydpo local: ``annotate`` once (exposure per split, interest clusters, overlap, filtering,
  title check), then ``sample_negatives`` per strategy (vectorised selection, output records with
  prompts, summary, pandas frame);
* the per-record engine (every strategy as a plain Python function of one record, the path
  user-registered strategies take), on a subset, extrapolated;
* a straightforward per-record baseline in the reference's style (Counter exposure per split,
  per-record genre Counter for the cluster, a dict per candidate, ``min``/``random.choice`` per
  record, one output dict per record), on a subset, extrapolated; its output is asserted equal to
  raydpo's on that subset;
* the Ray Data path (``sample_negatives_ray``) on all records, Ray start-up reported separately.

    python benchmarks/bench_sampling.py [--records 1000000] [--baseline-records 20000] [--no-ray]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from collections import Counter

import numpy as np
import pyarrow as pa

from raydpo.data.synthetic import SyntheticConfig, generate
from raydpo.prompt import response_text, user_message
from raydpo.sampling import LightGCN, LightGCNConfig, annotate, sample_negatives, sample_negatives_ray
from raydpo.sampling.context import counter_uniforms, list_array, record_keys


def make_candidates(ds, k: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    f = ds.samples.frame
    S, n_items = len(f), len(ds.catalog)
    items = np.empty((S, k), dtype=np.int64)
    for j in range(k):  # distinct per row with high probability; repeats are removed (and counted) anyway
        items[:, j] = rng.integers(0, n_items, S)
    tgt = f["target_item_id"].to_numpy()
    m = rng.random(S) < 0.1
    items[m, 2] = tgt[m]
    first_hist = np.fromiter((h[0] for h in f["history_item_ids"]), dtype=np.int64, count=S)
    m = rng.random(S) < 0.2
    items[m, 5] = first_hist[m]
    flat = items.reshape(-1)
    lens = np.full(S, k, dtype=np.int64)
    titles = pa.array(list(ds.catalog.titles), pa.string()).take(pa.array(flat))
    return pa.table({
        "sample_id": pa.array(f["sample_id"].to_numpy(), pa.string()),
        "candidate_item_ids": list_array(lens, flat, pa.int64()),
        "candidate_titles": list_array(lens, titles, pa.string()),
        "candidate_logprobs": list_array(lens, -np.sort(rng.random((S, k)), axis=1).reshape(-1), pa.float64()),
    })


# ------------------------------------------------------------------------------------------------
# the per-record baseline (reference style, faults fixed so that outputs are comparable)


def baseline_globals(ds):
    """What the reference builds once per split file: exposure Counters over history titles, and
    the rank of each title in ``most_common`` order."""
    exp, rank = {}, {}
    for split, grp in ds.samples.frame.groupby("split", sort=False):
        c = Counter()
        for titles, ids in zip(grp["history_titles"], grp["history_item_ids"]):
            c.update(t for t, i in zip(titles, ids) if i >= 0)
        exp[split] = c
        rank[split] = {t: r + 1 for r, (t, _) in enumerate(c.most_common())}
    name2genre = dict(zip(ds.catalog.titles, (list(g) for g in ds.catalog.genres)))
    f = ds.samples.frame  # the records as the reference holds them: one dict (here a tuple) per sample id
    records = dict(zip(f["sample_id"], zip(f["history_titles"], f["target_title"], f["split"])))
    return exp, rank, name2genre, records


def baseline_annotate(ds, cands: pa.Table, n: int, glob) -> list[tuple]:
    """The reference's annotation step, one record at a time: history parsed, interest cluster from a
    genre Counter, target/history/duplicate candidates dropped, one dict per candidate."""
    exp, rank, name2genre, records = glob
    sids = cands.column("sample_id").to_pylist()[:n]
    cand_titles = cands.column("candidate_titles").slice(0, n).to_pylist()
    out = []
    for sid, titles in zip(sids, cand_titles):
        history, chosen, split = records[sid]
        history = list(history)
        hist_set = set(history)
        gc = Counter()
        for t in history:
            for g in name2genre.get(t, []):
                gc[g] += 1
        cluster = set(sorted(gc, key=lambda g: gc[g], reverse=True)[:3])
        seen, details = set(), []
        for t in titles:
            if t == chosen or t in hist_set or t in seen:
                continue
            seen.add(t)
            g = name2genre.get(t, [])
            details.append({"rejected": t, "genre": g, "exposure_count": exp[split].get(t, 0),
                            "exposure_rank": rank[split].get(t), "overlap": len(set(g) & cluster)})
        out.append((sid, history, chosen, details))
    return out


def baseline_select(annotated: list[tuple], strategy: str, instruction, seed: int = 0) -> list[dict]:
    """The reference's sampling step, one record at a time (min/max over the candidate dicts; the
    seeded per-record stream instead of the global ``random``), then one output dict per record."""
    keys = record_keys(seed, [a[0] for a in annotated]) if strategy == "balanced_popularity" else None
    out = []
    for i, (sid, history, chosen, details) in enumerate(annotated):
        if not details:
            continue
        if strategy == "clusterout_low":
            out_c = [d for d in details if d["overlap"] == 0]
            if out_c:
                pick = [min(out_c, key=lambda d: d["exposure_count"])]
            else:
                least = min(d["overlap"] for d in details)
                pick = [min((d for d in details if d["overlap"] == least), key=lambda d: d["exposure_count"])]
        elif strategy == "balanced_popularity":
            d_sorted = sorted(details, key=lambda d: d["exposure_count"], reverse=True)
            m = len(d_sorted)
            u = counter_uniforms(keys[i: i + 1], 0, m)[0]
            if m == 1:
                pick = d_sorted
            else:
                hi = min(range(m // 2), key=lambda j: u[j])
                lo = min(range(m // 2, m), key=lambda j: u[j])
                pick = [d_sorted[hi], d_sorted[lo]]
        else:
            raise ValueError(strategy)
        out.append({"sample_id": sid, "prompt": user_message(history, instruction), "chosen": response_text(chosen),
                    "rejected": [response_text(d["rejected"]) for d in pick]})
    return out


# ------------------------------------------------------------------------------------------------


def timed(fn, *a, **kw):
    t = time.perf_counter()
    r = fn(*a, **kw)
    return r, time.perf_counter() - t


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--candidates", type=int, default=10)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--baseline-records", type=int, default=20_000)
    ap.add_argument("--strategies", nargs="+", default=["clusterout_low", "balanced_popularity", "in_past_nearest"])
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--ray-strategy", default="clusterout_low")
    ap.add_argument("--lightgcn-users", type=int, default=10_000)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    res: dict = {"records": args.records, "candidates_per_record": args.candidates, "items": args.items}

    ds, t = timed(generate, SyntheticConfig(n_users=args.records, n_items=args.items, valid_fraction=0.1,
                                            test_fraction=0.0))
    cands, t2 = timed(make_candidates, ds, args.candidates, 0)
    print(f"setup: synthetic {args.records} users x {args.items} items {t:.1f} s, candidates {t2:.1f} s "
          f"({args.records * args.candidates:,} candidate items)")

    ann, t_ann = timed(annotate, ds, cands)
    res["annotate_s"] = t_ann
    print(f"annotate: {t_ann:.1f} s  (kept {ann.counts['candidates_kept']:,}, filtered target "
          f"{ann.counts['filtered_target']:,}, history {ann.counts['filtered_history']:,}, duplicates "
          f"{ann.counts['duplicates_removed']:,}); peak RSS {rss_gb():.1f} GB")

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(args.items, 64)).astype(np.float32)  # selection cost does not depend on training
    frames = {}
    res["select_s"] = {}
    for s in args.strategies:
        kw = {"lightgcn": emb} if s.startswith(("past", "chosen", "in_", "out_")) else {}
        (frame, summary), t = timed(sample_negatives, ds, ann, s, seed=0, **kw)
        frames[s] = frame
        res["select_s"][s] = t
        print(f"select {s:<22} {t:6.1f} s  -> {len(frame):,} records "
              f"(annotate + select: {t_ann + t:.1f} s); peak RSS {rss_gb():.1f} GB")

    # per-record engine (plain functions) on a subset
    nb = min(args.baseline_records, args.records)
    sub = dataclasses.replace(ann, table=ann.table.slice(0, nb))
    res["record_engine_s_per_1M"] = {}
    for s in args.strategies[:2]:
        (fr, _), t = timed(sample_negatives, ds, sub, s, seed=0, engine="record")
        assert fr.equals(frames[s].iloc[: len(fr)].reset_index(drop=True)), s
        est = t / nb * args.records
        res["record_engine_s_per_1M"][s] = est * 1e6 / args.records
        print(f"record engine {s:<18} {t:6.2f} s for {nb:,} -> {est:7.1f} s for {args.records:,} (extrapolated); "
              "same output")

    # the per-record baseline, in the reference's two steps
    glob, t_glob = timed(baseline_globals, ds)
    b_ann, t_bann = timed(baseline_annotate, ds, cands, nb, glob)
    est_ann = t_bann / nb * args.records + t_glob
    res["baseline"] = {"subset": nb, "globals_s": t_glob, "annotate_subset_s": t_bann,
                       "annotate_extrapolated_s": est_ann,
                       "annotate_speedup": est_ann / t_ann}
    print(f"baseline annotate: {t_bann:.2f} s for {nb:,} + globals {t_glob:.1f} s -> {est_ann:.1f} s for "
          f"{args.records:,} (extrapolated); raydpo {t_ann:.1f} s: {est_ann / t_ann:.1f}x")
    for s in [x for x in args.strategies if x in ("clusterout_low", "balanced_popularity")]:
        recs, t = timed(baseline_select, b_ann, s, ds.instruction)
        ours = frames[s].iloc[: len(recs)]
        assert [r["sample_id"] for r in recs] == ours["sample_id"].tolist()
        assert [r["rejected"] for r in recs] == ours["rejected"].tolist(), s
        assert [r["prompt"] for r in recs] == ours["prompt"].tolist()
        est = t / nb * args.records
        total_b, total_r = est_ann + est, t_ann + res["select_s"][s]
        res["baseline"][s] = {"select_subset_s": t, "select_extrapolated_s": est,
                              "select_speedup": est / res["select_s"][s],
                              "end_to_end_extrapolated_s": total_b, "end_to_end_speedup": total_b / total_r}
        print(f"baseline select {s:<22} {t:6.2f} s for {nb:,} -> {est:6.1f} s (raydpo {res['select_s'][s]:.1f} s: "
              f"{est / res['select_s'][s]:.1f}x); end to end {total_b:.1f} s vs {total_r:.1f} s: "
              f"{total_b / total_r:.1f}x; outputs identical on the subset")
    n_all = 9
    sel_mean = np.mean([res["select_s"][s] for s in res["select_s"] if s in ("clusterout_low", "balanced_popularity")])
    b_sel_mean = np.mean([res["baseline"][s]["select_extrapolated_s"] for s in ("clusterout_low", "balanced_popularity")
                          if s in res["baseline"]])
    all_b, all_r = est_ann + n_all * b_sel_mean, t_ann + n_all * sel_mean
    res["nine_strategies"] = {"baseline_s": all_b, "raydpo_s": all_r, "speedup": all_b / all_r}
    print(f"all 9 cluster/exposure strategies (one annotation, mean selection cost): baseline ~{all_b:.0f} s, "
          f"raydpo ~{all_r:.0f} s: {all_b / all_r:.1f}x")

    # LightGCN training at the size the brief targets
    small = generate(SyntheticConfig(n_users=args.lightgcn_users, n_items=min(args.items, 5000)))
    m, t = timed(LightGCN.fit, small, LightGCNConfig())
    res["lightgcn_fit_s"] = t
    print(f"lightgcn: {m.n_users:,} users, {m.n_interactions:,} interactions, {m.config.epochs} epochs: {t:.1f} s "
          f"(BPR {m.initial_loss:.3f} -> {m.losses[-1]:.3f})")

    if not args.no_ray:
        import ray

        _, t_init = timed(ray.init, num_cpus=2, include_dashboard=False, log_to_driver=False)
        (fr, summ), t = timed(sample_negatives_ray, ds, ann, args.ray_strategy, seed=0, num_cpus=0.5)
        same = fr.equals(frames[args.ray_strategy]) if args.ray_strategy in frames else None
        res["ray"] = {"init_s": t_init, "select_s": t, "same_as_local": same}
        print(f"ray data {args.ray_strategy}: {t:.1f} s on {args.records:,} records (ray.init {t_init:.1f} s); "
              f"identical to local: {same}")
        ray.shutdown()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
