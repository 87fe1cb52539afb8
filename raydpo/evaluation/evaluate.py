"""Evaluate a predictions file in the published format against a dataset split.

A predictions file is a JSON list, one object per row of the split, in order:
``{"prompt": str, "prediction": str, "ground_truth": str}``.

Steps: check the rows match the split (same count, same targets, each history title quoted in
the prompt in order), extract the predicted title from the generated text (the reference rule),
embed predictions and catalog titles, rank the catalog by Euclidean distance (ties by lower id)
and compute the metrics of :mod:`raydpo.evaluation.metrics` at every k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import Dataset, load_dataset
from ..data.schema import UNKNOWN_ITEM, Catalog
from ..errors import DataError
from ..io import write_json
from ..readers import json_kind, read_json
from .encoders import DEFAULT_ENCODER, Encoder, catalog_embeddings, get_encoder
from .metrics import METRIC_NAMES, Protocol, compute_metrics, rank_catalog, target_ranks

PREDICTION_FIELDS = ("prompt", "prediction", "ground_truth")
_QUOTED = re.compile(r'"([^"]+)"')
ROW_CHUNK = 8192


def extract_title(prediction: str) -> str:
    """The reference rule: the first complete ``"..."`` span, else the first line, ``NAN`` if empty."""
    if not prediction:
        return "NAN"
    m = _QUOTED.search(prediction)
    if m:
        return m.group(1)
    return prediction.split("\n")[0]


def strip_title(text: str) -> str:
    return text.strip('" \n')


@dataclass
class Predictions:
    prompts: list[str]
    predictions: list[str]
    ground_truths: list[str]
    path: str | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    @classmethod
    def read(cls, path: str | Path) -> "Predictions":
        rows = read_json(path)
        if not isinstance(rows, list):
            raise DataError(f"expected a JSON list of {{prompt, prediction, ground_truth}}, got a JSON "
                            f"{json_kind(rows)}", path=path)
        cols: dict[str, list[str]] = {f: [] for f in PREDICTION_FIELDS}
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError("record is not a JSON object", path=path, record=i)
            for f in PREDICTION_FIELDS:
                if f not in row:
                    raise DataError("missing field", path=path, record=i, field=f)
                v = row[f]
                if v is None and f == "prediction":
                    v = ""
                if not isinstance(v, str):
                    raise DataError(f"expected a string, got {type(v).__name__}", path=path, record=i, field=f)
                cols[f].append(v)
        if not rows:
            raise DataError("no prediction records", path=path)
        return cls(cols["prompt"], cols["prediction"], cols["ground_truth"], path=str(path))

    def check_against(self, dataset: Dataset, split: str = "test") -> None:
        """Raise a DataError naming the first record whose prompt or ground truth does not match."""
        s = dataset.split(split).frame
        if len(s) != len(self):
            raise DataError(f"{len(self)} predictions but the {split} split of {dataset.name} has {len(s)} rows",
                            path=self.path)
        for i, (prompt, gt, hist, target) in enumerate(
            zip(self.prompts, self.ground_truths, s["history_titles"], s["target_title"])
        ):
            if strip_title(gt) != strip_title(target):
                raise DataError(f"ground truth {gt!r} but {split} row {i} has target {target!r}",
                                path=self.path, record=i, field="ground_truth")
            pos = 0
            for title in hist:
                j = prompt.find(f'"{title}"', pos)
                if j < 0:
                    raise DataError(f"prompt does not contain history title {title!r} of {split} row {i} "
                                    "(is the file for another split or dataset?)",
                                    path=self.path, record=i, field="prompt")
                pos = j + len(title) + 2


def _history_ids_from_prompts(prompts: Sequence[str], catalog: Catalog) -> list[np.ndarray]:
    """Per row, the catalog ids of the titles quoted in its prompt (the reference's gh source)."""
    out = []
    for p in prompts:
        ids = [catalog.id_of(t) for t in _QUOTED.findall(p)]
        out.append(np.asarray([i for i in ids if i != UNKNOWN_ITEM], dtype=np.int64))
    return out


def _history_mass(rows: Sequence[np.ndarray], n_items: int, weights: np.ndarray) -> np.ndarray:
    flat = np.concatenate(rows) if len(rows) else np.zeros(0, dtype=np.int64)
    return np.bincount(flat, minlength=n_items).astype(np.float64) @ weights


def evaluate(
    predictions: Predictions,
    dataset: Dataset,
    ks: Sequence[int] = (5, 10),
    encoder: Encoder | str = DEFAULT_ENCODER,
    protocol: Protocol | str = "reference",
    split: str = "test",
    check: bool = True,
    progress: bool = False,
    per_user: bool = False,
):
    """Metrics of ``predictions`` on ``split`` at each k (see :mod:`raydpo.evaluation.metrics`).

    With ``per_user=True`` returns ``(metrics, PerUser)``: the per-row results every metric can be
    recomputed from on any subset of users (:mod:`raydpo.evaluation.stats`).
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise DataError(f"k must be positive integers, got {ks}", field="k")
    catalog = dataset.catalog
    if ks[-1] > len(catalog):
        raise DataError(f"k={ks[-1]} exceeds the catalog size {len(catalog)}", field="k")
    if isinstance(protocol, str):
        protocol = Protocol.named(protocol)
    if check:  # before the encoder is loaded: bad input fails fast
        predictions.check_against(dataset, split)
    if isinstance(encoder, str):
        encoder = get_encoder(encoder)

    texts = [extract_title(p) for p in predictions.predictions]
    not_in = torch.tensor([catalog.id_of(t) == UNKNOWN_ITEM for t in texts])
    targets = torch.tensor([catalog.id_of(strip_title(g)) for g in predictions.ground_truths], dtype=torch.long)

    cat_emb = torch.from_numpy(catalog_embeddings(encoder, catalog.titles, progress=progress))
    pred_emb = torch.from_numpy(encoder.encode(texts, progress=progress))
    topk_parts, rank_parts = [], []
    for start in range(0, len(texts), ROW_CHUNK):
        dist = torch.cdist(pred_emb[start : start + ROW_CHUNK], cat_emb, p=2)
        top = rank_catalog(dist, ks[-1])
        topk_parts.append(top)
        rank_parts.append(target_ranks(top, targets[start : start + ROW_CHUNK]))
    topk = torch.cat(topk_parts)
    ranks = torch.cat(rank_parts)

    weights = catalog.fairness_weights
    prompt_ids = _history_ids_from_prompts(predictions.prompts, catalog)
    gh_all = _history_mass(prompt_ids, len(catalog), weights)
    valid_rows = (targets >= 0).numpy()
    hist = dataset.split(split).history_matrix() if check else None
    gh_valid = None
    split_ids: list[np.ndarray] | None = None
    if hist is not None:
        split_ids = [h[h >= 0].astype(np.int64) for h in hist]
        gh_valid = _history_mass([split_ids[i] for i in np.flatnonzero(valid_rows)], len(catalog), weights)
    results = compute_metrics(
        topk, ranks, targets, torch.from_numpy(weights), torch.from_numpy(gh_all), not_in, ks, protocol,
        history_genre_mass_valid=torch.from_numpy(gh_valid) if gh_valid is not None else None,
    )
    if not per_user:
        return results
    from .stats import PerUser

    reference = protocol.denominator == "all"
    table = PerUser(np.arange(len(texts)), targets.numpy(), topk.numpy(), ranks.numpy(), not_in.numpy(),
                    prompt_ids if reference or split_ids is None else split_ids, weights, tuple(ks),
                    "reference" if reference else "valid_only",
                    {"dataset": dataset.name, "split": split, "source": predictions.path,
                     "encoder": getattr(encoder, "identity", None)})
    return results, table


def to_json(results: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The CLI contract: ``{"5": {NDCG, HR, diversity, DivRatio, DGU, MGU, ORRatio, Predict_NotIn_Ratio}}``."""
    return {str(k): {name: m[name] for name in METRIC_NAMES} for k, m in results.items()}


def format_table(results: dict[int, dict[str, float]]) -> str:
    ks = sorted(results)
    head = f"{'metric':<20}" + "".join(f"{'@' + str(k):>14}" for k in ks)
    lines = [head, "-" * len(head)]
    for name in METRIC_NAMES:
        cells = []
        for k in ks:
            v = results[k][name]
            cells.append(f"{v:>14d}" if isinstance(v, int) else f"{v:>14.6f}")
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)


def evaluate_file(
    predictions_path: str | Path,
    data_dir: str | Path,
    ks: Sequence[int] = (5, 10),
    json_out: str | Path | None = None,
    encoder: str = DEFAULT_ENCODER,
    protocol: str = "reference",
    split: str = "test",
    progress: bool = True,
    per_user_out: str | Path | None = None,
) -> dict[int, dict[str, float]]:
    dataset = load_dataset(data_dir)
    preds = Predictions.read(predictions_path)
    results = evaluate(preds, dataset, ks, encoder=encoder, protocol=protocol, split=split, progress=progress,
                       per_user=per_user_out is not None)
    if per_user_out is not None:
        results, table = results
        table.write(per_user_out)
    if json_out:
        write_json(json_out, to_json(results))
    return results
