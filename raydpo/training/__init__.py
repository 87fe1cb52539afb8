"""Alignment training on Ray Train with DeepSpeed: SFT, DPO (TRL), S-DPO, DS-DPO, curricula and
the SPRec loop.

Quick start::

    from raydpo.training import run_plan

    result = run_plan({
        "model": {"name_or_path": "tiny"}, "dataset": "data/synth", "output_dir": "runs/x",
        "stages": [
            {"kind": "sft", "data": "data/synth", "epochs": 1},
            {"kind": "preference", "data": "prefs.parquet", "loss": "sdpo", "beta": 0.1},
        ],
        "ray": {"num_workers": 2, "deepspeed": "zero2"},
    })
    result.adapter_path, result.metrics

Modules: :mod:`.config` (typed settings), :mod:`.losses` (pure loss functions),
:mod:`.data` (tokenising the raydpo way, collators), :mod:`.sft`, :mod:`.dpo`, :mod:`.sdpo`,
:mod:`.dsdpo`, :mod:`.reference`, :mod:`.deepspeed`, :mod:`.ray_train` (running a plan),
:mod:`.curriculum`, :mod:`.selfplay`, :mod:`.sprec`, :mod:`.cli`.
"""

from __future__ import annotations

from .config import (
    Curriculum,
    DSDPOSettings,
    LoraSettings,
    ModelSettings,
    Plan,
    PreferenceConfig,
    RayTrainSettings,
    SelfPlayConfig,
    SFTConfig,
    SPRecConfig,
    load_config,
)


def run_plan(plan):
    """Check and run a :class:`Plan` (or a mapping); returns a :class:`~.ray_train.TrainResult`."""
    from .ray_train import run_plan as _run

    return _run(plan)


def run_curriculum(config):
    from .curriculum import run_curriculum as _run

    return _run(config)


def run_sprec(config):
    from .sprec import run_sprec as _run

    return _run(config)


def single_stage_plan(stage, *, output_dir: str, model=None, dataset: str | None = None, ray=None) -> Plan:
    """A :class:`Plan` of one stage (an :class:`SFTConfig` or :class:`PreferenceConfig` or a mapping)."""
    return Plan.model_validate({"model": model or {}, "dataset": dataset, "output_dir": output_dir,
                                "stages": [stage if isinstance(stage, dict) else stage.model_dump()],
                                "ray": ray or {}})


def run_sft(stage: SFTConfig | dict, *, output_dir: str, model=None, dataset: str | None = None, ray=None):
    """One SFT stage on Ray Train."""
    stage = {**(stage if isinstance(stage, dict) else stage.model_dump()), "kind": "sft"}
    return run_plan(single_stage_plan(stage, output_dir=output_dir, model=model, dataset=dataset, ray=ray))


def run_preference(stage: PreferenceConfig | dict, *, output_dir: str, model=None, dataset: str | None = None,
                   ray=None):
    """One preference stage (DPO / any TRL loss / S-DPO / DS-DPO) on Ray Train."""
    stage = {**(stage if isinstance(stage, dict) else stage.model_dump()), "kind": "preference"}
    return run_plan(single_stage_plan(stage, output_dir=output_dir, model=model, dataset=dataset, ray=ray))


__all__ = [
    "Curriculum", "DSDPOSettings", "LoraSettings", "ModelSettings", "Plan", "PreferenceConfig", "RayTrainSettings",
    "SFTConfig", "SPRecConfig", "SelfPlayConfig", "load_config", "run_curriculum", "run_plan", "run_preference",
    "run_sft", "run_sprec", "single_stage_plan",
]
