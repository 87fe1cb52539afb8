"""Which differences between a search's trials are real: paired tests over the users of the
ranking split, between every pair of Pareto-front members and between trials and the baselines
named in the search space (``baselines: [selfplay]``).

Each comparison tests every objective (paired bootstrap of the difference of the seed-averaged
metric, :func:`raydpo.tuning.uncertainty.paired_difference`); the p-values of a family (the
front pairs; the baseline comparisons) are Holm-corrected together, over its comparisons and
objectives. A difference is significant when its Holm-adjusted p is below ``1 - confidence``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

KEYS_COLUMN = "evaluate_keys"
FAMILY_PAIRS, FAMILY_BASELINES = "front pairs", "baselines"


def same_value(a: Any, b: Any) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0) if not isinstance(a, str) and not \
            isinstance(b, str) else str(a) == str(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def trial_labels(frame: pd.DataFrame, params: list[str]) -> pd.Series:
    """A short label per trial: its searched values (``clusterin_high``; ``beta=0.12, epochs=2``)."""
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    def label(row):
        if len(params) == 1:
            return fmt(row[params[0]])
        return ", ".join(f"{p.split('.')[-1]}={fmt(row[p])}" for p in params)

    labels = frame.apply(label, axis=1) if len(frame) else pd.Series([], dtype=str)
    dup = labels.duplicated(keep=False)
    if dup.any():  # two trials with the same values (a grid repeated): the trial number tells them apart
        labels = labels.where(~dup, labels + " #" + frame.index.astype(str))
    return labels


def matches(row: pd.Series, params: dict[str, Any]) -> bool:
    return all(p in row and same_value(row[p], v) for p, v in params.items())


def _keys(row: pd.Series) -> list[str]:
    v = row.get(KEYS_COLUMN)
    return str(v).split() if isinstance(v, str) and v.strip() else []


def comparisons(ok: pd.DataFrame, front: pd.DataFrame, objectives: dict[str, str], params: list[str],
                baselines: dict[str, dict[str, Any]], against: str) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """``([(family, index_a, index_b), ...], notes)``: which trials (indices of ``ok``) to compare."""
    pairs: list[tuple[str, Any, Any]] = []
    notes: list[str] = []
    idx = list(front.index)
    for i, a in enumerate(idx):
        for b in idx[i + 1:]:
            pairs.append((FAMILY_PAIRS, a, b))
    if baselines and len(front):
        first = list(objectives)[0]
        best = front.index[0]
        for name, values in baselines.items():
            runs = ok[ok.apply(lambda r: matches(r, values), axis=1)] if len(ok) else ok
            if runs.empty:
                notes.append(f"baseline {name} ({_describe(values)}): no finished trial ran it, so nothing is "
                             "compared with it (put it in a grid, or give the sampler more trials)")
                continue
            base = runs.sort_values(first, ascending=objectives[first] == "min").index[0]
            chosen = {"best": [best], "front": idx, "all": list(ok.index)}[against]
            for t in chosen:
                if t == base:
                    if against == "best":
                        notes.append(f"the best trial is the baseline {name} itself")
                    continue
                pairs.append((FAMILY_BASELINES, t, base))
    return pairs, notes


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


def significance(ok: pd.DataFrame, front: pd.DataFrame, objectives: dict[str, str], params: list[str],
                 baselines: dict[str, dict[str, Any]], against: str, run_dir: str | Path, split: str,
                 confidence: float = 0.95, n_resamples: int = 2000) -> tuple[pd.DataFrame, str]:
    """The comparisons as a frame (one row per comparison and objective) and as markdown."""
    from ..evaluation.stats import holm
    from .uncertainty import paired_difference, read_per_user

    labels = trial_labels(ok, params)
    pairs, notes = comparisons(ok, front, objectives, params, baselines, against)
    alpha = 1 - confidence
    rows: list[dict[str, Any]] = []
    cache: dict[Any, list | None] = {}

    def per_user(i):
        if i not in cache:
            keys = _keys(ok.loc[i])
            cache[i] = read_per_user(run_dir, keys) if keys else None
        return cache[i]

    missing = set()
    n_users = None
    for family, a, b in pairs:
        pa, pb = per_user(a), per_user(b)
        if pa is None or pb is None:
            missing.update(x for x, p in ((a, pa), (b, pb)) if p is None)
            continue
        n_users = len(pa[0])
        res = paired_difference(pa, pb, list(objectives), confidence=confidence, n_resamples=n_resamples)
        for m in objectives:
            rows.append({"family": family, "trial": labels[a], "versus": labels[b], "metric": m,
                         "better": objectives[m], **res[m]})
    frame = pd.DataFrame(rows, columns=["family", "trial", "versus", "metric", "better", "diff", "diff_ci_low",
                                        "diff_ci_high", "p_value", "p_holm", "significant"])
    for fam in (FAMILY_PAIRS, FAMILY_BASELINES):
        sel = frame["family"] == fam
        if sel.any():
            frame.loc[sel, "p_holm"] = holm(frame.loc[sel, "p_value"].to_numpy(dtype=float))
    frame["significant"] = frame["p_holm"].astype(float) < alpha if len(frame) else pd.Series([], dtype=bool)
    if missing:
        notes.append("no per-user results for " + ", ".join(sorted(str(labels[i]) for i in missing))
                     + " (evaluated before raydpo wrote them): not compared")
    return frame, significance_markdown(frame, notes, split, n_users, confidence)


def _verdict(g: pd.DataFrame) -> str:
    parts = []
    for _, r in g.iterrows():
        if r["significant"]:
            direction = "higher" if r["diff"] > 0 else "lower"
            good = (r["diff"] > 0) == (r["better"] == "max")
            parts.append(f"{r['metric']} significantly {direction} ({'better' if good else 'worse'}, "
                         f"p_holm {r['p_holm']:.3g})")
        else:
            parts.append(f"{r['metric']} no significant difference (p_holm {r['p_holm']:.3g})")
    return "; ".join(parts)


def significance_markdown(frame: pd.DataFrame, notes: list[str], split: str, n_users: int | None,
                          confidence: float) -> str:
    level = f"{confidence:.0%}"
    lines = ["## Significance", "",
             f"Paired bootstrap over the {n_users or '?'} {split} users (the same users for both sides), "
             f"differences with their {level} interval; p-values Holm-corrected within each family; "
             f"significant: p_holm < {1 - confidence:.2g}.", ""]
    for fam, title in ((FAMILY_BASELINES, "Against the baselines"), (FAMILY_PAIRS, "Between the Pareto-front members")):
        sel = frame[frame["family"] == fam]
        if sel.empty:
            continue
        lines += [f"### {title}", ""]
        for (a, b), g in sel.groupby(["trial", "versus"], sort=False):
            lines.append(f"- **{a}** vs **{b}**: {_verdict(g)}")
        lines += ["", "| trial | versus | metric | difference [CI] | p | p (Holm) | significant |",
                  "|---|---|---|---|---|---|---|"]
        for _, r in sel.iterrows():
            lines.append(f"| {r['trial']} | {r['versus']} | {r['metric']} | {r['diff']:+.4f} "
                         f"[{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}] | {r['p_value']:.3g} | "
                         f"{r['p_holm']:.3g} | {'yes' if r['significant'] else 'no'} |")
        lines.append("")
    if frame.empty and not notes:
        lines += ["Nothing to compare (one trial on the front and no baseline).", ""]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"
