"""dtype "auto": bf16 on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16 / AMX-BF16), fp32
on other CPUs; RAYDPO_CPU_BF16 overrides the detection. The CPU flag sets are injected."""

from __future__ import annotations

import pytest
import torch

from raydpo.errors import RaydpoError
from raydpo.models import device as dev_mod
from raydpo.models.device import ENV_CPU_BF16, auto_dtype_name, cpu_bf16_fast, resolve_dtype

# flag sets as /proc/cpuinfo lists them (abridged)
SKYLAKE_X = {"fpu", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni"}
COOPER_LAKE = SKYLAKE_X | {"avx512_bf16"}
SAPPHIRE_RAPIDS = SKYLAKE_X | {"avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
ZEN4 = {"fpu", "avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
OLD_LAPTOP = {"fpu", "sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize("flags,fast", [(SKYLAKE_X, False), (COOPER_LAKE, True), (SAPPHIRE_RAPIDS, True),
                                        (ZEN4, True), (OLD_LAPTOP, False), (set(), False),
                                        ({"amx_bf16"}, True)])
def test_cpu_choice_from_flags(flags, fast):
    assert cpu_bf16_fast(flags, env={}) is fast
    assert auto_dtype_name("cpu", flags=flags, env={}) == ("bfloat16" if fast else "float32")
    assert auto_dtype_name("cuda", flags=flags, env={}) == "bfloat16"  # the flags concern the CPU only
    assert auto_dtype_name("mps", flags=flags, env={}) == "float32"


def test_environment_overrides_the_flags():
    assert cpu_bf16_fast(OLD_LAPTOP, env={ENV_CPU_BF16: "1"}) is True
    assert cpu_bf16_fast(SAPPHIRE_RAPIDS, env={ENV_CPU_BF16: "0"}) is False
    assert cpu_bf16_fast(SAPPHIRE_RAPIDS, env={ENV_CPU_BF16: ""}) is True  # empty: detect
    with pytest.raises(RaydpoError, match=r"RAYDPO_CPU_BF16='maybe': expected 1 or 0"):
        cpu_bf16_fast(SAPPHIRE_RAPIDS, env={ENV_CPU_BF16: "maybe"})


def test_resolve_dtype_uses_this_cpus_flags(monkeypatch):
    """resolve_dtype("auto", "cpu") follows the detected flags (injected here) unless overridden;
    an explicit dtype is never changed."""
    monkeypatch.delenv(ENV_CPU_BF16, raising=False)
    monkeypatch.setattr(dev_mod, "cpu_flags", lambda: frozenset(COOPER_LAKE))
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr(dev_mod, "cpu_flags", lambda: frozenset(SKYLAKE_X))
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    monkeypatch.setenv(ENV_CPU_BF16, "1")
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setenv(ENV_CPU_BF16, "0")
    monkeypatch.setattr(dev_mod, "cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS))
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_nf4_compute_dtype_auto_follows_the_same_choice(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from raydpo.models.quantization import bnb_config

    monkeypatch.delenv(ENV_CPU_BF16, raising=False)
    monkeypatch.setattr(dev_mod, "cpu_flags", lambda: frozenset(SAPPHIRE_RAPIDS))
    assert bnb_config("nf4", "auto", "cpu").bnb_4bit_compute_dtype == torch.bfloat16
    monkeypatch.setattr(dev_mod, "cpu_flags", lambda: frozenset(OLD_LAPTOP))
    assert bnb_config("nf4", "auto", "cpu").bnb_4bit_compute_dtype == torch.float32
    assert bnb_config("nf4", "bfloat16", "cpu").bnb_4bit_compute_dtype == torch.bfloat16


def test_this_machines_flags_are_read():
    """The real probe returns a set (on Linux: /proc/cpuinfo's flags, which always include fpu
    on x86); the choice on this machine is then what its flags say."""
    flags = dev_mod.cpu_flags()
    assert isinstance(flags, frozenset)
    assert cpu_bf16_fast(env={}) == bool(flags & {"avx512_bf16", "amx_bf16"})
