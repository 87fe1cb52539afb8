"""Quantised base models (QLoRA): bitsandbytes NF4 / LLM.int8 loading, and the combinations
that cannot work, refused when a config loads.

The published recipe (method.md 2.1, 6.1) loads the base in 4-bit NF4 with bf16 compute and no
double quantisation, calls peft's ``prepare_model_for_kbit_training`` and trains LoRA adapters.
raydpo does the same through :func:`raydpo.models.load_model` (``quantization="nf4"``), for
training, reference pre-computation, self-play, candidate generation and prediction:

``none``  the base in ``dtype`` (the default);
``nf4``   4-bit NormalFloat weights, matmuls in ``compute_dtype`` (bf16 in the published runs);
``int8``  LLM.int8 weights (bitsandbytes casts activations to fp16 inside; ``compute_dtype``
          does not apply).

Every module bitsandbytes does not quantise (embeddings, norms, the LM head) is kept in fp32,
which is what ``prepare_model_for_kbit_training`` makes of them for training: the trained
in-memory model and a base + adapter reloaded for inference compute the same numbers.

Refused at load, with the key path (:func:`combination_error`): full fine-tuning of a quantised
base (its weights are frozen integers), DeepSpeed ZeRO-3 with a quantised base (ZeRO-3
partitions every parameter, which bitsandbytes' packed weights and their quantisation states do
not survive), and LLM.int8 with any DeepSpeed config (DeepSpeed moves and casts the module,
which int8 weights refuse). bitsandbytes 0.50 runs NF4 and int8 (forward and LoRA backward) on
CPU as well as CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import RaydpoError
from .device import resolve_dtype

QUANTIZATIONS = ("none", "nf4", "int8")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
INSTALL_HINT = "pip install 'raydpo[quant]' (bitsandbytes>=0.50.2)"


def check_quantization(value: str | None) -> str:
    """``none`` | ``nf4`` | ``int8`` (None is ``none``); raises ValueError otherwise."""
    v = "none" if value is None else str(value).lower()
    if v not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {value!r}; expected one of {', '.join(QUANTIZATIONS)}")
    return v


def check_compute_dtype(value: str | None) -> str:
    v = "auto" if value is None else str(value).lower()
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    v = aliases.get(v, v)
    if v not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {value!r}; expected one of {', '.join(COMPUTE_DTYPES)}")
    return v


def is_quantized(quantization: str | None) -> bool:
    return check_quantization(quantization) != "none"


def deepspeed_stage(setting: str | None) -> int | None:
    """The ZeRO stage of a ``ray.deepspeed`` setting (a preset or a JSON file; None: no DeepSpeed)."""
    if setting is None:
        return None
    if setting in ("zero2", "zero3"):
        return int(setting[-1])
    try:
        cfg = json.loads(Path(setting).expanduser().read_text())
        return int((cfg.get("zero_optimization") or {}).get("stage", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # reported by the DeepSpeed checks themselves


def combination_error(quantization: str | None, *, deepspeed: str | None = None, full_finetune: bool = False,
                      quant_key: str = "model.quantization", deepspeed_key: str = "ray.deepspeed",
                      full_key: str = "sft.full_finetune") -> str | None:
    """One line naming the key path of a combination that cannot work, or None."""
    q = check_quantization(quantization)
    if q == "none":
        return None
    if full_finetune:
        return (f"{full_key}: full fine-tuning (no LoRA) cannot train a quantised base ({quant_key}: {q}); "
                "train LoRA adapters on it (QLoRA) or set the quantization to none")
    stage = deepspeed_stage(deepspeed)
    if stage == 3:
        return (f"{deepspeed_key}: ZeRO-3 cannot partition a quantised base ({quant_key}: {q}); "
                "use zero2, plain DDP (null), or quantization none")
    if q == "int8" and deepspeed is not None:
        return (f"{deepspeed_key}: DeepSpeed cannot move or cast an LLM.int8 base ({quant_key}: int8); "
                "use nf4 with zero2, plain DDP (null), or quantization none")
    return None


# bitsandbytes' notices that say nothing actionable: the optional ``kernels`` package (at import,
# on CPUs with AVX512-BF16) and LLM.int8's fp16 cast of its inputs (on every forward pass)
_QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")


def require_bitsandbytes(quantization: str) -> None:
    import logging

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RaydpoError(f"model quantization {quantization!r} needs bitsandbytes: {INSTALL_HINT}") from None


def bnb_config(quantization: str, compute_dtype: str = "auto", device: Any = "auto"):
    """The ``BitsAndBytesConfig`` of ``quantization`` (None for ``none``). ``compute_dtype``
    ``auto``: as ``model.dtype`` auto (bf16 on CUDA and on CPUs with fast bf16, else fp32)."""
    q = check_quantization(quantization)
    if q == "none":
        return None
    require_bitsandbytes(q)
    from transformers import BitsAndBytesConfig

    if q == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=resolve_dtype(check_compute_dtype(compute_dtype), device),
                                  bnb_4bit_use_double_quant=False)
    return BitsAndBytesConfig(load_in_8bit=True)


def pin_cpu_kernel(model) -> int:
    """Keep bitsandbytes' 4-bit layers on one kernel path. On CPUs with AVX512-BF16,
    bitsandbytes 0.50.2 repacks a layer's weights in place for a faster kernel the first time it
    runs in eval mode without gradients, and ``state_dict()`` (every adapter save, every
    checkpoint) unpacks them again: that round trip corrupts the weights (summed response
    log-probs moved by ~0.4 nats on SmolLM2-sized layers), and the two kernels differ by ~1e-2 even
    without it. So a reference pre-computation or an evaluation followed by a checkpoint would
    silently train on another base. Returns the number of layers pinned."""
    n = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def model_is_quantized(model) -> bool:
    """A loaded model (or a PEFT wrapper of one) whose base is 4- or 8-bit."""
    base = model
    for _ in range(3):
        if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
            return True
        if getattr(base, "quantization_method", None) == "bitsandbytes":
            return True
        nxt = getattr(base, "base_model", None)
        if nxt is None or nxt is base:
            nxt = getattr(base, "model", None)
        if nxt is None or nxt is base:
            break
        base = nxt
    return False


__all__ = ["COMPUTE_DTYPES", "INSTALL_HINT", "QUANTIZATIONS", "bnb_config", "check_compute_dtype",
           "check_quantization", "combination_error", "deepspeed_stage", "is_quantized", "model_is_quantized",
           "pin_cpu_kernel", "require_bitsandbytes"]
