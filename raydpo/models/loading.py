"""Loading a causal LM (and a LoRA adapter) and its tokenizer, optionally quantised."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import RaydpoError
from .checks import check_tokenizer
from .device import resolve_device, resolve_dtype
from .hub import is_hub_id, resolve_model_path
from .quantization import bnb_config, check_compute_dtype, check_quantization, pin_cpu_kernel
from .tiny import TINY

if TYPE_CHECKING:  # pragma: no cover
    from ..data.schema import Catalog


def _prepare_tokenizer(tokenizer) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_tokenizer(tokenizer)


def load_tokenizer(name_or_path: str = TINY, *, catalog: "Catalog | None" = None):
    """Only the tokenizer of :func:`load_model` (left padding, pad token, checked EOS)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, catalog=catalog)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RaydpoError(f"cannot load the tokenizer of {name_or_path!r} ({path}): {e}") from None
    _prepare_tokenizer(tokenizer)
    return tokenizer


def load_model(
    name_or_path: str = TINY,
    *,
    adapter: str | os.PathLike | None = None,
    trainable: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    catalog: "Catalog | None" = None,
    quantization: str = "none",
    compute_dtype: str = "auto",
    gradient_checkpointing: bool = False,
):
    """Load a causal LM and its tokenizer; see :mod:`raydpo.models` for the names accepted.

    ``adapter``: a LoRA adapter folder (or hub id) loaded with ``PeftModel.from_pretrained``,
    trainable when ``trainable``. ``dtype="auto"``: bf16 on CUDA and on CPUs with fast bf16, else fp32
    (:func:`~raydpo.models.device.resolve_dtype`); ``device="auto"``:
    CUDA when available. The model is in eval mode unless ``trainable``. Returns
    ``(model, tokenizer)``; the tokenizer pads on the left and has a pad and an EOS token.

    ``quantization``: ``none``, ``nf4`` (4-bit NormalFloat, matmuls in ``compute_dtype``, no
    double quantisation: the published QLoRA recipe) or ``int8`` (LLM.int8), through
    bitsandbytes on CPU or CUDA (:mod:`raydpo.models.quantization`). The modules it leaves unquantised
    are fp32 (``dtype`` then does not apply); a trainable quantised model goes through peft's
    ``prepare_model_for_kbit_training`` (``gradient_checkpointing`` as asked) before its adapter.
    """
    # every check that needs no loading comes first
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        quantization = check_quantization(quantization)
        compute_dtype = check_compute_dtype(compute_dtype)
    except ValueError as e:
        raise RaydpoError(str(e)) from None
    quant = bnb_config(quantization, compute_dtype, dev)
    adapter_path = None
    if adapter is not None:
        adapter_path = str(adapter)
        p = Path(adapter_path).expanduser()
        if p.exists():
            if not (p / "adapter_config.json").is_file():
                raise RaydpoError(f"adapter folder {str(p)!r} has no adapter_config.json (not a PEFT adapter)")
            adapter_path = str(p)
        elif not is_hub_id(adapter_path):
            raise RaydpoError(f"adapter path {adapter_path!r} does not exist")
    path = resolve_model_path(name_or_path, catalog=catalog)

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant is not None:  # one path for CPU and CUDA; bitsandbytes places the packed weights itself
        import torch

        kwargs = {"dtype": torch.float32, "quantization_config": quant,
                  "device_map": {"": (dev.index if dev.index is not None else torch.cuda.current_device())
                                 if dev.type == "cuda" else str(dev)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise RaydpoError(f"cannot load model {name_or_path!r} ({path}): {e}") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if quant is not None:
        pin_cpu_kernel(model)  # bitsandbytes 0.50.2's CPU repacking corrupts weights (see there)
    if quant is None:
        model.to(dev)
    elif trainable:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if adapter_path is not None:
        from peft import PeftModelForCausalLM

        # PeftModel.from_pretrained picks the class from the adapter's task_type; an adapter saved
        # without one would come back as a bare PeftModel, so ask for the causal-LM wrapper
        try:
            model = PeftModelForCausalLM.from_pretrained(model, adapter_path, is_trainable=trainable)
        except (OSError, ValueError) as e:
            raise RaydpoError(f"cannot load adapter {adapter_path!r} onto {name_or_path!r}: {e}") from None
        if quant is None:
            model.to(dev)
    if trainable:
        model.train()
    else:
        model.eval()
    return model, tokenizer


__all__ = ["load_model", "load_tokenizer"]
