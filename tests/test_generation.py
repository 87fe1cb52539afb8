"""Trie-constrained decoding: exactness against transformers, constraints, exclusions, bad input."""

import random

import pytest
import torch

from raydpo.data import DataError
from raydpo.errors import RaydpoError
from raydpo.generation.candidates import CandidateGenerator, DecodeConfig
from raydpo.generation.decoding import TrieLogitsProcessor, beam_search
from raydpo.generation.trie import TitleTrie
from raydpo.prompt import encode_response, render_prompt


@pytest.fixture(scope="module")
def setup(synthetic_small, tiny_model):
    ds, _ = synthetic_small
    model, tok = tiny_model
    trie = TitleTrie.from_titles(tok, ds.catalog.titles)
    return ds, model, tok, trie


def _py_trie(tok, titles):
    root = {}
    for t in titles:
        node = root
        for x in encode_response(tok, t):
            node = node.setdefault(x, {})
    return root


def _batch(tok, ds, n, split="test"):
    frame = ds.split(split).frame.iloc[:n]
    prompts = [render_prompt(tok, list(h), ds.instruction) for h in frame["history_titles"]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return frame, enc


def test_every_trie_path_is_a_quoted_title_with_eos(setup):
    ds, _, tok, trie = setup
    for item in random.Random(0).sample(range(len(ds.catalog)), 40):
        seq = encode_response(tok, ds.catalog.titles[item])
        assert seq[-1] == tok.eos_token_id
        assert tok.decode(seq[:-1]) == f'"{ds.catalog.titles[item]}"'
        assert trie.walk([seq]) == [item]
    assert trie.walk([encode_response(tok, "Not A Title At All")[:3] + [tok.eos_token_id]]) == [-1]


def test_allowed_mask_equals_python_trie_walk(setup):
    ds, _, tok, trie = setup
    root = _py_trie(tok, ds.catalog.titles)
    rng = random.Random(1)
    vocab = len(tok)
    for _ in range(30):
        item = rng.randrange(len(ds.catalog))
        seq = encode_response(tok, ds.catalog.titles[item])
        cut = rng.randrange(len(seq))
        node, state = root, torch.tensor([0])
        for x in seq[:cut]:
            node = node[x]
            state = trie.step(state, torch.tensor([x]))
        mask = trie.allowed_mask(state, vocab)[0]
        assert set(mask.nonzero().flatten().tolist()) == set(node)


def test_exclusions_remove_exactly_the_excluded_items(setup):
    ds, model, tok, trie = setup
    frame, enc = _batch(tok, ds, 4)
    base = beam_search(model, enc.input_ids, enc.attention_mask, trie, 8, 8)
    excluded = [list(map(int, row[:4])) for row in base.items.tolist()]
    out = beam_search(model, enc.input_ids, enc.attention_mask, trie, 8, 8, exclusions=excluded)
    for row, ex in zip(out.items.tolist(), excluded):
        assert not set(row) & set(ex)
        assert all(i >= 0 for i in row)
    # items sharing a prefix with an excluded title stay reachable (mask is per item, not per prefix)
    mask_ex = trie.allowed_mask(trie.root_states(1), len(tok), rows=torch.tensor([0]),
                                exclusions=trie.exclusion_index([[excluded[0][0]]]))
    mask = trie.allowed_mask(trie.root_states(1), len(tok))
    assert torch.equal(mask_ex, mask)  # the opening quote is shared by every title


def _trim(seqs, eos):
    out = []
    for row in seqs.tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@pytest.mark.parametrize("num_beams,num_return", [(4, 4), (10, 5)])
@pytest.mark.parametrize("shared_prefill", [True, False])
def test_beam_search_equals_transformers_with_prefix_allowed_tokens_fn(setup, num_beams, num_return, shared_prefill):
    ds, model, tok, trie = setup
    frame, enc = _batch(tok, ds, 5)
    root = _py_trie(tok, ds.catalog.titles)
    plen = enc.input_ids.shape[1]

    def prefix_fn(batch_id, ids):  # the reference: walk a Python trie per beam per step
        node = root
        for x in ids[plen:].tolist():
            node = node.get(x)
            if not node:
                return [tok.eos_token_id]
        return list(node)

    hf = model.generate(**enc, num_beams=num_beams, num_return_sequences=num_return, do_sample=False,
                        max_new_tokens=trie.max_depth, prefix_allowed_tokens_fn=prefix_fn, output_scores=True,
                        return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    ours = beam_search(model, enc.input_ids, enc.attention_mask, trie, num_beams, num_return,
                       shared_prefill=shared_prefill)
    hf_seqs = _trim(hf.sequences[:, plen:], tok.eos_token_id)
    our_seqs = _trim(ours.sequences.reshape(-1, ours.sequences.shape[-1]), tok.eos_token_id)
    assert hf_seqs == our_seqs
    assert torch.allclose(hf.sequences_scores.view(-1, num_return), ours.scores, atol=1e-5)
    assert all(i >= 0 for i in ours.items.flatten().tolist())
    # the vectorised processor inside transformers' own beam search gives the same beams
    proc = TrieLogitsProcessor(trie, enc.input_ids.shape[0])
    hf2 = model.generate(**enc, num_beams=num_beams, num_return_sequences=num_return, do_sample=False,
                         max_new_tokens=trie.max_depth, logits_processor=[proc], pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    assert torch.equal(hf2, hf.sequences)


def test_diverse_beam_search(setup):
    ds, model, tok, trie = setup
    frame, enc = _batch(tok, ds, 6)
    plain = beam_search(model, enc.input_ids, enc.attention_mask, trie, 10, 10)
    one_group = beam_search(model, enc.input_ids, enc.attention_mask, trie, 10, 10, num_groups=1,
                            diversity_penalty=3.0)
    assert torch.equal(plain.sequences, one_group.sequences)  # one group: the penalty never applies
    grouped = beam_search(model, enc.input_ids, enc.attention_mask, trie, 20, 10, num_groups=10)
    diverse = beam_search(model, enc.input_ids, enc.attention_mask, trie, 20, 10, num_groups=10,
                          diversity_penalty=5.0)
    assert all(i >= 0 for i in diverse.items.flatten().tolist())

    def distinct_first_tokens(out):
        return sum(len(set(out.sequences[b, :, 1].tolist())) for b in range(out.sequences.shape[0]))

    assert distinct_first_tokens(diverse) > distinct_first_tokens(grouped)
    # returned in score order
    assert (diverse.scores[:, :-1] >= diverse.scores[:, 1:]).all()


def test_allowed_edges_are_the_allowed_mask_in_order(setup):
    ds, _, tok, trie = setup
    rng = random.Random(3)
    states = [0, -1]  # the root and a state that fell off the trie
    for _ in range(40):
        seq = encode_response(tok, ds.catalog.titles[rng.randrange(len(ds.catalog))])
        states.append(int(trie.step(torch.tensor([0]), torch.tensor([seq[0]]))[0]) if rng.random() < 0.3 else
                      _state_after(trie, seq[: rng.randrange(len(seq) + 1)]))
    states = torch.tensor(states)
    rows = torch.arange(len(states)) % 4
    ex = trie.exclusion_index([[1, 2, 3], [], [rng.randrange(len(ds.catalog)) for _ in range(50)], [0]])
    beam, tok_ids = trie.allowed_edges(states, len(tok), rows=rows, exclusions=ex, done_token_id=tok.eos_token_id)
    mask = trie.allowed_mask(states, len(tok), rows=rows, exclusions=ex, done_token_id=tok.eos_token_id)
    assert torch.equal(torch.stack([beam, tok_ids], 1), mask.nonzero())  # same pairs, beam-then-token order
    assert mask[1].nonzero().flatten().tolist() == [tok.eos_token_id]  # off the trie: only EOS


def _state_after(trie, tokens):
    state = trie.root_states(1)
    for x in tokens:
        state = trie.step(state, torch.tensor([x]))
    return int(state[0])


def test_shared_prefix_prefill_equals_the_plain_prompt_pass(setup):
    from raydpo.generation.shared_attention import common_prefix_length, prefill

    ds, model, tok, _ = setup
    _, enc = _batch(tok, ds, 7)
    ids, mask = enc.input_ids, enc.attention_mask
    shared = common_prefix_length(ids, mask)
    assert 16 <= shared < int(mask.sum(1).min())
    rows = [ids[i, mask[i].bool()].tolist() for i in range(len(ids))]
    assert all(r[:shared] == rows[0][:shared] for r in rows)
    assert len({r[shared] for r in rows}) > 1 or len({len(r) for r in rows}) > 1
    plain_logits, plain_cache, plain_mask = prefill(model, ids, mask, min_shared=10**9)
    logits, cache, cmask = prefill(model, ids, mask)
    assert torch.equal(plain_mask, mask) and cmask.shape[1] == shared + int(mask.sum(1).max()) - shared
    assert torch.allclose(logits, plain_logits, atol=1e-4)
    for a, b in zip(cache.layers, plain_cache.layers):  # the same keys at the real positions
        assert torch.allclose(a.keys[cmask.bool()[:, None, :, None].expand_as(a.keys)].view(-1),
                              b.keys[mask.bool()[:, None, :, None].expand_as(b.keys)].view(-1), atol=1e-4)
    assert common_prefix_length(ids[:1], mask[:1]) == 0  # a single prompt has nothing to share


@pytest.mark.parametrize("num_beams,groups,penalty", [(8, 1, 0.0), (12, 4, 1.0)])
def test_shared_attention_equals_the_per_beam_cache(setup, num_beams, groups, penalty, monkeypatch):
    """Prompt-shared attention, the shared prefix and prompts leaving the batch change nothing."""
    from raydpo.generation import shared_attention

    ds, model, tok, trie = setup
    frame, enc = _batch(tok, ds, 8)
    # odd prompts may only produce the shorter half of the titles: they finish early and leave
    lengths = [len(encode_response(tok, t)) for t in ds.catalog.titles]
    longer = [i for i, n in enumerate(lengths) if n > sorted(lengths)[len(lengths) // 2]]
    ex = [longer if i % 2 else list(map(int, h)) for i, h in enumerate(frame["history_item_ids"])]
    left = []
    original = shared_attention.SharedPromptCache.select_prompts
    monkeypatch.setattr(shared_attention.SharedPromptCache, "select_prompts",
                        lambda self, kept: (left.append(len(kept)), original(self, kept))[1])
    kw = dict(num_groups=groups, diversity_penalty=penalty, exclusions=ex)
    shared = beam_search(model, enc.input_ids, enc.attention_mask, trie, num_beams, num_beams // 2,
                         shared_attention=True, **kw)
    per_beam = beam_search(model, enc.input_ids, enc.attention_mask, trie, num_beams, num_beams // 2,
                           shared_attention=False, **kw)
    assert left and left == sorted(left, reverse=True) and left[-1] < 8  # prompts did leave the batch
    assert torch.equal(shared.sequences, per_beam.sequences)
    assert torch.equal(shared.items, per_beam.items)
    assert torch.allclose(shared.scores, per_beam.scores, atol=1e-5)
    assert torch.allclose(shared.logprobs, per_beam.logprobs, atol=1e-4)


def test_candidates_stage_order_dedup_logprobs(setup):
    ds, model, tok, trie = setup
    frame = ds.split("train").frame.iloc[:6]
    gen = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="diverse_beam", num_return_sequences=6,
                                                                  reference_logprobs=True, batch_size=2),
                             ds.instruction)
    c = gen.candidates(frame)
    # batches are formed by prompt length; the output keeps the input order
    assert [len(p) for p in gen.prompts(frame)] != sorted(len(p) for p in gen.prompts(frame))
    assert c["sample_id"].tolist() == frame["sample_id"].tolist()
    assert c["prompt"].tolist() == gen.prompts(frame)
    for ids, titles, scores, lps, refs, hist, tgt in zip(
            c["candidate_item_ids"], c["candidate_titles"], c["candidate_scores"], c["candidate_logprobs"],
            c["candidate_ref_logprobs"], frame["history_item_ids"], frame["target_item_id"]):
        assert len(ids) == len(set(ids)) > 0
        assert titles == [ds.catalog.titles[i] for i in ids]
        assert not set(ids) & (set(map(int, hist)) | {int(tgt)})  # excluded inside the constraint
        assert scores == sorted(scores, reverse=True)
        assert lps == pytest.approx(refs, abs=1e-3)  # beam log-probs == teacher-forced log-probs


def test_sampling_is_seeded_and_constrained(setup):
    ds, model, tok, _ = setup
    frame = ds.split("train").frame.iloc[:4]
    cfg = dict(mode="sample", num_return_sequences=5, temperature=1.5, seed=7)
    a = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(**cfg)).candidates(frame)
    b = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(**cfg)).candidates(frame)
    c = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(**{**cfg, "seed": 8})).candidates(frame)
    assert a["candidate_item_ids"].tolist() == b["candidate_item_ids"].tolist()
    assert a["candidate_item_ids"].tolist() != c["candidate_item_ids"].tolist()
    assert all(0 <= i < len(ds.catalog) for ids in a["candidate_item_ids"] for i in ids)


