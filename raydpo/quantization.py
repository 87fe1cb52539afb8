"""The former home of :mod:`raydpo.models.quantization` (QLoRA: bitsandbytes NF4 / LLM.int8
loading and the combinations refused); kept so that ``raydpo.quantization`` imports keep working."""

from __future__ import annotations

from .models.quantization import (  # noqa: F401
    COMPUTE_DTYPES,
    INSTALL_HINT,
    QUANTIZATIONS,
    __all__,
    bnb_config,
    check_compute_dtype,
    check_quantization,
    combination_error,
    deepspeed_stage,
    is_quantized,
    model_is_quantized,
    pin_cpu_kernel,
    require_bitsandbytes,
)
