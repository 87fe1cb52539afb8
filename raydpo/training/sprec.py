"""The SPRec loop (method.md 9): iterations of self-play generation, SFT and DPO.

Iteration ``k`` (one :class:`~raydpo.training.config.Plan` of ``3 x iterations`` stages, run by
:func:`~raydpo.training.ray_train.run_plan` as one fault-tolerant Ray Train job):

1. ``itK-selfplay``: sample ``n_samples`` rows of the split (seed + k) and let the current model
   decode one negative per row (:func:`selfplay_rows`); the rows are written as preference data
   ``{prompt, chosen = '"target"', rejected = ['"negative"']}``.
2. ``itK-sft``: SFT on the same rows (prompt -> target), continuing the current adapter.
3. ``itK-dpo``: DPO on the self-play pairs, continuing the SFT adapter, the SFT model as the
   reference (``reference: initial``).

Deliberate differences from the published loop: one prompt format everywhere; negatives from a
trie-constrained beam that excludes the target and the history (always a catalog title, never
the target; the published loop decoded free text and skipped rows without a quoted span); no
trailing newline on either side (no shortcut for DPO); seeded sampling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from .config import SPRecConfig, build, load_yaml


def sample_rows(dataset, split: str, n_samples: int | None, seed: int) -> pd.DataFrame:
    """``n_samples`` rows of ``split`` drawn without replacement (seeded), in dataset order."""
    frame = dataset.split(split).frame
    if n_samples is not None and n_samples < len(frame):
        frame = frame.sample(n=n_samples, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def selfplay_rows(model, tokenizer, dataset, frame: pd.DataFrame, decode: dict[str, Any]) -> list[dict]:
    """One preference row per sample of ``frame`` whose decoding yields a candidate: the target
    as chosen, the model's own top candidates (``num_return_sequences``) as negatives."""
    from ..generation.candidates import CandidateGenerator, DecodeConfig
    from ..prompt import response_text, user_message

    if not len(frame):
        return []
    cfg = DecodeConfig(**decode)
    gen = CandidateGenerator(model, tokenizer, dataset.catalog, cfg, instruction=dataset.instruction)
    cands = gen.candidates(frame)
    rows = []
    for (_, sample), (_, c) in zip(frame.iterrows(), cands.iterrows()):
        ids = [int(x) for x in c["candidate_item_ids"]][: cfg.num_return_sequences]
        if not ids:
            continue
        rows.append({"sample_id": str(sample["sample_id"]),
                     "prompt": user_message(list(sample["history_titles"]), dataset.instruction),
                     "chosen": response_text(sample["target_title"]),
                     "rejected": [response_text(dataset.catalog.titles[i]) for i in ids],
                     "chosen_item_id": int(sample["target_item_id"]), "rejected_item_ids": ids,
                     "strategy": "selfplay"})
    return rows


def run_sprec(config: SPRecConfig | dict | str | Path):
    """Run the SPRec loop; ``config``: an :class:`SPRecConfig`, a mapping or a YAML path.
    Returns the :class:`~raydpo.training.ray_train.TrainResult` (the last DPO adapter)."""
    from .ray_train import run_plan

    if isinstance(config, (str, Path)):
        config = load_yaml(config)
    return run_plan(build(SPRecConfig, config, "sprec").to_plan())


__all__ = ["run_sprec", "sample_rows", "selfplay_rows"]
