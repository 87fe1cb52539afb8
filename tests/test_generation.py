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


def test_candidates_stage_order_dedup_logprobs(setup):
    ds, model, tok, trie = setup
    frame = ds.split("train").frame.iloc[:6]
    gen = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="diverse_beam", num_return_sequences=6,
                                                                  reference_logprobs=True), ds.instruction)
    c = gen.candidates(frame)
    assert c["sample_id"].tolist() == frame["sample_id"].tolist()
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
