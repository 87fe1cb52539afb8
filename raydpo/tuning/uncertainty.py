"""Uncertainty in a search: the seeds of a configuration (``repeats: N``), intervals of each
trial's metrics, and paired significance tests between trials.

* Seeds. Repeat ``i`` of a configuration adds ``i`` to every field of :data:`SEED_FIELDS` (the
  seeds of negative sampling and of alignment training); repeat 0 is the configuration itself, so
  ``repeats: 1`` is the search as before and the upstream stages (data, SFT, candidates), whose
  keys do not depend on these seeds, are shared through the stage cache.
* Intervals. A trial reports, for every metric, the mean over its seeds (``NDCG@10``) and

  - ``NDCG@10_ci_low`` / ``_ci_high``: the bootstrap interval over users (the test-set noise) of
    the seed-averaged metric, from the per-user results of the evaluate stage;
  - with two or more seeds, ``NDCG@10_seed_ci_low`` / ``_seed_ci_high`` (Student t interval of
    the mean over seeds: the training noise) and ``NDCG@10_seed_sd``.
* Significance. Two configurations are compared on the same users: a paired bootstrap of the
  difference of the seed-averaged metric (the users resampled with replacement, the same users for
  both sides and for every seed), two-sided p-value, Holm-corrected over the comparisons of a
  family (:func:`raydpo.evaluation.stats.holm`).

One seed goes straight to :mod:`raydpo.evaluation.stats`; several seeds use its vectorised
weighting machinery with the same user resamples for every seed and both sides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SEED_FIELDS = ("sampling.seed", "alignment.seed")
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
SEED_CI_LOW, SEED_CI_HIGH, SEED_SD = "_seed_ci_low", "_seed_ci_high", "_seed_sd"
SUFFIXES = (CI_LOW, CI_HIGH, SEED_CI_LOW, SEED_CI_HIGH, SEED_SD)


def seed_overrides(cfg, repeat: int) -> dict[str, int]:
    """The config fields repeat ``repeat`` changes (none for repeat 0)."""
    from ..config import get_path

    if repeat == 0:
        return {}
    return {f: int(get_path(cfg, f)) + repeat for f in SEED_FIELDS}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, low, high, sd)``: the Student t interval of the mean (NaN bounds for one value)."""
    from scipy import stats as st

    v = np.asarray(values, dtype=float)
    mean = float(v.mean()) if len(v) else math.nan
    if len(v) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = float(st.t.ppf(0.5 + confidence / 2, len(v) - 1)) * sd / math.sqrt(len(v))
    return mean, mean - half, mean + half, sd


def summarize_seeds(per_seed: list[dict[str, float]], confidence: float = 0.95) -> dict[str, float]:
    """Means over the seeds of every metric; with two or more seeds also their t interval and sd."""
    out: dict[str, float] = {}
    for name in per_seed[0]:
        values = [m[name] for m in per_seed]
        mean, lo, hi, sd = t_interval(values, confidence)
        out[name] = mean
        if len(per_seed) > 1:
            out[name + SEED_CI_LOW], out[name + SEED_CI_HIGH], out[name + SEED_SD] = lo, hi, sd
    return out


def per_user_path(run_dir: str | Path, evaluate_key: str) -> Path:
    from ..evaluation.stats import PER_USER_FILE

    return Path(run_dir) / "evaluate" / evaluate_key / PER_USER_FILE


def read_per_user(run_dir: str | Path, keys: Sequence[str]) -> list | None:
    """The per-user results of the evaluations ``keys`` (one per seed), or None when one is missing
    (a stage cached before per-user results existed, or another node's disk)."""
    from ..evaluation.stats import PerUser

    paths = [per_user_path(run_dir, k) for k in keys]
    if not paths or not all(p.exists() for p in paths):
        return None
    return [PerUser.read(p) for p in paths]


def _flat(nested: dict) -> dict[str, Any]:
    return {f"{name}@{k}": v for k, m in nested.items() for name, v in m.items()}


def _check_same_users(groups: Sequence[Sequence]) -> None:
    first = groups[0][0]
    for g in groups:
        for pu in g:
            first.check_paired(pu, ("seed 0", "another seed or trial"))


