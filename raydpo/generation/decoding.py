"""Trie-constrained decoding: beam search, diverse (group) beam search, sampling, greedy.

``beam_search`` is our own vectorised loop. With one group it follows transformers 5's beam
search step for step (same top-2k continuations, same finished-beam bookkeeping, same length
penalty and early-stopping heuristic), so it returns exactly the beams of
``generate(num_beams=..., prefix_allowed_tokens_fn=...)``; the test suite checks this. With G
groups it is diverse beam search (Vijayakumar et al.): the beams are split into G groups that
advance one after another at each step, and a token already chosen at this step by an earlier
group is penalised by ``diversity_penalty`` per use (the Hamming penalty), which transformers 5
no longer ships. With G > 1 it follows transformers 4's ``_group_beam_search`` step for step (the
research code's candidates came from it; ``tests/test_group_beam_fixtures.py`` checks sequences
and scores against outputs recorded with transformers 4.56.2): a group is done when it holds
``num_beams / G`` finished hypotheses and the best candidate of the step (finished or not,
penalised) cannot beat the worst of them; a done group's beams count as ``pad_token_id`` in the
later groups' penalty; at the length limit the running beams of groups not done are added as
hypotheses; final hypotheses of all groups are ranked together by score, ties to the later group.

The constraint is the compiled :class:`~raydpo.generation.trie.TitleTrie`: each beam carries a
trie state, the allowed-token mask of all beams comes from a few batched tensor operations per
step, and per-row exclusions (history items, the ground truth) are part of the mask.

Speed (see :mod:`.shared_attention`): the prompt runs once per prompt (a prefix common to the
batch once), decode steps attend to the prompt's keys and values stored once per prompt, the
candidates of a step are the trie's allowed edges rather than the masked vocabulary, and a
prompt whose search is over leaves the batch.

``TrieLogitsProcessor`` applies the same constraint inside ``model.generate`` (used for
sampling); it recovers each row's state from its parent row of the previous step.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast

from .beam_cache import BeamCache
from .shared_attention import (
    SharedPromptCache,
    left_padded_positions,
    prefill,
    shared_prompt_attention,
    supports_shared_prompt,
)
from .trie import OFF, TitleTrie

NEG = -1.0e9


@dataclass
class BeamOutput:
    sequences: torch.Tensor  # [B, n, L] generated tokens (pad after EOS)
    scores: torch.Tensor  # [B, n] length-normalised beam scores (sum logprob / len**lp)
    logprobs: torch.Tensor  # [B, n] summed token log-probabilities under the model (no penalties)
    items: torch.Tensor  # [B, n] item ids (-1 if unconstrained or unfinished)


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    trie: TitleTrie | None,
    num_beams: int,
    num_return_sequences: int,
    num_groups: int = 1,
    diversity_penalty: float = 0.0,
    length_penalty: float = 1.0,
    max_new_tokens: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    exclusions: Sequence[Sequence[int]] | None = None,
    shared_prefill: bool = True,
    shared_attention: bool | None = None,
) -> BeamOutput:
    """Constrained (group) beam search over a left-padded batch of prompts.

    ``shared_prefill`` runs the prompt once per prompt instead of once per beam (as
    transformers does): ``num_beams`` times less prompt work. The decode steps then use
    ``shared_attention`` (default: where the model supports it): the prompt's keys and values
    stay stored once per prompt and all its beams attend to them with one matrix product
    (:mod:`.shared_attention`); otherwise a :class:`BeamCache` repeats them per beam but writes
    in place and never copies the prompt again.
    """
    if num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be divisible by num_groups ({num_groups})")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) > num_beams ({num_beams})")
    eos = eos_token_id if eos_token_id is not None else (trie.eos_token_id if trie else None)
    if eos is None:
        raise ValueError("beam search needs an EOS token id")
    pad = pad_token_id if pad_token_id is not None else eos
    if max_new_tokens is None:
        if trie is None:
            raise ValueError("max_new_tokens is required without a trie")
        max_new_tokens = trie.max_depth
    dev = input_ids.device
    b, nb, g = input_ids.shape[0], num_beams, num_groups
    gs = nb // g
    keep = 2 * gs  # HF: max(2, 1 + n_eos) * beams per group

    mask = attention_mask.repeat_interleave(nb, dim=0)
    pos = left_padded_positions(mask)
    rows = torch.arange(b, device=dev).repeat_interleave(nb)  # prompt of each flat beam
    ex = trie.exclusion_index(exclusions) if (trie is not None and exclusions is not None) else None

    run_seq = torch.full((b, nb, max_new_tokens), pad, dtype=torch.long, device=dev)
    run_score = torch.zeros((b, nb), device=dev)
    run_score.view(b, g, gs)[:, :, 1:] = NEG
    run_raw = torch.zeros((b, nb), device=dev)  # true summed log-probs (no penalties)
    run_state = torch.zeros((b, nb), dtype=torch.long, device=dev)
    fin_seq = run_seq.clone().view(b, g, gs, max_new_tokens)
    fin_score = torch.full((b, g, gs), NEG, device=dev)
    fin_raw = torch.zeros((b, g, gs), device=dev)
    fin_valid = torch.zeros((b, g, gs), dtype=torch.bool, device=dev)
    fin_done = torch.zeros((b, g, gs), dtype=torch.bool, device=dev)
    unsatisfied = torch.ones((b, g), dtype=torch.bool, device=dev)
    top_mask = torch.cat([torch.ones(gs, dtype=torch.bool), torch.zeros(keep - gs, dtype=torch.bool)]).to(dev)
    gofs = (torch.arange(g, device=dev) * gs).view(1, g, 1)
    n_prompts, act = b, torch.arange(b, device=dev)  # prompts still searching (they shrink the batch)
    out_fin = _Finished(fin_seq, fin_score, fin_raw, fin_valid, fin_done)
    grouped = g > 1  # transformers 4's group beam search (BeamSearchScorer), else transformers 5's beam search

    if shared_attention is None:
        shared_attention = shared_prefill and supports_shared_prompt(model)
    if shared_attention and not shared_prefill:
        raise ValueError("shared_attention needs shared_prefill")
    step_kwargs = {}
    if shared_attention:
        # one pass per prompt (a prefix common to all prompts once), the cache keeps it once
        logits, prompt_cache, prompt_mask = prefill(model, input_ids, attention_mask)
        out = CausalLMOutputWithPast(logits=logits.repeat_interleave(nb, dim=0))
        cache = SharedPromptCache(prompt_cache, prompt_mask, nb, max_new_tokens)
        step_kwargs["shared_prompt"] = cache
    elif shared_prefill:
        # one forward pass per prompt, then the cache and logits are copied to every beam
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                    position_ids=left_padded_positions(attention_mask))
        cache = BeamCache(out.cache, nb, max_new_tokens)
        out.logits = out.logits.repeat_interleave(nb, dim=0)
    else:
        out = model(input_ids=input_ids.repeat_interleave(nb, dim=0), attention_mask=mask, position_ids=pos,
                    use_cache=True, logits_to_keep=1)
        cache = out.cache
    with shared_prompt_attention(model) if shared_attention else nullcontext():
        for t in range(max_new_tokens):
            logits = out.logits[:, -1, :].float()
            vocab = logits.shape[-1]
            if trie is not None:
                cands = _SparseCandidates(logits, trie, run_state.view(-1), rows, ex, eos, b, g, gs, keep,
                                          run_score, run_raw, dense_fill=grouped)
            else:
                cands = _DenseCandidates(logits, b, g, gs, keep, run_score, run_raw)
            hits_all = []
            new_tok = torch.empty((b, g, gs), dtype=torch.long, device=dev)
            new_src = torch.empty((b, g, gs), dtype=torch.long, device=dev)
            new_score = torch.empty((b, g, gs), device=dev)
            new_raw = torch.empty((b, g, gs), device=dev)
            # tokens chosen at this step by earlier groups (the Hamming penalty): diverse search only
            used = torch.zeros((b, vocab), device=dev) if g > 1 and diversity_penalty else None
            last = t + 1 >= max_new_tokens
            done_before = ~unsatisfied  # groups done at an earlier step
            for gi in range(g):
                top_lp, tok, src, raw = cands.top(gi, used if gi else None, diversity_penalty)
                # one group: at the length limit every top candidate is a hypothesis (transformers 5);
                # groups: only EOS here, the running beams are added after the done check (transformers 4)
                hits = (tok == eos) | (last and not grouped)
                hits_all.append(hits)
                # running beams for the next step: the best non-finished continuations
                if grouped:  # BeamSearchScorer.process: the first gs non-EOS candidates in rank order
                    nxt = torch.sort(hits.to(torch.uint8), dim=1, stable=True).indices[:, :gs]
                else:
                    nxt = torch.topk(top_lp + hits.float() * NEG, gs).indices
                new_tok[:, gi] = tok.gather(1, nxt)
                new_src[:, gi] = src.gather(1, nxt)
                new_score[:, gi] = (top_lp + hits.float() * NEG).gather(1, nxt)
                new_raw[:, gi] = raw.gather(1, nxt)
                if used is not None:
                    # transformers 4 pads a done group's beams: later groups see pad_token_id
                    done_g = done_before[:, gi, None]
                    seen = torch.where(done_g, torch.full_like(new_tok[:, gi], pad), new_tok[:, gi])
                    weight = (done_g | ~hits.gather(1, nxt)).float()
                    used.scatter_add_(1, seen, weight)
                # finished hypotheses: merge the newly finished top-gs candidates
                just = hits & top_mask[None, :]
                cand = _normalise(top_lp, t + 1, length_penalty, grouped)
                cand = cand + (~unsatisfied[:, gi, None]).float() * NEG + (~just).float() * NEG
                cand_seq = run_seq.view(b, g, gs, -1)[:, gi].gather(
                    1, src[:, :, None].expand(-1, -1, max_new_tokens)).clone()
                cand_seq[:, :, t] = tok
                m_score = torch.cat([fin_score[:, gi], cand], 1)
                m_seq = torch.cat([fin_seq[:, gi], cand_seq], 1)
                m_raw = torch.cat([fin_raw[:, gi], raw], 1)
                # a candidate that extends a finished beam kept running for lack of valid ones
                # carries the -1e9 offset: it is bookkept like transformers does but never returned
                m_valid = torch.cat([fin_valid[:, gi], top_lp > NEG / 2], 1)
                m_done = torch.cat([fin_done[:, gi], just], 1)
                best = torch.topk(m_score, gs).indices
                fin_score[:, gi] = m_score.gather(1, best)
                fin_seq[:, gi] = m_seq.gather(1, best[:, :, None].expand(-1, -1, max_new_tokens))
                fin_raw[:, gi] = m_raw.gather(1, best)
                fin_valid[:, gi] = m_valid.gather(1, best)
                fin_done[:, gi] = m_done.gather(1, best)
                if grouped:
                    # BeamHypotheses.is_done: full, and the best candidate of this step (max of the
                    # penalised top-k, finished or not) cannot beat the worst finished hypothesis
                    best_now = _normalise(top_lp[:, 0], t + 1, length_penalty, True)
                    worst = fin_score[:, gi].min(dim=1).values
                    unsatisfied[:, gi] &= ~(fin_done[:, gi].all(dim=1) & (worst >= best_now))
                    if last:  # BeamSearchScorer.finalize: the running beams of a group not done
                        _finalize_group(gi, unsatisfied[:, gi], new_score[:, gi], new_raw[:, gi], new_tok[:, gi],
                                        new_src[:, gi], run_seq.view(b, g, gs, -1)[:, gi], t, length_penalty,
                                        fin_seq, fin_score, fin_raw, fin_valid, fin_done)
            # reorder beams: global source index of each new running beam
            src_flat = (new_src + gofs).view(b, nb)
            beam_idx = (src_flat + torch.arange(b, device=dev)[:, None] * nb).view(-1)
            run_seq = run_seq.gather(1, src_flat[:, :, None].expand(-1, -1, max_new_tokens)).clone()
            tok_flat = new_tok.view(b, nb)
            run_seq[:, :, t] = tok_flat
            run_score = new_score.view(b, nb)
            run_raw = new_raw.view(b, nb)
            if trie is not None:
                run_state = trie.step(run_state.gather(1, src_flat).view(-1), tok_flat.view(-1)).view(b, nb)
            cur = t + 1
            if not grouped:  # transformers 5: the best running beam against the worst finished one
                best_run = run_score.view(b, g, gs)[:, :, :1] / (cur ** length_penalty)
                worst = torch.where(fin_done, fin_score.min(dim=2, keepdim=True).values,
                                    torch.full_like(fin_score, NEG))
                unsatisfied = unsatisfied & (best_run > worst).any(dim=2)
            all_hit = torch.stack(hits_all, 1).all()
            if not bool(unsatisfied.any()) or bool(all_hit) or cur >= max_new_tokens:
                break
            live = unsatisfied.any(1)
            if shared_attention and not bool(live.all()):
                # drop the prompts whose search is over: all their finished slots hold real
                # hypotheses that nothing later can displace, so they leave the batch and later
                # steps compute only live beams. (``all_hit`` then looks at live prompts only,
                # which can end the loop earlier; that only changes never-returned filler.)
                kept = live.nonzero().squeeze(1)
                out_fin.flush(act, (~live).nonzero().squeeze(1), fin_seq, fin_score, fin_raw, fin_valid, fin_done)
                act, b = act[kept], kept.numel()
                run_seq, run_score, run_raw, run_state = run_seq[kept], run_score[kept], run_raw[kept], run_state[kept]
                fin_seq, fin_score, fin_raw = fin_seq[kept], fin_score[kept], fin_raw[kept]
                fin_valid, fin_done, unsatisfied = fin_valid[kept], fin_done[kept], unsatisfied[kept]
                tok_flat, src_flat = tok_flat[kept], src_flat[kept]
                beam_idx = (src_flat + torch.arange(b, device=dev)[:, None] * nb).view(-1)
                pos = pos.view(-1, nb, 1)[kept].view(-1, 1)
                rows = act.repeat_interleave(nb)
                cache.select_prompts(kept)
            cache.reorder_cache(beam_idx)
            pos = pos[:, -1:] + 1
            if shared_attention:  # the prompt mask lives in the cache
                try:
                    out = model(input_ids=tok_flat.view(-1, 1), position_ids=pos, cache=cache, use_cache=True,
                                **step_kwargs)
                except Exception as e:  # a layer that bypassed the kernel gets slot-shaped keys
                    if cache.calls < len(cache.layers):
                        raise _bypassed(model, cache) from e
                    raise
                if cache.calls != len(cache.layers):
                    raise _bypassed(model, cache)
                cache.calls = 0
            else:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
                out = model(input_ids=tok_flat.view(-1, 1), attention_mask=mask, position_ids=pos,
                            cache=cache, use_cache=True)

    out_fin.flush(act, torch.arange(b, device=dev), fin_seq, fin_score, fin_raw, fin_valid, fin_done)
    fin_seq, fin_score, fin_raw, fin_valid, fin_done = out_fin.tensors
    b = n_prompts
    score = fin_score.view(b, nb)
    if grouped:  # transformers 4: sorted(all groups' hypotheses).pop(), so ties go to the later group
        flipped = torch.sort(score.flip(1), dim=1, descending=True, stable=True).indices
        order = nb - 1 - flipped[:, :num_return_sequences]
    else:
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :num_return_sequences]
    seqs = fin_seq.view(b, nb, max_new_tokens).gather(1, order[:, :, None].expand(-1, -1, max_new_tokens))
    seqs = _pad_after_eos(seqs, eos, pad)
    items = _items(trie, seqs) if trie is not None else torch.full(order.shape, -1, dtype=torch.long)
    valid = fin_valid.view(b, nb).gather(1, order) & fin_done.view(b, nb).gather(1, order)
    items = torch.where(valid, items, torch.full_like(items, -1))
    return BeamOutput(seqs, score.gather(1, order), fin_raw.view(b, nb).gather(1, order), items)


def _normalise(score: torch.Tensor, length: int, length_penalty: float, as_python: bool) -> torch.Tensor:
    """``score / length ** length_penalty``; ``as_python``: in float64, as transformers 4's
    ``BeamHypotheses`` divides Python floats (the result is stored in float32 all the same)."""
    if as_python:
        return (score.double() / (length ** length_penalty)).float()
    return score / (length ** length_penalty)


def _finalize_group(gi, open_, score, raw, tok, src, seq, t, length_penalty, fin_seq, fin_score, fin_raw, fin_valid,
                    fin_done) -> None:
    """Merge group ``gi``'s running beams (``[b, gs]``, score-sorted) into its finished hypotheses
    for the prompts where the group is still ``open_`` (transformers 4's ``finalize``)."""
    length = seq.shape[-1]
    cand = _normalise(score, t + 1, length_penalty, True) + (~open_[:, None]).float() * NEG
    cand_seq = seq.gather(1, src[:, :, None].expand(-1, -1, length)).clone()
    cand_seq[:, :, t] = tok
    m_score = torch.cat([fin_score[:, gi], cand], 1)
    m_seq = torch.cat([fin_seq[:, gi], cand_seq], 1)
    m_raw = torch.cat([fin_raw[:, gi], raw], 1)
    m_valid = torch.cat([fin_valid[:, gi], score > NEG / 2], 1)
    m_done = torch.cat([fin_done[:, gi], open_[:, None].expand_as(score)], 1)
    best = torch.topk(m_score, fin_score.shape[2]).indices
    fin_score[:, gi] = m_score.gather(1, best)
    fin_seq[:, gi] = m_seq.gather(1, best[:, :, None].expand(-1, -1, length))
    fin_raw[:, gi] = m_raw.gather(1, best)
    fin_valid[:, gi] = m_valid.gather(1, best)
    fin_done[:, gi] = m_done.gather(1, best)


def _bypassed(model, cache: SharedPromptCache) -> RuntimeError:
    return RuntimeError(f"{type(model).__name__}: only {cache.calls} of {len(cache.layers)} attention layers used "
                        "shared-prompt attention; pass shared_attention=False")


class _Finished:
    """The finished hypotheses of every prompt, filled as prompts leave the batch."""

    def __init__(self, *like: torch.Tensor) -> None:
        self.tensors = [t.clone() for t in like]

    def flush(self, act: torch.Tensor, local: torch.Tensor, *fin: torch.Tensor) -> None:
        for dst, src in zip(self.tensors, fin):
            dst[act[local]] = src[local]


class _DenseCandidates:
    """Continuations over the whole vocabulary (unconstrained beam search)."""

    def __init__(self, logits, b, g, gs, keep, run_score, run_raw) -> None:
        self.vocab = logits.shape[-1]
        self.logp = torch.log_softmax(logits, dim=-1).view(b, g, gs, self.vocab)
        self.b, self.gs, self.keep = b, gs, keep
        self.run_score, self.run_raw = run_score.view(b, g, gs), run_raw.view(b, g, gs)

    def top(self, gi: int, used: torch.Tensor | None, penalty: float):
        """Top ``keep`` (score, token, source beam, true log-prob sum) of group ``gi`` per prompt."""
        b, gs, vocab = self.b, self.gs, self.vocab
        lp = self.logp[:, gi]
        if used is not None:
            lp = lp - penalty * used[:, None, :]
        acc = (lp + self.run_score[:, gi, :, None]).reshape(b, gs * vocab)
        top_lp, top_idx = torch.topk(acc, self.keep)
        src, tok = top_idx // vocab, top_idx % vocab
        raw = self.logp[:, gi].reshape(b, gs * vocab).gather(1, top_idx) + self.run_raw[:, gi].gather(1, src)
        return top_lp, tok, src, raw


class _SparseCandidates:
    """Continuations along the trie's allowed edges only.

    The log-softmax normaliser needs the whole vocabulary (one ``logsumexp`` per beam), but the
    candidates are only the allowed edges: a few per beam, instead of the vocabulary masked to
    ``-inf``. Edges are laid out per (prompt, group) in beam-then-token order, the order of the
    dense ``[beams * vocab]`` layout, padded with ``-inf`` to at least ``keep`` entries.
    """

    def __init__(self, logits, trie, states, rows, ex, eos, b, g, gs, keep, run_score, run_raw,
                 dense_fill: bool = False) -> None:
        dev = logits.device
        e_beam, e_tok = trie.allowed_edges(states, logits.shape[-1], rows=rows, exclusions=ex, done_token_id=eos)
        # log_softmax over the vocabulary, as transformers (logits - logsumexp can differ in the last bit)
        e_lp = torch.log_softmax(logits, dim=-1)[e_beam, e_tok]
        pg = e_beam // gs  # (prompt, group) of each edge: beams are prompt-major, then group
        counts = torch.bincount(pg, minlength=b * g)
        slot = torch.arange(len(pg), device=dev) - (counts.cumsum(0) - counts)[pg]
        width = max(int(counts.max()) if len(counts) else 0, keep)
        self.lp = torch.full((b * g, width), float("-inf"), device=dev)
        self.lp[pg, slot] = e_lp
        self.base = torch.full((b * g, width), float("-inf"), device=dev)
        self.base[pg, slot] = run_score.view(-1)[e_beam]
        self.raw = torch.full((b * g, width), float("-inf"), device=dev)
        self.raw[pg, slot] = e_lp + run_raw.view(-1)[e_beam]
        self.tok = torch.full((b * g, width), eos, dtype=torch.long, device=dev)
        self.tok[pg, slot] = e_tok
        self.src = torch.zeros((b * g, width), dtype=torch.long, device=dev)
        self.src[pg, slot] = e_beam % gs
        self.b, self.g, self.gs, self.keep = b, g, gs, keep
        for name in ("lp", "base", "raw", "tok", "src"):
            setattr(self, name, getattr(self, name).view(b, g, width))
        self.dense_fill = dense_fill
        if dense_fill:
            self.logits, self.trie, self.states, self.rows, self.ex, self.eos = logits, trie, states, rows, ex, eos
            self.run_score, self.run_raw = run_score.view(-1), run_raw.view(-1)

    def top(self, gi: int, used: torch.Tensor | None, penalty: float):
        lp = self.lp[:, gi]
        if used is not None:  # transformers 4's order: (log-prob - penalty) + beam score
            lp = lp - penalty * used.gather(1, self.tok[:, gi])
        acc = lp + self.base[:, gi]
        top_lp, pos = torch.topk(acc, self.keep)
        out = [top_lp, self.tok[:, gi].gather(1, pos), self.src[:, gi].gather(1, pos), self.raw[:, gi].gather(1, pos)]
        if self.dense_fill:
            short = (top_lp[:, -1] == float("-inf")).nonzero().squeeze(1)
            if len(short):
                for o, d in zip(out, self._dense_top(short, gi, used, penalty)):
                    o[short] = d
        return tuple(out)

    def _dense_top(self, prompts: torch.Tensor, gi: int, used: torch.Tensor | None, penalty: float):
        """Top ``keep`` of group ``gi`` over the masked vocabulary (``-inf`` where disallowed), as
        transformers 4 computes it, for prompts with fewer than ``keep`` allowed continuations:
        its top-k then also returns disallowed tokens at ``-inf`` (which ones is decided by
        ``torch.topk`` among equal values), and these become running beams whose tokens count
        in later groups' diversity penalty. Only these rows pay for the vocabulary."""
        gs, vocab = self.gs, self.logits.shape[-1]
        beams = ((prompts * self.g + gi)[:, None] * gs + torch.arange(gs, device=prompts.device)).view(-1)
        logp = torch.log_softmax(self.logits[beams], dim=-1)
        allowed = self.trie.allowed_mask(self.states[beams], vocab, rows=self.rows[beams], exclusions=self.ex,
                                         done_token_id=self.eos)
        scores = logp.masked_fill(~allowed, float("-inf"))
        if used is not None:
            scores = scores - penalty * used[prompts].repeat_interleave(gs, dim=0)
        scores = (scores + self.run_score[beams][:, None]).view(len(prompts), gs * vocab)
        top_lp, idx = torch.topk(scores, self.keep, dim=1, largest=True, sorted=True)
        src, tok = idx // vocab, idx % vocab
        raw = (logp.view(len(prompts), gs * vocab).gather(1, idx)
               + self.run_raw[beams].view(len(prompts), gs).gather(1, src))
        return top_lp, tok, src, raw


def _pad_after_eos(seqs: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    after = (seqs == eos).long().cumsum(-1) - (seqs == eos).long()
    return seqs.masked_fill(after > 0, pad)


def _items(trie: TitleTrie, seqs: torch.Tensor) -> torch.Tensor:
    b, n, length = seqs.shape
    state = trie.root_states(b * n)
    flat = seqs.reshape(b * n, length)
    done = torch.zeros(b * n, dtype=torch.bool, device=seqs.device)
    for t in range(length):
        nxt = trie.step(state, flat[:, t])
        state = torch.where(done, state, nxt)
        done |= (flat[:, t] == trie.eos_token_id) | (state == OFF)
    leaf = trie.leaf_item[state.clamp(min=0)]
    return torch.where(state >= 0, leaf, torch.full_like(leaf, -1)).view(b, n)


class TrieLogitsProcessor(LogitsProcessor):
    """The trie constraint inside ``model.generate`` (sampling, greedy, or HF beam search).

    Rows are ``prompt * rows_per_prompt + r``. A row's state follows from its parent: the row of
    the previous step (same prompt) whose tokens equal this row's tokens minus the last one.
    """

    def __init__(self, trie: TitleTrie, batch_size: int, exclusions: Sequence[Sequence[int]] | None = None,
                 done_token_id: int | None = None) -> None:
        self.trie = trie
        self.batch_size = batch_size
        self.ex = trie.exclusion_index(exclusions) if exclusions is not None else None
        self.done = done_token_id if done_token_id is not None else trie.eos_token_id
        self.prompt_len: int | None = None
        self.prev: torch.Tensor | None = None
        self.states: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n_rows = input_ids.shape[0]
        per = n_rows // self.batch_size
        rows = torch.arange(self.batch_size, device=input_ids.device).repeat_interleave(per)
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
            states = self.trie.root_states(n_rows).to(input_ids.device)
        else:
            gen = input_ids[:, self.prompt_len:]
            length = gen.shape[1] - 1
            if length == 0:
                parent = torch.arange(n_rows, device=input_ids.device)
            else:
                cur = gen[:, :-1].reshape(self.batch_size, per, 1, length)
                prev = self.prev.reshape(self.batch_size, 1, per, length)
                local = (cur == prev).all(-1).int().argmax(-1)  # [B, per]
                parent = (local + torch.arange(self.batch_size, device=input_ids.device)[:, None] * per).view(-1)
            states = self.trie.step(self.states[parent], gen[:, -1])
        self.prev = input_ids[:, self.prompt_len:].clone()
        self.states = states
        allowed = self.trie.allowed_mask(states, scores.shape[1], rows=rows, exclusions=self.ex,
                                         done_token_id=self.done)
        return scores.masked_fill(~allowed, float("-inf"))
