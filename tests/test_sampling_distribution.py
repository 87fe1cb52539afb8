"""Top-k and top-p sampling draw from the exact truncated distribution.

The exact distribution over catalog items is enumerated over the title trie: at every trie node
the model's next-token distribution is restricted to the allowed tokens, tempered, cut to the
top k, cut to the smallest top set of mass >= top_p (transformers' order: constraint,
temperature, top-k, top-p) and renormalised; an item's probability is the product along its
path. Many seeded draws of raydpo's sampler must match it in total-variation distance."""

import copy

import numpy as np
import pytest
import torch

from raydpo.generation.candidates import CandidateGenerator, DecodeConfig
from raydpo.prompt import render_prompt

pytestmark = pytest.mark.slow  # 3000 draws per setting


def _truncated(logits: torch.Tensor, allowed: list[int], temperature: float, top_k: int, top_p: float) -> dict:
    """Probabilities of the ``allowed`` tokens after temperature, top-k and top-p, by hand."""
    vals = np.array([float(logits[t]) / temperature for t in allowed])
    order = np.argsort(-vals, kind="stable")
    kth = vals[order[min(top_k, len(vals)) - 1]]
    keep = vals >= kth  # ties at the k-th value stay, as transformers' TopKLogitsWarper
    p = np.where(keep, np.exp(vals - vals.max()), 0.0)
    p /= p.sum()
    # top-p: drop the low tail whose cumulative mass (from the bottom) is <= 1 - top_p
    asc = np.argsort(p, kind="stable")
    cum = np.cumsum(p[asc])
    drop = cum <= 1 - top_p
    drop[-1] = False
    p[asc[drop]] = 0.0
    p /= p.sum()
    return {t: q for t, q in zip(allowed, p) if q > 0}


def _exact(model, trie, prompt_ids: list[int], temperature, top_k, top_p, n_items) -> np.ndarray:
    out = np.zeros(n_items)
    level = [(0, [], 1.0)]  # (trie node, path tokens, probability)
    ptr, etok, echild = trie.node_ptr.tolist(), trie.edge_tok.tolist(), trie.edge_child.tolist()
    while level:
        ids = torch.tensor([prompt_ids + path for _, path, _ in level])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :].float()
        nxt = []
        for (node, path, prob), lg in zip(level, logits):
            edges = {etok[e]: echild[e] for e in range(ptr[node], ptr[node + 1])}
            for tok, q in _truncated(lg, sorted(edges), temperature, top_k, top_p).items():
                child = edges[tok]
                if tok == trie.eos_token_id:
                    out[int(trie.leaf_item[child])] += prob * q
                else:
                    nxt.append((child, path + [tok], prob * q))
        level = nxt
    return out


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (50, 0.6, 1.0), (4, 0.8, 0.7)])
def test_top_k_top_p_sampling_matches_the_truncated_distribution(synthetic_small, tiny_model, top_k, top_p,
                                                                  temperature):
    ds, _ = synthetic_small
    model, tok = tiny_model
    model = copy.deepcopy(model).float().eval()  # fp32: the enumeration and the sampler see one model
    history = list(ds.split("test").frame["history_titles"].iloc[0])
    prompt = render_prompt(tok, history, ds.instruction)
    cfg = DecodeConfig(mode="sample", num_return_sequences=500, top_k=top_k, top_p=top_p,
                       temperature=temperature, exclude_history=False, exclude_target=False, seed=7)
    gen = CandidateGenerator(model, tok, ds.catalog, cfg, instruction=ds.instruction)
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    exact = _exact(model, gen.trie, enc.input_ids[0].tolist(), temperature, top_k, top_p, len(ds.catalog))
    assert exact.sum() == pytest.approx(1.0)
    draws = np.concatenate([gen._sample(enc.input_ids, enc.attention_mask, None)[0].view(-1).numpy()
                            for _ in range(6)])
    assert (draws >= 0).all()
    freq = np.bincount(draws, minlength=len(ds.catalog)) / len(draws)
    tv = 0.5 * np.abs(freq - exact).sum()
    # with 3000 draws over the truncated support the sampling error is ~0.02-0.04
    assert tv < 0.06, f"TV distance {tv:.4f} between draws and the exact truncated distribution"
    # the check can fail: every draw lies in the truncated support, and the untruncated
    # distribution is measurably farther from the draws
    assert exact[draws].min() > 0
    full = _exact(model, gen.trie, enc.input_ids[0].tolist(), temperature, 10**9, 1.0, len(ds.catalog))
    assert 0.5 * np.abs(full - exact).sum() > 0.1
    assert 0.5 * np.abs(freq - full).sum() > tv + 0.05
