"""Curricula: stages in order, each with its own preference data, loss, epochs and beta, each
starting from the previous stage's adapter.

The published "two_stages" runs trained clusterout_low and then clusterin_{low,high} with TRL
DPO, each stage continuing the previous adapter with the previous stage's model as the
reference (method.md 6.5). Here every stage chooses its reference: ``initial`` (the previous
stage, as published), ``start`` (the model the curriculum starts from, e.g. the SFT adapter),
``adapter_disabled``, ``precomputed`` or ``stage:NAME``. A stage may use any loss (TRL's,
``sdpo``, ``dsdpo``) and may be an SFT stage.

The whole curriculum is one Ray Train job (:func:`raydpo.training.ray_train.run_plan`): a worker
killed in stage 3 resumes stage 3 from its last checkpoint, and stages 1-2 are not redone.
"""

from __future__ import annotations

from pathlib import Path

from .config import Curriculum, build, load_yaml


def run_curriculum(config: Curriculum | dict | str | Path):
    """Run a curriculum; ``config``: a :class:`Curriculum`, a mapping or a YAML path."""
    from .ray_train import run_plan

    if isinstance(config, (str, Path)):
        config = load_yaml(config)
    return run_plan(build(Curriculum, config, "curriculum").to_plan())


__all__ = ["run_curriculum"]
