"""Preference losses as pure functions of sequence log-probabilities (no model, no trainer).

Notation: for an example with chosen response ``y_w`` and negatives ``y_1..y_K``,
``d_w = log pi(y_w) - log pi_ref(y_w)`` and ``d_i = log pi(y_i) - log pi_ref(y_i)`` (summed token
log-probabilities).

* :func:`dpo_sigmoid`: ``-log sigmoid(beta (d_w - d_1))`` (TRL's ``sigmoid`` loss).
* :func:`sdpo`: ``-log sigmoid(-log sum_i exp(beta_i (d_i - d_w)))`` over the *valid* negatives of
  each example (``mask``); a missing negative contributes nothing. Equivalently
  ``log(1 + sum_i exp(beta_i (d_i - d_w)))``. With one negative it is :func:`dpo_sigmoid`.
  ``beta`` is a scalar (S-DPO) or one value per negative (DS-DPO).
* :func:`dsdpo_betas`: DS-DPO's per-negative beta from distances (method.md 6.3).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


def dpo_sigmoid(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-example sigmoid DPO loss ``[B]``."""
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))


def sdpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
         ref_rejected: torch.Tensor, mask: torch.Tensor | None = None,
         beta: float | torch.Tensor = 0.1) -> torch.Tensor:
    """Per-example S-DPO loss ``[B]``.

    ``policy_chosen``/``ref_chosen``: ``[B]``; ``policy_rejected``/``ref_rejected``: ``[B, K]``;
    ``mask``: ``[B, K]`` bool, True for a real negative (None: all real); ``beta``: a float or
    ``[B, K]``. Values at masked positions are ignored (they may be anything, even inf/nan).
    Every example needs at least one real negative.
    """
    if policy_rejected.dim() != 2:
        raise ValueError(f"policy_rejected must be [B, K], got shape {tuple(policy_rejected.shape)}")
    if mask is None:
        mask = torch.ones_like(policy_rejected, dtype=torch.bool)
    mask = mask.bool()
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every example needs at least one negative (a row of the mask is all False)")
    d_w = policy_chosen - ref_chosen  # [B]
    # zero the masked entries before any arithmetic, so inf/nan there cannot leak into gradients
    d = torch.where(mask, policy_rejected - torch.where(mask, ref_rejected, torch.zeros_like(ref_rejected)),
                    torch.zeros_like(policy_rejected))
    if isinstance(beta, torch.Tensor):
        beta = torch.where(mask, beta.to(d.dtype), torch.zeros_like(d))
    z = beta * (d - d_w.unsqueeze(1))
    z = z.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(z, dim=1)
    return F.softplus(lse)  # = -log sigmoid(-lse)


def preference_stats(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, mask: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """TRL-style reward statistics over valid (example, negative) pairs: ``rewards/chosen``
    (``beta d_w``), ``rewards/rejected``, ``rewards/margins`` (``beta (d_w - d_i)``) and
    ``rewards/pair_accuracy`` (share of pairs with a positive margin); ``rewards/accuracies``
    is the share of examples whose chosen reward beats *every* negative's, the metric of that
    name in the research code's S-DPO trainer. With one negative per example the two accuracies
    coincide and every number is TRL's."""
    with torch.no_grad():
        mask = mask.bool()
        cw = beta * (policy_chosen - ref_chosen)
        cr = beta * (policy_rejected - ref_rejected)
        margins = (cw.unsqueeze(1) - cr)[mask]
        return {
            "rewards/chosen": cw.mean(),
            "rewards/rejected": cr[mask].mean(),
            "rewards/margins": margins.mean(),
            "rewards/pair_accuracy": (margins > 0).float().mean(),
            "rewards/accuracies": ((cw.unsqueeze(1) > cr) | ~mask).all(dim=1).float().mean(),
        }


# --- DS-DPO --------------------------------------------------------------------------------------

Distance = Literal["dc", "dp", "dpc"]


def item_distances(emb: np.ndarray, history: np.ndarray, chosen: int, rejected: np.ndarray,
                   kind: Distance) -> np.ndarray:
    """Euclidean distances ``[K]`` of each negative's embedding to: the chosen item (``dc``), the
    mean of the history (``dp``) or the mean of history + chosen (``dpc``)."""
    e_r = emb[rejected]
    if kind == "dc":
        anchor = emb[chosen]
    elif kind == "dp":
        anchor = emb[history].mean(axis=0)
    elif kind == "dpc":
        anchor = emb[np.concatenate([history, [chosen]])].mean(axis=0)
    else:
        raise ValueError(f"unknown distance {kind!r}; expected dc, dp or dpc")
    return np.linalg.norm(e_r - anchor[None, :], axis=1)


def dsdpo_betas(distances: np.ndarray | torch.Tensor, beta_min: float, beta_max: float,
                mapping: Literal["linear", "sigmoid"] = "sigmoid", temperature: float = 0.8,
                mask: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
    """Per-negative betas ``[B, K]`` (or ``[K]``) from distances of one type.

    Each example's distances are scaled to ``x = (d - d_min) / (d_max - d_min)`` over its own
    valid negatives (``d_max == d_min`` gives x = 0); ``linear``: ``beta = lo + x (hi - lo)``;
    ``sigmoid``: ``beta = lo + sigmoid((x - 0.5) / T) (hi - lo)``. Masked entries get ``nan``.
    """
    d = np.asarray(distances.detach().cpu() if isinstance(distances, torch.Tensor) else distances, dtype=np.float64)
    one = d.ndim == 1
    if one:
        d = d[None, :]
    m = np.ones_like(d, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(d.shape)
    if not m.any(axis=1).all():
        raise ValueError("every example needs at least one negative")
    d_min = np.where(m, d, np.inf).min(axis=1, keepdims=True)
    d_max = np.where(m, d, -np.inf).max(axis=1, keepdims=True)
    denom = d_max - d_min
    denom = np.where(denom > 0, denom, 1.0)
    x = (d - d_min) / denom
    if mapping == "linear":
        s = x
    elif mapping == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-(x - 0.5) / temperature))
    else:
        raise ValueError(f"unknown mapping {mapping!r}; expected linear or sigmoid")
    out = beta_min + s * (beta_max - beta_min)
    out = np.where(m, out, np.nan)
    return out[0] if one else out


__all__ = ["dpo_sigmoid", "dsdpo_betas", "item_distances", "preference_stats", "sdpo"]
