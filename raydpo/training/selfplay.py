"""Self-play preference rows (SPRec, method.md 9): the model decodes candidates for sampled rows
and the ``selfplay`` sampling strategy (:func:`raydpo.sampling.strategies.selfplay`) picks its
top ones as negatives.

Below :mod:`.ray_train` (which runs a self-play stage) and :mod:`.sprec` (which builds the loop's
plan); imports neither.
"""

from __future__ import annotations

from typing import Any

import pandas as pd


def sample_rows(dataset, split: str, n_samples: int | None, seed: int) -> pd.DataFrame:
    """``n_samples`` rows of ``split`` drawn without replacement (seeded), in dataset order."""
    frame = dataset.split(split).frame
    if n_samples is not None and n_samples < len(frame):
        frame = frame.sample(n=n_samples, random_state=seed).sort_index()
    return frame.reset_index(drop=True)


def selfplay_rows(model, tokenizer, dataset, frame: pd.DataFrame, decode: dict[str, Any]) -> list[dict]:
    """One preference row per sample of ``frame`` whose decoding yields a candidate: the target
    as chosen, the model's own top candidates (``num_return_sequences``) as negatives, chosen by
    the ``selfplay`` strategy (beam order, never the target, a history item or a duplicate)."""
    from ..generation.candidates import CandidateGenerator, DecodeConfig
    from ..sampling.run import sample_negatives

    if not len(frame):
        return []
    cfg = DecodeConfig(**decode)
    gen = CandidateGenerator(model, tokenizer, dataset.catalog, cfg, instruction=dataset.instruction)
    cands = gen.candidates(frame)
    prefs, _ = sample_negatives(dataset, cands[["sample_id", "candidate_item_ids"]], "selfplay",
                                n_negatives=cfg.num_return_sequences)
    return preference_rows(prefs)


def preference_rows(prefs: pd.DataFrame) -> list[dict]:
    """Preference records as plain Python dicts (ints, lists of ints and strings)."""
    return [{"sample_id": str(r.sample_id), "prompt": r.prompt, "chosen": r.chosen, "rejected": list(r.rejected),
             "chosen_item_id": int(r.chosen_item_id), "rejected_item_ids": [int(i) for i in r.rejected_item_ids],
             "strategy": r.strategy} for r in prefs.itertuples(index=False)]


__all__ = ["preference_rows", "sample_rows", "selfplay_rows"]
