"""DS-DPO data: one beta per negative, from item-embedding distances (method.md 6.3).

For every row, each negative's distance to the chosen item (``dc``), to the mean of the history
(``dp``) or to the mean of history + chosen (``dpc``) is mapped to ``[beta_min, beta_max]``
(:func:`raydpo.training.losses.dsdpo_betas`), using the range of that same distance over the
row's own negatives. The betas are computed once, before training, for every row (the reference
computed them per step from batch element 0 only, normalised dc by the dpc range, set the
distance of padded negatives to 0, crashed on unknown titles and logged to a hard-coded path).

Items are found by ``chosen_item_id`` / ``rejected_item_ids`` when the data has them, else by
title; histories by ``sample_id`` in the dataset. An unknown item is an error naming the row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError, RaydpoError
from .data import BETAS
from .losses import dsdpo_betas, item_distances


def load_item_embeddings(spec: str, catalog) -> np.ndarray:
    """``[n_items, d]`` embeddings: a ``.npy`` / ``.pt`` file in item-id order, or an encoder
    spec (``minilm-onnx``, ``st:NAME``, ``*.onnx``) applied to the catalog titles."""
    p = Path(spec).expanduser()
    if p.suffix in (".npy", ".pt", ".pth"):
        if not p.is_file():
            raise DataError("embedding file not found", path=p)
        if p.suffix == ".npy":
            emb = np.load(p)
        else:
            import torch

            emb = torch.load(p, map_location="cpu", weights_only=True)
            emb = emb.float().numpy() if hasattr(emb, "numpy") else np.asarray(emb)
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != len(catalog):
            raise DataError(f"expected [{len(catalog)}, d] item embeddings (one row per catalog item, in id order), "
                            f"got shape {list(emb.shape)}", path=p)
        if not np.isfinite(emb).all():
            raise DataError("item embeddings contain nan or inf", path=p)
        return emb
    from ..evaluation.encoders import catalog_embeddings, get_encoder

    return np.asarray(catalog_embeddings(get_encoder(spec), list(catalog.titles)), dtype=np.float64)


def _title_id(catalog, text: str) -> int:
    t = text.strip()
    if len(t) >= 2 and t[0] == '"' and t[-1] == '"':
        t = t[1:-1]
    return catalog.id_of(t)


def add_betas(frame: pd.DataFrame, dataset, settings, *, path: str | None = None,
              max_negatives: int | None = None) -> pd.DataFrame:
    """``frame`` with a ``betas`` column (one beta per negative, after ``max_negatives``)."""
    catalog = dataset.catalog
    emb = load_item_embeddings(settings.embeddings, catalog)
    hist_by_id: dict[str, np.ndarray] = {}
    if settings.distance in ("dp", "dpc"):
        samples = dataset.samples.frame
        hist_by_id = {str(s): np.asarray(h, dtype=np.int64) for s, h in zip(samples["sample_id"],
                                                                            samples["history_item_ids"])}
    betas = []
    has_ids = "chosen_item_id" in frame.columns and "rejected_item_ids" in frame.columns
    for i, row in enumerate(frame.itertuples(index=False)):
        row = row._asdict()
        sid = str(row.get("sample_id", i))
        negs = list(row["rejected"])[:max_negatives] if max_negatives else list(row["rejected"])
        if has_ids and row["chosen_item_id"] is not None and not pd.isna(row["chosen_item_id"]):
            chosen = int(row["chosen_item_id"])
            rej = [int(x) for x in list(row["rejected_item_ids"])[: len(negs)]]
        else:
            chosen = _title_id(catalog, row["chosen"])
            rej = [_title_id(catalog, n) for n in negs]
        if len(rej) != len(negs):
            raise DataError(f"{len(rej)} rejected_item_ids for {len(negs)} negatives", path=path, record=sid,
                            field="rejected_item_ids")
        if chosen < 0:
            raise DataError(f"chosen {row['chosen']!r} is not a catalog item (DS-DPO needs its embedding)",
                            path=path, record=sid, field="chosen")
        for j, r in enumerate(rej):
            if r < 0:
                raise DataError(f"negative {j} ({negs[j]!r}) is not a catalog item (DS-DPO needs its embedding)",
                                path=path, record=sid, field="rejected")
        hist = np.empty(0, dtype=np.int64)
        if settings.distance in ("dp", "dpc"):
            if sid not in hist_by_id:
                raise DataError(f"sample {sid!r} is not in the dataset (DS-DPO '{settings.distance}' needs its "
                                "history)", path=path, record=sid, field="sample_id")
            hist = hist_by_id[sid][hist_by_id[sid] >= 0]
            if settings.distance == "dp" and not len(hist):
                raise DataError("the history has no catalog item", path=path, record=sid, field="sample_id")
        d = item_distances(emb, hist, chosen, np.asarray(rej, dtype=np.int64), settings.distance)
        betas.append(dsdpo_betas(d, settings.beta_min, settings.beta_max, settings.mapping,
                                 settings.temperature).tolist())
    out = frame.copy()
    out[BETAS] = betas
    if not all(np.isfinite(b).all() for b in betas):  # pragma: no cover - guarded above
        raise RaydpoError("DS-DPO produced a non-finite beta")
    return out


__all__ = ["add_betas", "load_item_embeddings"]
