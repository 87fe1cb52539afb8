"""Scoring: the summed log-probability of each response given its prompt (teacher forcing)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Sequence

from ..errors import RaydpoError
from ..prompt import encode_prompt, encode_response
from .checks import check_tokenizer, context_length

if TYPE_CHECKING:  # pragma: no cover
    import torch


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


__all__ = ["sequence_logprobs"]
