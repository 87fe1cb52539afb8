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

The seed-pooled intervals and paired differences live in :mod:`raydpo.evaluation.stats`
(:func:`~raydpo.evaluation.stats.user_intervals`, :func:`~raydpo.evaluation.stats.paired_difference`),
next to the resampling machinery they share; they are re-exported here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..evaluation.stats import paired_difference, user_intervals  # noqa: F401 (re-exported)

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


def interval_columns(frame, metric: str) -> tuple[str, str] | None:
    """The interval columns of ``metric`` in ``frame``: over users if present (and not all NaN),
    else over seeds, else None."""
    for lo, hi in ((CI_LOW, CI_HIGH), (SEED_CI_LOW, SEED_CI_HIGH)):
        if metric + lo in frame.columns and metric + hi in frame.columns and frame[metric + lo].notna().any():
            return metric + lo, metric + hi
    return None