def _seed_averaged(groups: Sequence[Sequence], metrics: Sequence[str], n_resamples: int, seed: int):
    """For each group (the seeds of one configuration): the exact seed-averaged metrics and their
    bootstrap distribution, every table resampled with the same user counts (users are the unit:
    a user drawn twice counts twice in every seed and in both configurations). Vectorised with
    the weighting machinery of :mod:`raydpo.evaluation.stats`."""
    from ..evaluation import stats as st

    _check_same_users(groups)
    tables = [t for g in groups for t in g]
    ks = list(tables[0].ks)
    items = st._union_items(tables, ks)
    preps = [st._Prepared(t, ks, items, metrics) for t in tables]
    n = len(tables[0])
    batch = st._batch_size(n, len(items) * len(ks) if preps[0].population else 1)
    dists = st._collect(preps, st._resample_batches(n, int(n_resamples), seed, batch))
    exact = [st.metrics_from_per_user(t, ks) for t in tables]
    out, i = [], 0
    for g in groups:
        j = i + len(g)
        dist = {f"{m}@{k}": np.mean([dists[x][k][m] for x in range(i, j)], axis=0) for k in ks for m in metrics}
        point = {f"{m}@{k}": float(np.mean([exact[x][k][m] for x in range(i, j)])) for k in ks for m in metrics}
        out.append((point, dist))
        i = j
    return out


def _metric_names(metrics: Sequence[str] | None) -> list[str]:
    from ..evaluation.metrics import METRIC_NAMES

    return sorted({m.partition("@")[0] for m in metrics}) if metrics else list(METRIC_NAMES)


def user_intervals(pus: Sequence, confidence: float = 0.95, n_resamples: int = 2000,
                   seed: int = 0) -> dict[str, tuple[float, float]]:
    """``{"NDCG@10": (low, high), ...}``: bootstrap interval over users of each metric averaged over
    the seeds ``pus`` (per-user results of the same users)."""
    from ..evaluation import stats as st

    if len(pus) == 1:
        res = st.bootstrap_intervals(pus[0], n_resamples=n_resamples, confidence=confidence, seed=seed)
        return {f"{name}@{k}": (d["ci_low"], d["ci_high"]) for k, m in res.items() for name, d in m.items()}
    ((point, dist),) = _seed_averaged([pus], _metric_names(None), n_resamples, seed)
    alpha = (1 - confidence) / 2
    return {m: st._interval(dist[m], point[m], alpha, "percentile", None, center=m.split("@")[0] in st.DISTINCT_METRICS)
            for m in point}


def paired_difference(a: Sequence, b: Sequence, metrics: Sequence[str], confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{"NDCG@10": {diff, diff_ci_low, diff_ci_high, p_value}}``: the seed-averaged metric of
    ``a`` minus that of ``b`` on the same users, paired bootstrap over users, two-sided p (the
    p-value and interval rules of :func:`raydpo.evaluation.stats.paired_comparison`)."""
    from ..evaluation import stats as st

    names = _metric_names(metrics)
    if len(a) == 1 and len(b) == 1:
        res = _flat(st.paired_comparison(a[0], b[0], n_resamples=n_resamples, confidence=confidence, seed=seed,
                                         metrics=names))
        return {m: dict(res[m]) for m in metrics}
    (pa, da), (pb, db) = _seed_averaged([a, b], names, n_resamples, seed)
    alpha = (1 - confidence) / 2
    out = {}
    for m in metrics:
        distinct = m.split("@")[0] in st.DISTINCT_METRICS
        diff_b, d = da[m] - db[m], pa[m] - pb[m]
        lo, hi = st._interval(diff_b, d, alpha, "percentile", None, center=distinct)
        p = 1.0 if d == 0 and np.all(diff_b == 0) else st._bootstrap_p(diff_b, d, distinct)
        out[m] = {"diff": d, "diff_ci_low": lo, "diff_ci_high": hi, "p_value": p}
    return out


def interval_columns(frame, metric: str) -> tuple[str, str] | None:
    """The interval columns of ``metric`` in ``frame``: over users if present (and not all NaN),
    else over seeds, else None."""
    for lo, hi in ((CI_LOW, CI_HIGH), (SEED_CI_LOW, SEED_CI_HIGH)):
        if metric + lo in frame.columns and metric + hi in frame.columns and frame[metric + lo].notna().any():
            return metric + lo, metric + hi
    return None
