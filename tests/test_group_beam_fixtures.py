"""raydpo's diverse (group) beam search against transformers 4's, recorded by
``scripts/record_group_beam.py`` (transformers 4.56.2, the last release with native group beam
search) in ``tests/fixtures/group_beam/``: identical sequences and scores in fp32, free and
trie-constrained (the research code's candidates came from transformers 4's group beam search)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from raydpo.generation.decoding import beam_search
from raydpo.generation.trie import TitleTrie

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "group_beam").glob("*.json"))


def _script():
    spec = importlib.util.spec_from_file_location("record_group_beam", ROOT / "scripts" / "record_group_beam.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rec():
    mod = _script()
    return mod, mod.build_model()


def test_fixtures_exist_and_cover_the_settings():
    assert len(FIXTURES) >= 6
    kinds = {json.loads(p.read_text())["settings"]["constrained"] for p in FIXTURES}
    assert kinds == {True, False}
    assert all(json.loads(p.read_text())["transformers"].startswith("4.") for p in FIXTURES)


def test_the_model_is_the_one_recorded(rec):
    mod, model = rec
    want = json.loads(FIXTURES[0].read_text())["fingerprint"]
    assert mod.fingerprint(model) == pytest.approx(want, abs=1e-5)


def _trim(rows, eos):
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_attention", "as_transformers"])
def test_diverse_beam_search_equals_transformers_4(rec, path, shared):
    mod, model = rec
    r = json.loads(path.read_text())
    s = r["settings"]
    ids, mask = mod.batch()
    trie = TitleTrie.from_sequences(r["titles"], mod.EOS) if s["constrained"] else None
    out = beam_search(model, ids, mask, trie, s["num_beams"], s["num_return_sequences"],
                      num_groups=s["num_beam_groups"], diversity_penalty=s["diversity_penalty"],
                      length_penalty=s["length_penalty"], max_new_tokens=s["max_new_tokens"], eos_token_id=mod.EOS,
                      pad_token_id=mod.PAD, shared_prefill=shared, shared_attention=shared)
    got = [_trim(out.sequences[b].tolist(), mod.EOS) for b in range(len(r["prompts"]))]
    assert got == r["sequences"]
    if shared:  # raydpo's shared-prompt attention sums in another order: last-bit differences
        torch.testing.assert_close(out.scores, torch.tensor(r["scores"]), atol=1e-5, rtol=0)
    else:  # the per-beam cache, as transformers: bit for bit
        assert torch.equal(out.scores, torch.tensor(r["scores"]))
    if trie is not None:
        assert (out.items >= 0).all()
