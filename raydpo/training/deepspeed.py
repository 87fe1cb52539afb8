"""DeepSpeed configs: generated ZeRO-2 / ZeRO-3 configs, and checks of a user's JSON.

Generated configs carry explicit batch sizes equal to the stage's TrainingArguments
(``train_batch_size = micro_batch * grad_accum * world_size``) and no ``optimizer`` section, so
the HF Trainer hands DeepSpeed a torch AdamW (DeepSpeed's own Adam would JIT-compile
``cpu_adam``/``fused_adam`` on first use; ``zero_allow_untested_optimizer`` admits the torch
one). ZeRO-3 gathers the 16-bit weights on save, so the adapter can be written. On CPU, HF needs
``TrainingArguments(use_cpu=True)`` with DeepSpeed (see ``common.training_kwargs``).

A user JSON may use ``"auto"`` anywhere HF resolves it; numbers must agree with the stages.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..errors import RaydpoError

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def zero_config(stage: int, *, micro_batch: int | str = "auto", grad_accum: int | str = "auto",
                world_size: int | None = None, use_gpu: bool = False, offload_optimizer: bool = False,
                bucket_size: int = 50_000_000) -> dict[str, Any]:
    """A ZeRO-``stage`` (2 or 3) config. With ``world_size`` and numeric batch sizes the
    batch keys are explicit, else ``"auto"`` (HF fills them in)."""
    if stage not in (2, 3):
        raise RaydpoError(f"generated DeepSpeed configs are ZeRO-2 or ZeRO-3, not stage {stage}")
    explicit = isinstance(micro_batch, int) and isinstance(grad_accum, int) and world_size is not None
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(use_gpu),
        "contiguous_gradients": True,
        "reduce_bucket_size": bucket_size,
    }
    if stage == 2:
        zero.update({"allgather_partitions": True, "allgather_bucket_size": bucket_size, "reduce_scatter": True})
    else:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": bucket_size,
                     "stage3_param_persistence_threshold": 10_000})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(use_gpu)}
    return {
        "train_batch_size": micro_batch * grad_accum * world_size if explicit else "auto",
        "train_micro_batch_size_per_gpu": micro_batch if explicit else "auto",
        "gradient_accumulation_steps": grad_accum if explicit else "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def load_user_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RaydpoError(f"{p}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise RaydpoError(f"{p}: malformed DeepSpeed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise RaydpoError(f"{p}: a DeepSpeed config is a JSON object")
    return cfg


def check_config(cfg: dict[str, Any], *, micro_batch: int, grad_accum: int, world_size: int,
                 where: str = "deepspeed config", use_gpu: bool = False) -> None:
    """Raise a RaydpoError when ``cfg`` contradicts the batch sizes of a stage, or asks for
    something that cannot run here."""
    def num(key: str):
        v = cfg.get(key, "auto")
        if v == "auto":
            return None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise RaydpoError(f"{where}: {key} must be a positive integer or \"auto\", got {v!r}")
        return v

    mb, ga, tb = num("train_micro_batch_size_per_gpu"), num("gradient_accumulation_steps"), num("train_batch_size")
    if mb is not None and mb != micro_batch:
        raise RaydpoError(f"{where}: train_micro_batch_size_per_gpu={mb} contradicts the stage's batch_size="
                          f"{micro_batch}")
    if ga is not None and ga != grad_accum:
        raise RaydpoError(f"{where}: gradient_accumulation_steps={ga} contradicts the stage's grad_accum={grad_accum}")
    if tb is not None and tb != micro_batch * grad_accum * world_size:
        raise RaydpoError(f"{where}: train_batch_size={tb} != micro batch {micro_batch} x grad_accum {grad_accum} x "
                          f"{world_size} workers = {micro_batch * grad_accum * world_size}")
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise RaydpoError(f"{where}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise RaydpoError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if not use_gpu:
        for key in ("fp16",):
            if isinstance(cfg.get(key), dict) and cfg[key].get("enabled") is True:
                raise RaydpoError(f"{where}: {key}.enabled is true, but the workers have no GPU")


def resolve(setting: str | None, *, micro_batch: int, grad_accum: int, world_size: int, use_gpu: bool,
            offload_optimizer: bool = False, where: str = "ray.deepspeed") -> dict[str, Any] | None:
    """The DeepSpeed config of a stage: generated (``zero2``/``zero3``) or the user's JSON,
    checked against the stage's batch sizes. None for plain DDP."""
    if setting is None:
        return None
    if setting in ("zero2", "zero3"):
        return zero_config(int(setting[-1]), micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size,
                           use_gpu=use_gpu, offload_optimizer=offload_optimizer)
    cfg = load_user_config(setting)
    check_config(cfg, micro_batch=micro_batch, grad_accum=grad_accum, world_size=world_size,
                 where=f"{where} ({setting})", use_gpu=use_gpu)
    if "optimizer" in cfg and not use_gpu:
        import warnings

        warnings.warn(f"{setting}: a DeepSpeed 'optimizer' section on CPU JIT-compiles cpu_adam/fused_adam on first "
                      "use (minutes); without it the HF Trainer passes a torch AdamW", stacklevel=2)
    return copy.deepcopy(cfg)


def check_available() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise RaydpoError("DeepSpeed is not installed: pip install 'raydpo[deepspeed]' (after torch)") from None


__all__ = ["check_available", "check_config", "load_user_config", "resolve", "zero_config"]
