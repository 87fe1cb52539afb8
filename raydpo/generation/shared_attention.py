"""Prompt-shared attention for beam search: the prompt's keys and values are stored once.

All beams of one prompt attend to the same prompt keys and values. transformers repeats them
for every beam (``num_beams`` copies, read again at every step, and reordered with the beams),
so a decode step is ``batch * num_beams`` matrix-vector products over the prompt. Here the
prompt part is kept once per prompt and a step computes, per prompt and key-value head, one
matrix product of all its beams' queries with the prompt keys.

The generated part is never reordered either: step ``s`` writes the keys/values of all beams
(in that step's beam order) into slot ``s``, and an ancestor table [prompt, beam, step] says
which slot entry lies on each current beam's path (beam reordering only permutes that small
table). A step scores every beam's query against every slot entry of its prompt (one more
small matrix product) and keeps its ancestors' columns. Prompt and generated scores are joined
before one softmax, so the result is the same attention, up to floating-point summation order.

:func:`prefill` runs the prompts once per prompt and a prefix common to the whole batch (chat
template, instruction) only once.

Use: ``logits, cache, mask = prefill(model, ids, attention_mask)``, wrap the cache in
:class:`SharedPromptCache`, and run decode steps inside :func:`shared_prompt_attention`, passing
``shared_prompt=cache`` to the model. It works for models that route attention through
transformers' ``AttentionInterface`` (``model._supports_attention_backend``: Llama, Qwen2,
Mistral, Gemma, ... i.e. SmolLM2 and our tiny preset); :func:`supports_shared_prompt` says so,
and ``beam_search`` stops with a clear error if a layer bypasses the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

NAME = "raydpo_shared_prompt"


class SharedPromptLayer(DynamicLayer):
    """Prompt keys/values once per prompt [B, Hkv, P, d]; generated ones in step slots.

    Generated keys/values are never reordered: slot ``s`` holds, for every beam ``j`` of the
    step-``s`` order, its key/value (layout [B, Hkv, T, nb, d]). The cache's ancestor table says
    which slot entry belongs to the history of each current beam.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_beams: int, max_new_tokens: int) -> None:
        super().__init__()
        n, h, _, d = keys.shape
        self.device = keys.device
        self.num_beams = num_beams
        self.prompt_keys, self.prompt_values = keys.contiguous(), values.contiguous()
        self.keys = keys.new_empty((n, h, max_new_tokens, num_beams, d))
        self.values = values.new_empty((n, values.shape[1], max_new_tokens, num_beams, values.shape[3]))
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise RuntimeError("SharedPromptCache takes one generated token per step")
        if self.length >= self.keys.shape[2]:
            raise RuntimeError(f"SharedPromptCache is full ({self.keys.shape[2]} generated positions)")
        b, h, _, nb, d = self.keys.shape
        self.keys[:, :, self.length] = key_states.view(b, nb, h, d).transpose(1, 2)
        self.values[:, :, self.length] = value_states.view(b, nb, h, -1).transpose(1, 2)
        self.length += 1
        return self.slots()

    def slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated keys and values so far as [B, Hkv, length * nb, d] (views, no copy)."""
        b, h, _, nb, d = self.keys.shape
        return (self.keys[:, :, :self.length].reshape(b, h, self.length * nb, d),
                self.values[:, :, :self.length].reshape(b, h, self.length * nb, -1))

    def get_seq_length(self) -> int:
        return self.prompt_keys.shape[2] + self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass  # the cache-wide ancestor table is reordered instead


class SharedPromptCache(Cache):
    """Built from the prompt cache of a prefill pass (one row per prompt)."""

    def __init__(self, prompt_cache: Cache, prompt_mask: torch.Tensor, num_beams: int, max_new_tokens: int) -> None:
        layers = [SharedPromptLayer(layer.keys, layer.values, num_beams, max_new_tokens)
                  for layer in prompt_cache.layers]
        super().__init__(layers=layers)
        b, dev = prompt_mask.shape[0], prompt_mask.device
        self.num_beams = num_beams
        dtype = layers[0].prompt_keys.dtype
        # additive mask over the prompt positions (left padding), [B, 1, 1, P]
        bias = torch.zeros(prompt_mask.shape, dtype=dtype, device=dev)
        self.prompt_bias = bias.masked_fill(prompt_mask == 0, torch.finfo(dtype).min)[:, None, None, :]
        # columns[b, i, s] = s * nb + j: beam j of step s is on current beam i's path (the
        # ancestor table, as columns of the flattened slots); steps not generated yet: j = i
        steps = torch.arange(max_new_tokens, device=dev) * num_beams
        self.columns = (torch.arange(num_beams, device=dev)[:, None] + steps).repeat(b, 1, 1)
        self.calls = 0

    def select_prompts(self, kept: torch.Tensor) -> None:
        """Keep only these prompts (indices into the current batch), with all their beams."""
        for layer in self.layers:
            layer.prompt_keys, layer.prompt_values = layer.prompt_keys[kept], layer.prompt_values[kept]
            layer.keys, layer.values = _select_used(layer.keys, kept, layer.length), _select_used(
                layer.values, kept, layer.length)
        self.prompt_bias, self.columns = self.prompt_bias[kept], self.columns[kept]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """``beam_idx``: flat index (prompt * nb + beam) of each new beam's parent."""
        length = self.layers[0].length
        if length:
            b, nb, _ = self.columns.shape
            src = (beam_idx.view(b, nb) - torch.arange(b, device=beam_idx.device)[:, None] * nb)
            # a new beam's path is its parent's path: take the parent's row of the table
            self.columns[:, :, :length] = self.columns[:, :, :length].gather(1, src[:, :, None].expand(-1, -1, length))


