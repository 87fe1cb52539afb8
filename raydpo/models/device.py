"""Device and dtype choice: the one place where ``device="auto"`` and ``dtype="auto"`` are decided.

``dtype="auto"`` is bf16 on CUDA and on CPUs that run bf16 matmuls natively (AVX512-BF16 or
AMX-BF16: about 2x the fp32 matmul throughput there), fp32 on every other CPU (where bf16 is
emulated and several times slower than fp32). ``RAYDPO_CPU_BF16=1`` / ``=0`` overrides the
detection (the test suite sets 0, so that its numbers do not depend on the machine).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..errors import RaydpoError

if TYPE_CHECKING:  # pragma: no cover
    import torch

ENV_CPU_BF16 = "RAYDPO_CPU_BF16"
# CPU feature flags (as /proc/cpuinfo names them) that make bf16 matmuls fast
FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def resolve_device(device: str = "auto") -> "torch.device":
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RaydpoError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RaydpoError(f"device {device!r} requested but CUDA is not available")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's bf16-related feature flags: from ``/proc/cpuinfo`` on Linux, else from torch's
    own CPU probe (``torch.cpu._is_avx512_bf16_supported``, ``_is_amx_tile_supported``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    flags = set()
    try:
        import torch

        if torch.cpu._is_avx512_bf16_supported():
            flags.add("avx512_bf16")
        if torch.cpu._is_amx_tile_supported():
            flags.add("amx_bf16")
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - an older torch
        pass
    return frozenset(flags)


def cpu_bf16_fast(flags: Iterable[str] | None = None, env: dict | None = None) -> bool:
    """Whether ``dtype="auto"`` picks bf16 on this CPU: ``RAYDPO_CPU_BF16`` (``1``/``0``) when
    set, else whether the CPU has AVX512-BF16 or AMX-BF16 (``flags``: a flag set to decide for
    instead of this CPU's; ``env``: an environment instead of ``os.environ``)."""
    env = os.environ if env is None else env
    forced = str(env.get(ENV_CPU_BF16, "")).strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        raise RaydpoError(f"{ENV_CPU_BF16}={env.get(ENV_CPU_BF16)!r}: expected 1 or 0 (or unset: detect)")
    have = cpu_flags() if flags is None else frozenset(flags)
    return bool(have & FAST_BF16_FLAGS)


_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def auto_dtype_name(device_type: str, *, flags: Iterable[str] | None = None, env: dict | None = None) -> str:
    """The dtype ``"auto"`` means on a device of type ``device_type`` (``cuda``, ``cpu``, ...):
    ``bfloat16`` on CUDA and on CPUs with fast bf16 (:func:`cpu_bf16_fast`), else ``float32``."""
    if device_type == "cuda":
        return "bfloat16"
    if device_type == "cpu" and cpu_bf16_fast(flags, env):
        return "bfloat16"
    return "float32"


def resolve_dtype(dtype: "str | torch.dtype" = "auto", device: "str | torch.device" = "auto") -> "torch.dtype":
    """``"auto"``: :func:`auto_dtype_name` for ``device`` (bf16 on CUDA and on CPUs with
    AVX512-BF16/AMX-BF16, fp32 elsewhere); else the named dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return getattr(torch, auto_dtype_name(resolve_device(device).type))
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise RaydpoError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return getattr(torch, name)


__all__ = ["ENV_CPU_BF16", "FAST_BF16_FLAGS", "auto_dtype_name", "cpu_bf16_fast", "cpu_flags", "resolve_device",
           "resolve_dtype"]
