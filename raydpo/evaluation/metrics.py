"""Ranking, popularity-bias and fairness metrics over a prediction-to-catalog distance matrix.

Everything is batched tensor work: one stable sort of the ``[N, n_items]`` distance matrix gives
every top-k list (ties broken by the lower item id), and the metrics are reductions over it.

Definitions (the reference protocol, ``../shared/reference/method.md`` section 8). N is the
number of prediction rows; a row whose target is not a catalog item is skipped but, under the
reference protocol, still counts in N.

NDCG@k      (1/N) sum over hits of 1/log2(rank+2)   (one relevant item, IDCG = 1)
HR@k        hits / N
diversity   distinct items over all top-k lists;  DivRatio = diversity / (N*k)
ORRatio     sum of the 3 largest per-item recommendation counts / (N*k)
DGU, MGU    with gp = genre mass of the recommended items and gh = genre mass of the history
            items (each item spreads a unit mass over its fairness genres), both normalised,
            d = gp - gh: DGU = max(d) - min(d), MGU = mean(|d|)
Predict_NotIn_Ratio   share of extracted prediction texts that are not exact catalog titles
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

METRIC_NAMES = ("NDCG", "HR", "diversity", "DivRatio", "DGU", "MGU", "ORRatio", "Predict_NotIn_Ratio")


@dataclass(frozen=True)
class Protocol:
    """How rows enter the metrics.

    ``reference`` (default) reproduces the published evaluator: denominators are all N rows,
    and gh covers every row's history. ``valid_only`` divides by the rows whose target is a
    catalog item and takes gh over the same rows.
    """

    denominator: Literal["all", "valid"] = "all"

    @classmethod
    def named(cls, name: str) -> "Protocol":
        if name == "reference":
            return cls("all")
        if name == "valid_only":
            return cls("valid")
        raise ValueError(f"unknown protocol {name!r}; expected 'reference' or 'valid_only'")


def rank_catalog(dist: torch.Tensor, max_k: int, slack: int = 8) -> torch.Tensor:
    """``[N, max_k]`` item ids nearest first; equal distances keep the lower id first.

    A partial ``topk`` of ``max_k + slack`` candidates, re-sorted by (distance, id), is exact
    whenever the last candidate is strictly farther than the k-th; the rare rows with more ties
    than the slack fall back to a full stable sort.
    """
    n_items = dist.shape[1]
    width = min(n_items, max_k + slack)
    vals, idx = torch.topk(dist, width, dim=1, largest=False, sorted=True)
    # order candidates by id, then stably by distance: ties keep the lower id first
    by_id = torch.sort(idx, dim=1).indices
    idx, vals = idx.gather(1, by_id), vals.gather(1, by_id)
    by_dist = torch.sort(vals, dim=1, stable=True).indices
    top = idx.gather(1, by_dist)[:, :max_k]
    if width < n_items:
        kth = vals.gather(1, by_dist)[:, max_k - 1]
        unsafe = vals.max(dim=1).values <= kth
        if unsafe.any():
            rows = unsafe.nonzero().squeeze(1)
            top[rows] = torch.sort(dist[rows], dim=1, stable=True).indices[:, :max_k]
    return top


def target_ranks(topk: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based position of each row's target in its top list; -1 if absent (or the target is -1)."""
    match = topk == targets[:, None]
    found = match.any(dim=1) & (targets >= 0)
    return torch.where(found, match.int().argmax(dim=1), torch.full_like(targets, -1))


def compute_metrics(
    topk: torch.Tensor,
    ranks: torch.Tensor,
    targets: torch.Tensor,
    genre_weights: torch.Tensor,
    history_genre_mass: torch.Tensor,
    not_in_catalog: torch.Tensor,
    ks: Sequence[int],
    protocol: Protocol = Protocol(),
    history_genre_mass_valid: torch.Tensor | None = None,
) -> dict[int, dict[str, float]]:
    """Metrics at every k from precomputed rankings.

    topk                ``[N, >=max(ks)]`` item ids per row, nearest first
    ranks               ``[N]`` rank of the target within ``topk`` (-1: not in it, or unknown target)
    targets             ``[N]`` target ids (-1 = not in the catalog)
    genre_weights       ``[n_items, G]`` unit genre mass per item (zeros for no genre)
    history_genre_mass  ``[G]`` genre mass of the histories of all rows
    not_in_catalog      ``[N]`` bool, extracted text is not a catalog title
    history_genre_mass_valid  ``[G]`` the same over valid rows only (``valid_only`` protocol)
    """
    n_rows = topk.shape[0]
    n_items = genre_weights.shape[0]
    valid = targets >= 0
    n = float(n_rows if protocol.denominator == "all" else int(valid.sum()))
    gh_mass = history_genre_mass if protocol.denominator == "all" else history_genre_mass_valid
    assert gh_mass is not None
    gh = gh_mass / gh_mass.sum()
    out: dict[int, dict[str, float]] = {}
    vtop = topk[valid]
    vrank = ranks[valid]
    for k in ks:
        hit = (vrank >= 0) & (vrank < k)
        ndcg = (1.0 / torch.log2(vrank[hit].double() + 2.0)).sum().item() / n
        items = vtop[:, :k].reshape(-1)
        counts = torch.bincount(items, minlength=n_items)
        diversity = int((counts > 0).sum())
        top3 = torch.topk(counts, min(3, n_items)).values.sum().item()
        gp_mass = counts.double() @ genre_weights
        gp = gp_mass / gp_mass.sum()
        dis = gp - gh
        out[k] = {
            "NDCG": ndcg,
            "HR": int(hit.sum()) / n,
            "diversity": diversity,
            "DivRatio": diversity / (n * k),
            "DGU": (dis.max() - dis.min()).item(),
            "MGU": dis.abs().mean().item(),
            "ORRatio": top3 / (k * n),
            "Predict_NotIn_Ratio": int(not_in_catalog.sum()) / n_rows,
            "Dis_genre": dis.abs().tolist(),
        }
    return out
