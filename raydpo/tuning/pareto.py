"""Pareto fronts of trials (Ray's ResultGrid has no helper for multi-objective results)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from ..io import atomic_path


def pareto_mask(values: np.ndarray, modes: list[str]) -> np.ndarray:
    """``values`` [n, m]; ``modes`` "max"/"min" per column. True for non-dominated rows.

    Row a dominates b if it is at least as good on every objective and better on one. Rows
    with a NaN objective (failed trials) are never on the front.
    """
    v = np.asarray(values, dtype=float).copy()
    for j, mode in enumerate(modes):
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if mode == "min":
            v[:, j] = -v[:, j]
    ok = ~np.isnan(v).any(axis=1)
    geq = (v[:, None, :] >= v[None, :, :]).all(-1)  # [a, b]: a at least as good as b everywhere
    gt = (v[:, None, :] > v[None, :, :]).any(-1)
    dominated = ((geq & gt) & ok[:, None]).any(axis=0)
    return ok & ~dominated


def pareto_front(frame: pd.DataFrame, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The non-dominated rows of ``frame``, sorted by the first objective (best first)."""
    cols = list(objectives)
    mask = pareto_mask(frame[cols].to_numpy(dtype=float), [objectives[c] for c in cols])
    first = cols[0]
    return frame[mask].sort_values(first, ascending=objectives[first] == "min")


def error_bars(frame: pd.DataFrame, metric: str) -> np.ndarray | None:
    """``[2, n]`` distances from each value down to its interval's low end and up to its high end
    (matplotlib's ``xerr``/``yerr``), or None when the frame has no interval for ``metric``."""
    from .uncertainty import interval_columns

    cols = interval_columns(frame, metric)
    if cols is None:
        return None
    v = frame[metric].to_numpy(dtype=float)
    lo, hi = frame[cols[0]].to_numpy(dtype=float), frame[cols[1]].to_numpy(dtype=float)
    return np.nan_to_num(np.stack([v - lo, hi - v]).clip(min=0))


def plot_front(frame: pd.DataFrame, objectives: Mapping[str, str], path: str | Path,
               label: str | None = None, title: str = "Pareto front") -> Path:
    """Scatter every trial on the first two objectives and draw the front; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = list(objectives)[:2]
    mask = pareto_mask(frame[[x, y]].to_numpy(dtype=float), [objectives[x], objectives[y]])
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    xerr, yerr = error_bars(frame, x), error_bars(frame, y)
    if xerr is not None or yerr is not None:  # each trial's interval (bootstrap over users, else over seeds)
        ax.errorbar(frame[x], frame[y], xerr=xerr, yerr=yerr, fmt="none", ecolor="#c3cad3", elinewidth=1,
                    capsize=2, zorder=1, label="interval")
    ax.scatter(frame[x], frame[y], c="#9aa5b1", label="trials", zorder=2)
    front = frame[mask].sort_values(x)
    ax.plot(front[x], front[y], "o-", color="#d1495b", label="Pareto front", zorder=3)
    if label and label in frame.columns:
        for _, row in front.iterrows():
            ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{x} ({objectives[x]})")
    ax.set_ylabel(f"{y} ({objectives[y]})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