def _select_used(slots: torch.Tensor, kept: torch.Tensor, length: int) -> torch.Tensor:
    """``slots[kept]``, copying only the generated steps so far (the rest is unwritten)."""
    out = slots.new_empty((len(kept), *slots.shape[1:]))
    out[:, :, :length] = slots[kept, :, :length]
    return out


def _shared_prompt_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs):
    cache: SharedPromptCache | None = kwargs.get("shared_prompt")
    if cache is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer = cache.layers[module.layer_idx]
    pk, pv = layer.prompt_keys, layer.prompt_values
    n, h, _, d = query.shape
    b, hkv, p, _ = pk.shape
    nb, grp, t = n // b, h // hkv, layer.length
    scale = scaling if scaling is not None else d ** -0.5
    # the queries of all beams of a prompt (and of the query heads sharing a kv head) side by side
    q = query.view(b, nb, hkv, grp, d).transpose(1, 2).reshape(b, hkv, nb * grp, d) * scale
    # prompt part: bias (left padding) + scaled scores in one batched GEMM, [B, Hkv, nb*grp, P]
    s_prompt = torch.baddbmm(cache.prompt_bias.expand(b, hkv, 1, p).reshape(b * hkv, 1, p),
                             q.reshape(b * hkv, nb * grp, d), pk.reshape(b * hkv, p, d).transpose(1, 2))
    # generated part: scores against every slot entry, then each beam keeps its ancestors' columns
    cols = cache.columns[:, None, :, None, :t].expand(b, hkv, nb, grp, t).reshape(b, hkv, nb * grp, t)
    s_gen = torch.matmul(q, key.transpose(-1, -2)).gather(-1, cols)  # [B, Hkv, nb*grp, t]
    scores = torch.cat([s_prompt.view(b, hkv, nb * grp, p), s_gen], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    p_gen = torch.zeros((b, hkv, nb * grp, t * nb), dtype=probs.dtype, device=probs.device)
    p_gen.scatter_(-1, cols, probs[..., p:])
    out = torch.matmul(probs[..., :p], pv) + torch.matmul(p_gen, value)  # [B, Hkv, nb*grp, d]
    cache.calls += 1
    # transformers' convention: [batch, q_len, heads, head_dim]
    return out.view(b, hkv, nb, grp, -1).transpose(1, 2).reshape(n, 1, h, -1), None


def left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch (0 at each row's first real token)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Tokens that every (left-padded) prompt of the batch starts with, leaving each at least one."""
    lens = attention_mask.sum(1)
    shortest = int(lens.min()) - 1
    if input_ids.shape[0] < 2 or shortest <= 0:
        return 0
    start = input_ids.shape[1] - lens
    heads = input_ids.gather(1, start[:, None] + torch.arange(shortest, device=input_ids.device))
    same = (heads == heads[:1]).all(0).long()
    return int(same.cumprod(0).sum())


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, min_shared: int = 16):
    """The prompt pass for a left-padded batch; returns (last logits, prompt cache, its mask).

    A prefix shared by all prompts (the chat template's system prompt, the instruction) of at
    least ``min_shared`` tokens is computed once: one pass over the prefix, then one over the
    left-padded suffixes attending to it. The cache then holds ``prefix | padding | suffix`` per
    prompt and the returned mask marks the padding.
    """
    shared = common_prefix_length(input_ids, attention_mask)
    if shared < min_shared:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                    position_ids=left_padded_positions(attention_mask))
        return out.logits, out.cache, attention_mask
    b, width = input_ids.shape
    lens = attention_mask.sum(1)
    first = int(width - lens[0])
    head = model(input_ids=input_ids[:1, first:first + shared], use_cache=True, logits_to_keep=1,
                 position_ids=torch.arange(shared, device=input_ids.device)[None])
    cache = head.cache
    cache.batch_repeat_interleave(b)
    rest = int(lens.max()) - shared
    tail_mask = (torch.arange(rest, device=input_ids.device)[None, :] >= (rest - (lens - shared))[:, None]).long()
    mask = torch.cat([attention_mask.new_ones((b, shared)), tail_mask.to(attention_mask.dtype)], 1)
    out = model(input_ids=input_ids[:, width - rest:], attention_mask=mask, cache=cache, use_cache=True,
                position_ids=left_padded_positions(mask)[:, shared:], logits_to_keep=1)
    return out.logits, out.cache, mask


def _no_mask(*args, **kwargs):
    return None  # decode steps of shared-prompt attention build their own prompt mask


AttentionInterface.register(NAME, _shared_prompt_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _no_mask)


def supports_shared_prompt(model) -> bool:
    """Whether the model's attention layers dispatch through transformers' AttentionInterface."""
    base = getattr(model, "get_base_model", lambda: model)()
    return bool(getattr(base, "_supports_attention_backend", False)) and hasattr(base.config, "_attn_implementation")


@contextmanager
def shared_prompt_attention(model) -> Iterator[None]:
    """Route the model's attention through the shared-prompt kernel (restored on exit)."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")
               and hasattr(m.config, "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = NAME
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]
