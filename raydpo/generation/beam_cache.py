"""A KV cache for beam search that never copies the prompt.

transformers' DynamicCache grows by concatenation (every step copies the whole cache) and
beam reordering index-selects the whole cache, prompt included. Beams of one prompt share that
prompt, so reordering only ever needs to move the generated part. ``BeamCache`` preallocates
``prompt + max_new_tokens`` positions, writes each step in place, and reorders only the
generated region. Built from the prompt's cache (one row per prompt, expanded to the beams).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class BeamLayer(DynamicLayer):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, num_beams: int, max_new_tokens: int) -> None:
        super().__init__()
        n, h, p, d = keys.shape
        self.device = keys.device
        self.keys = keys.new_empty((n * num_beams, h, p + max_new_tokens, d))
        self.values = values.new_empty((n * num_beams, values.shape[1], p + max_new_tokens, values.shape[3]))
        self.keys[:, :, :p] = keys.repeat_interleave(num_beams, dim=0)
        self.values[:, :, :p] = values.repeat_interleave(num_beams, dim=0)
        self.prompt_len = self.length = p
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        q = key_states.shape[-2]
        end = self.length + q
        if end > self.keys.shape[2]:
            raise RuntimeError(f"BeamCache is full ({self.keys.shape[2]} positions)")
        self.keys[:, :, self.length:end] = key_states
        self.values[:, :, self.length:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        p, e = self.prompt_len, self.length
        if e > p:
            self.keys[:, :, p:e] = self.keys[beam_idx, :, p:e]
            self.values[:, :, p:e] = self.values[beam_idx, :, p:e]


class BeamCache(Cache):
    def __init__(self, prompt_cache: Cache, num_beams: int, max_new_tokens: int) -> None:
        layers = [BeamLayer(layer.keys, layer.values, num_beams, max_new_tokens) for layer in prompt_cache.layers]
        super().__init__(layers=layers)
