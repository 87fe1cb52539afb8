"""Checks on a loaded tokenizer and model: an EOS token, and prompts that fit the context."""

from __future__ import annotations

from typing import Sequence

from ..errors import RaydpoError
from ..prompt import encode_prompt


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


__all__ = ["check_prompt_lengths", "check_token_lengths", "check_tokenizer", "context_length"]
