"""The ``tiny`` preset: a small randomly initialised ``LlamaForCausalLM`` with a byte-level BPE
tokenizer trained on the catalog titles and the prompt text, built once per (titles,
architecture, seed) and cached under ``cache_dir()/models``."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from ..errors import RaydpoError
from ..io import atomic_path, file_lock
from ..prompt import DEFAULT_INSTRUCTION, HISTORY_LEAD, QUESTION, response_text, user_message
from .store import MARKER, is_built, marker_key, models_dir

if TYPE_CHECKING:  # pragma: no cover
    from ..data.schema import Catalog

TINY = "tiny"
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
    if is_built(target) and marker_key(target) == key:
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if is_built(target) and marker_key(target) == key:
            return target
        _build_tiny(titles, spec, seed, key, target)
    return target


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


__all__ = ["CHATML_TEMPLATE", "IM_END", "IM_START", "PAD_TOKEN", "SPECIAL_TOKENS", "TINY", "TINY_ARCH",
           "build_tiny_model", "build_tiny_tokenizer"]