def test_predictions_are_published_format(setup):
    ds, model, tok, _ = setup
    frame = ds.split("test").frame.iloc[:3]
    free = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="greedy", constrained=False,
                                                                   max_new_tokens=8)).predictions(frame)
    assert [set(r) for r in free] == [{"prompt", "prediction", "ground_truth"}] * 3
    con = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="beam", num_return_sequences=1,
                                                                  exclude_history=False, exclude_target=False)
                             ).predictions(frame)
    assert [r["prompt"] for r in con] == [r["prompt"] for r in free]
    for row, gt in zip(con, frame["target_title"]):
        assert row["prediction"].startswith('"') and row["prediction"][1:-1] in ds.catalog.title_to_id
        assert row["ground_truth"] == gt


def test_bad_input_errors(setup):
    ds, model, tok, _ = setup
    with pytest.raises(DataError, match="empty catalog"):
        TitleTrie.from_titles(tok, [])
    with pytest.raises(DataError, match="tokenises to nothing"):
        TitleTrie.from_titles(tok, ["fine title", ""])
    with pytest.raises(RaydpoError, match="divisible"):
        DecodeConfig(mode="diverse_beam", num_return_sequences=4, num_beams=10, num_beam_groups=4)
    with pytest.raises(RaydpoError, match="unknown mode"):
        DecodeConfig(mode="nucleus")

    class NoEos:
        eos_token_id = None
        name_or_path = "no-eos"

    with pytest.raises(RaydpoError, match="EOS"):
        TitleTrie.from_titles(NoEos(), ["a"])
    long_history = list(ds.catalog.titles) * 20
    frame = ds.split("test").frame.iloc[:1].copy()
    frame.at[frame.index[0], "history_titles"] = long_history
    gen = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="beam", num_return_sequences=2))
    sid = frame["sample_id"].iloc[0]
    with pytest.raises(RaydpoError, match=f"sample '{sid}': prompt 0 is too long"):
        gen.candidates(frame)


