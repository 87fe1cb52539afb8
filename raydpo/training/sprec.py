"""The SPRec loop (method.md 9): iterations of self-play generation, SFT and DPO.

Iteration ``k`` (one :class:`~raydpo.training.config.Plan` of ``3 x iterations`` stages, run by
:func:`~raydpo.training.ray_train.run_plan` as one fault-tolerant Ray Train job):

1. ``itK-selfplay``: sample ``n_samples`` rows of the split (seed + k) and let the current model
   decode candidates, of which the ``selfplay`` strategy keeps the top one per row
   (:func:`~raydpo.training.selfplay.selfplay_rows`); the rows are written as preference data
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

from .config import SPRecConfig, build, load_yaml
from .ray_train import run_plan
from .selfplay import sample_rows, selfplay_rows  # noqa: F401 - their home before


def run_sprec(config: SPRecConfig | dict | str | Path):
    """Run the SPRec loop; ``config``: an :class:`SPRecConfig`, a mapping or a YAML path.
    Returns the :class:`~raydpo.training.ray_train.TrainResult` (the last DPO adapter)."""
    if isinstance(config, (str, Path)):
        config = load_yaml(config)
    return run_plan(build(SPRecConfig, config, "sprec").to_plan())


__all__ = ["run_sprec", "sample_rows", "selfplay_rows"]
