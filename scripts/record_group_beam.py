"""Record transformers 4's diverse (group) beam search on a small model, as test fixtures.

The research code's candidates came from ``model.generate(num_beams=..., num_beam_groups=...,
diversity_penalty=...)`` in transformers 4 (``_group_beam_search`` with ``BeamSearchScorer`` and
``HammingDiversityLogitsProcessor``). transformers 5 dropped it, so raydpo has its own
(``raydpo.generation.decoding.beam_search`` with ``num_groups > 1``). This script records what
transformers 4 returns (sequences and ``sequences_scores``) for a few prompts and settings, with
and without a trie constraint given as ``prefix_allowed_tokens_fn`` (as the research code did);
``tests/test_group_beam_fixtures.py`` requires raydpo to return the same.

It needs only torch and transformers, and must run in its own environment with a transformers
4 release that still ships group beam search natively (4.56.2 is the last one: 4.57 moved it
to a Hub ``custom_generate`` repository, which cannot be fetched offline)::

    python -m venv /tmp/tf4 && /tmp/tf4/bin/pip install 'transformers==4.56.2' torch==2.13.0
    /tmp/tf4/bin/python scripts/record_group_beam.py            # writes tests/fixtures/group_beam/

The model is a 2-layer Llama built here from a seed (weights drawn with an explicit torch
generator in parameter-name order, not by transformers' initialisers, which differ between
releases), so the test builds the identical model under transformers 5 by importing
:func:`build_model` from this file; a fingerprint (first-step log-probabilities) stored with
the fixtures proves it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

VOCAB, PAD, BOS, EOS = 40, 0, 1, 2
SEED = 1234
EOS_SCALE = 8.0
# prompts of different lengths: the batch is left-padded, as raydpo's candidate generation does
PROMPTS = [[BOS, 5, 9, 13, 7], [BOS, 21, 4], [BOS, 30, 31, 8, 8, 17, 6], [BOS, 11]]
# num_beams, num_beam_groups, diversity_penalty, num_return_sequences, constrained, length_penalty
SETTINGS = [
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4, constrained=False),
    dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, num_return_sequences=3, constrained=False),
    dict(num_beams=6, num_beam_groups=2, diversity_penalty=3.0, num_return_sequences=6, constrained=False,
         length_penalty=0.5),
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, num_return_sequences=4, constrained=True),
    dict(num_beams=8, num_beam_groups=4, diversity_penalty=2.0, num_return_sequences=5, constrained=True),
    dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.3, num_return_sequences=6, constrained=True),
    # the published candidate setting's shape: 2 beams per group, penalty 1.0 ("Div_10_1.0")
    dict(num_beams=20, num_beam_groups=10, diversity_penalty=1.0, num_return_sequences=10, constrained=True),
]
FREE_NEW_TOKENS = 6


def build_model():
    """A 2-layer Llama (fp32, eager attention) with weights drawn from ``SEED``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                std = 0.6 if "embed" in name or "lm_head" in name else 0.25
                p.copy_(std * torch.randn(p.shape, generator=gen))
        # make EOS a likely next token (free decoding then finishes beams early, exercising the
        # finished-hypothesis bookkeeping and the early-stopping heuristic, not only max length)
        head = model.lm_head.weight
        head[EOS] = EOS_SCALE * head[3:].mean(0)
    return model


def titles() -> list[list[int]]:
    """Token sequences of a small "catalog" (each ends with EOS; some share prefixes), from SEED."""
    rng = random.Random(SEED)
    out: set[tuple[int, ...]] = set()
    while len(out) < 60:
        n = rng.randint(1, 4)
        head = [rng.choice([3, 4, 5, 6])] if rng.random() < 0.7 else []  # shared first tokens
        body = [rng.randrange(3, VOCAB) for _ in range(n)]
        out.add(tuple(head + body + [EOS]))
    return [list(t) for t in sorted(out)]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


def fingerprint(model) -> list[float]:
    """Log-probabilities of the next token after each prompt, tokens 0..7 (checks the model)."""
    ids, mask = batch()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1, :].float()
    return torch.log_softmax(logits, -1)[:, :8].flatten().tolist()


def prefix_fn_for(seqs: list[list[int]], prompt_len: int):
    root: dict = {}
    for s in seqs:
        node = root
        for t in s:
            node = node.setdefault(t, {})

    def prefix_allowed_tokens_fn(batch_id, sent):  # the research code's kind: walk a trie per beam
        node = root
        for t in sent[prompt_len:].tolist():
            node = node.get(t)
            if not node:
                return [EOS]
        return list(node)

    return prefix_allowed_tokens_fn


def record(out_dir: Path) -> list[Path]:
    import transformers

    model = build_model()
    ids, mask = batch()
    cat = titles()
    written = []
    for i, s in enumerate(SETTINGS):
        max_new = max(len(t) for t in cat) if s["constrained"] else FREE_NEW_TOKENS
        kw = dict(num_beams=s["num_beams"], num_beam_groups=s["num_beam_groups"],
                  diversity_penalty=s["diversity_penalty"], num_return_sequences=s["num_return_sequences"],
                  length_penalty=s.get("length_penalty", 1.0), do_sample=False, early_stopping=False,
                  max_new_tokens=max_new, pad_token_id=PAD, eos_token_id=EOS, output_scores=True,
                  return_dict_in_generate=True)
        if s["constrained"]:
            kw["prefix_allowed_tokens_fn"] = prefix_fn_for(cat, ids.shape[1])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        gen = out.sequences[:, ids.shape[1]:].tolist()
        seqs = [row[: row.index(EOS) + 1] if EOS in row else row for row in gen]
        n = s["num_return_sequences"]
        rec = {
            "transformers": transformers.__version__, "torch": torch.__version__, "seed": SEED,
            "settings": {**s, "length_penalty": s.get("length_penalty", 1.0), "max_new_tokens": max_new},
            "prompts": PROMPTS, "fingerprint": fingerprint(model),
            "titles": cat if s["constrained"] else None,
            "sequences": [seqs[b * n:(b + 1) * n] for b in range(len(PROMPTS))],
            "scores": out.sequences_scores.view(len(PROMPTS), n).tolist(),
        }
        name = (f"b{s['num_beams']}_g{s['num_beam_groups']}_p{s['diversity_penalty']}_n{n}"
                f"{'_lp' + str(s['length_penalty']) if 'length_penalty' in s else ''}"
                f"_{'trie' if s['constrained'] else 'free'}.json")
        path = out_dir / name
        path.write_text(json.dumps(rec, indent=1) + "\n")
        written.append(path)
    return written


def main() -> None:
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "group_beam"))
    args = ap.parse_args()
    if not transformers.__version__.startswith("4."):
        raise SystemExit(f"needs transformers 4.x with native group beam search, found {transformers.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in record(out):
        print(p)


if __name__ == "__main__":
    main()
