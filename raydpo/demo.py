"""The embedded default run: synthetic data, two transparent baselines, the published metrics.

It needs no model download and runs in seconds. It shows what the evaluator measures: a
popularity baseline scores some hits but concentrates recommendations (high ORRatio); a
sequential "next in series" baseline is both more accurate and more diverse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.schema import Dataset
from .data.stats import exposure
from .evaluation import evaluate, format_table
from .evaluation.evaluate import Predictions
from .io import write_json
from .prompt import response_text, user_message


def popularity_predictions(ds: Dataset, split: str = "test") -> list[str]:
    """The most exposed training item that is not in the user's history."""
    exp = exposure(ds.catalog, ds.samples, scope="train_interactions")
    order = np.argsort(-exp.counts, kind="stable")
    out = []
    for hist in ds.split(split).frame["history_item_ids"]:
        seen = set(hist)
        item = next(int(i) for i in order if int(i) not in seen)
        out.append(ds.catalog.titles[item])
    return out


def successor_predictions(ds: Dataset, split: str = "test") -> list[str]:
    """The item that most often followed the last history item in training, else popularity."""
    train = ds.split("train").frame
    follow: dict[int, dict[int, int]] = {}
    for hist, tgt in zip(train["history_item_ids"], train["target_item_id"]):
        seq = list(hist) + [int(tgt)]
        for a, b in zip(seq, seq[1:]):
            if a >= 0 and b >= 0:
                follow.setdefault(int(a), {}).setdefault(int(b), 0)
                follow[int(a)][int(b)] += 1
    fallback = popularity_predictions(ds, split)
    out = []
    for hist, fb in zip(ds.split(split).frame["history_item_ids"], fallback):
        nxt = follow.get(int(hist[-1]), {})
        seen = set(int(h) for h in hist)
        cands = sorted(((-c, b) for b, c in nxt.items() if b not in seen))
        out.append(ds.catalog.titles[cands[0][1]] if cands else fb)
    return out


def write_predictions(ds: Dataset, titles: list[str], path: Path, split: str = "test") -> Predictions:
    frame = ds.split(split).frame
    rows = [
        {"prompt": user_message(list(h), ds.instruction), "prediction": response_text(t), "ground_truth": g}
        for h, t, g in zip(frame["history_titles"], titles, frame["target_title"])
    ]
    write_json(path, rows)
    return Predictions.read(path)


def run_demo(out: Path, n_users: int = 2000, seed: int = 0) -> dict:
    from .data.synthetic import SyntheticConfig, generate

    ds = generate(SyntheticConfig(n_users=n_users, seed=seed))
    ds.save(out / "data")
    print(f"synthetic dataset: {len(ds.catalog)} items, {len(ds.samples)} samples -> {out / 'data'}")
    results = {}
    for name, fn in [("popularity", popularity_predictions), ("next_in_series", successor_predictions)]:
        preds = write_predictions(ds, fn(ds), out / f"predictions_{name}.json")
        res = evaluate(preds, ds, (5, 10))
        write_json(out / f"metrics_{name}.json", {str(k): v for k, v in res.items()})
        results[name] = res
        print(f"\n== {name} ({len(preds)} test rows) ==\n{format_table(res)}")
    print(f"\nartifacts in {out}")
    return results