def test_shared_attention_refuses_a_model_that_bypasses_it(setup):
    """If a model's attention layers do not dispatch through transformers' AttentionInterface,
    the prompt-shared cache would be silently wrong: beam_search stops instead."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from raydpo.generation import shared_attention

    ds, model, tok, trie = setup
    _, enc = _batch(tok, ds, 2)
    assert shared_attention.supports_shared_prompt(model)
    AttentionInterface.register(shared_attention.NAME, sdpa_attention_forward)  # a layer that ignores it
    try:
        with pytest.raises(RuntimeError, match="shared-prompt attention"):
            beam_search(model, enc.input_ids, enc.attention_mask, trie, 4, 4, shared_attention=True)
    finally:
        AttentionInterface.register(shared_attention.NAME, shared_attention._shared_prompt_forward)
    out = beam_search(model, enc.input_ids, enc.attention_mask, trie, 4, 4, shared_attention=True)
    assert (out.items >= 0).all()


def test_beam_cache_cli_option_reaches_the_decoder(monkeypatch):
    import argparse

    from raydpo.generation import cli

    parser = argparse.ArgumentParser()
    cli.add_generation_parsers(parser.add_subparsers(dest="cmd"))
    seen = []
    monkeypatch.setattr(cli, "_run", lambda task, args, decode, splits: seen.append(decode) or 0)
    expected = {"shared": (True, None), "per-beam": (True, False), "transformers": (False, False)}
    for choice in expected:
        for cmd in ("generate", "predict"):
            args = parser.parse_args([cmd, "--data", "d", "--out", "o", "--beam-cache", choice])
            args.func(args)
            assert (seen[-1].shared_prefill, seen[-1].shared_attention) == expected[choice]
