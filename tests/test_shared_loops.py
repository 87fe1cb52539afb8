"""One implementation each (issue 12, section 5): the batched response log-prob loop
(``training.common.response_logps``) behind reference pre-computation, ``add_reference_columns``
and the probe, checked against the independent ``models.sequence_logprobs`` (plain and NF4);
``random_preferences`` and ``selfplay_rows`` as the ``random`` and ``selfplay`` sampling
strategies, with the results the former implementations gave."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_training_helpers import one_thread, tdata  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


def _examples(tdata, tok, rows: int = 12):
    from raydpo.training.data import tokenize_frame

    frame = tdata["frame3"].iloc[:rows].reset_index(drop=True)
    return frame, tokenize_frame(frame, tok, max_length=1024)


def _by_sequence_logprobs(model, tok, frame, examples) -> list[list[float]]:
    """The same numbers through models.sequence_logprobs (left padding, no packing)."""
    from raydpo.models import sequence_logprobs
    from raydpo.prompt import render_user_message

    prompts, responses, owner = [], [], []
    for i, (msg, ex) in enumerate(zip(frame["prompt"], examples)):
        for r in ex["responses"]:
            prompts.append(render_user_message(tok, msg))
            responses.append(r)
            owner.append(i)
    flat = sequence_logprobs(model, tok, prompts, responses, batch_size=7).tolist()
    out: list[list[float]] = [[] for _ in examples]
    for i, v in zip(owner, flat):
        out[i].append(v)
    return out


def _close(a: list[list[float]], b: list[list[float]], atol: float) -> None:
    assert [len(x) for x in a] == [len(x) for x in b]
    assert sum(len(x) for x in a) > len(a)  # several negatives in some rows
    ta = torch.tensor([v for row in a for v in row])
    tb = torch.tensor([v for row in b for v in row])
    assert torch.allclose(ta, tb, atol=atol), (ta - tb).abs().max()


def test_response_logps_equals_sequence_logprobs(tdata):
    from raydpo.models import load_model
    from raydpo.training.common import response_logps

    model, tok = load_model(tdata["base"], device="cpu")
    frame, ex = _examples(tdata, tok)
    expected = _by_sequence_logprobs(model, tok, frame, ex)
    model.train()  # the loop scores in eval mode and gives the mode back
    shared = response_logps(model, ex, pad_token_id=tok.pad_token_id, batch_size=5, share_prompt=True)
    assert model.training
    single = response_logps(model, ex, pad_token_id=tok.pad_token_id, share_prompt=False, device="cpu")
    _close(shared, expected, 1e-4)
    _close(single, expected, 1e-4)
    assert response_logps(model, [], pad_token_id=tok.pad_token_id) == []


def test_reference_callers_share_the_loop(tdata):
    """precompute_logps (the adapter-disabled reference of a LoRA policy, split over two
    simulated ranks) and add_reference_columns (the base loaded from its folder) give the base
    model's numbers."""
    from peft import get_peft_model

    from raydpo.models import load_model
    from raydpo.training.common import response_logps
    from raydpo.training.config import LoraSettings
    from raydpo.training.reference import add_reference_columns, precompute_logps

    base, tok = load_model(tdata["base"], device="cpu")
    frame, ex = _examples(tdata, tok)
    want = response_logps(base, ex, pad_token_id=tok.pad_token_id, batch_size=4)
    policy, _ = load_model(tdata["base"], device="cpu", trainable=True)
    policy = get_peft_model(policy, LoraSettings().peft_config())
    with torch.no_grad():  # a policy that differs from the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    assert not torch.allclose(torch.tensor(response_logps(policy, ex[:1], pad_token_id=tok.pad_token_id)[0]),
                              torch.tensor(want[0]), atol=1e-3)
    captured: dict[int, dict] = {}

    def gather_as(rank):
        def all_gather(mine):  # what this rank computed; the other rank's rows filled in blank
            captured[rank] = dict(mine)
            return [mine, {i: [] for i in range(len(ex)) if i not in mine}]
        return all_gather

    for r in (0, 1):
        precompute_logps(policy, ex, pad_token_id=tok.pad_token_id, batch_size=3, rank=r, world_size=2,
                         all_gather=gather_as(r))
    assert sorted(captured[0]) == list(range(0, len(ex), 2)) and sorted(captured[1]) == list(range(1, len(ex), 2))
    combined = {**captured[0], **captured[1]}
    _close([combined[i] for i in range(len(ex))], want, 1e-5)
    full = precompute_logps(policy, ex, pad_token_id=tok.pad_token_id, batch_size=5)
    _close(full, want, 1e-5)
    cols = add_reference_columns(frame, tdata["base"], batch_size=4, device="cpu")
    _close([[c, *r] for c, r in zip(cols["ref_chosen_logps"], cols["ref_rejected_logps"])], want, 1e-5)


def test_response_logps_on_a_quantised_model(tdata):
    pytest.importorskip("bitsandbytes")
    from raydpo.models import load_model
    from raydpo.training.common import response_logps
    from raydpo.training.reference import add_reference_columns

    model, tok = load_model(tdata["base"], device="cpu", quantization="nf4", compute_dtype="float32")
    frame, ex = _examples(tdata, tok, rows=8)
    got = response_logps(model, ex, pad_token_id=tok.pad_token_id, batch_size=3)
    _close(got, _by_sequence_logprobs(model, tok, frame, ex), 2e-3)
    plain, _ = load_model(tdata["base"], device="cpu")
    far = response_logps(plain, ex, pad_token_id=tok.pad_token_id, batch_size=3)
    assert not np.allclose(np.concatenate(got), np.concatenate(far), atol=1e-4)  # it is the 4-bit model
    cols = add_reference_columns(frame, tdata["base"], batch_size=3, device="cpu", quantization="nf4",
                                 compute_dtype="float32")
    _close([[c, *r] for c, r in zip(cols["ref_chosen_logps"], cols["ref_rejected_logps"])], got, 1e-5)


# --- the sampling strategies ---------------------------------------------------------------------


def test_random_preferences_is_the_random_strategy(tdata):
    from raydpo.sampling.run import sample_negatives
    from raydpo.training.data import random_preferences

    ds = tdata["dataset"]
    got = random_preferences(ds, n_negatives=3, seed=5, limit=40)
    frame = ds.split("train").frame.iloc[:40]
    # what `raydpo sample --strategy random` gives for these rows (any candidates: random ignores
    # them), through the record-by-record strategy function
    rng = np.random.default_rng(0)
    cands = pd.DataFrame({"sample_id": frame["sample_id"].astype(str).tolist(),
                          "candidate_item_ids": [rng.choice(len(ds.catalog), 5, replace=False).tolist()
                                                 for _ in range(len(frame))]})
    want, _ = sample_negatives(ds, cands, "random", seed=5, n_negatives=3, engine="record")
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    for (_, r), (_, s) in zip(got.iterrows(), frame.iterrows()):
        negs = list(r["rejected_item_ids"])
        assert len(negs) == 3 and len(set(negs)) == 3
        assert int(s["target_item_id"]) not in negs and not set(negs) & {int(h) for h in s["history_item_ids"]}
        assert list(r["rejected"]) == [f'"{ds.catalog.titles[i]}"' for i in negs]
    other = random_preferences(ds, n_negatives=3, seed=6, limit=40)
    assert list(map(list, other["rejected_item_ids"])) != list(map(list, got["rejected_item_ids"]))
    var = random_preferences(ds, n_negatives=3, seed=5, limit=40, variable=True)
    lens = [len(r) for r in var["rejected_item_ids"]]
    assert set(lens) == {1, 2, 3}
    for v, full in zip(var["rejected_item_ids"], got["rejected_item_ids"]):
        assert list(v) == list(full)[: len(v)]


def test_selfplay_rows_is_the_selfplay_strategy(tdata):
    """selfplay_rows gives what the former implementation gave: the first
    ``num_return_sequences`` constrained-beam candidates (which exclude the target and history)."""
    from raydpo.generation.candidates import CandidateGenerator, DecodeConfig
    from raydpo.models import load_model
    from raydpo.prompt import response_text, user_message
    from raydpo.training.selfplay import sample_rows, selfplay_rows

    ds = tdata["dataset"]
    model, tok = load_model(tdata["base"], device="cpu")
    frame = sample_rows(ds, "train", 10, seed=3)
    decode = {"mode": "beam", "num_return_sequences": 2, "batch_size": 10}
    got = selfplay_rows(model, tok, ds, frame, decode)
    cfg = DecodeConfig(**decode)
    cands = CandidateGenerator(model, tok, ds.catalog, cfg, instruction=ds.instruction).candidates(frame)
    want = []
    for (_, sample), (_, c) in zip(frame.iterrows(), cands.iterrows()):  # the former code, verbatim
        ids = [int(x) for x in c["candidate_item_ids"]][: cfg.num_return_sequences]
        if not ids:
            continue
        want.append({"sample_id": str(sample["sample_id"]),
                     "prompt": user_message(list(sample["history_titles"]), ds.instruction),
                     "chosen": response_text(sample["target_title"]),
                     "rejected": [response_text(ds.catalog.titles[i]) for i in ids],
                     "chosen_item_id": int(sample["target_item_id"]), "rejected_item_ids": ids,
                     "strategy": "selfplay"})
    assert len(want) == len(frame) and all(len(r["rejected_item_ids"]) == 2 for r in want)
    assert got == want
    assert selfplay_rows(model, tok, ds, frame.iloc[:0], decode) == []
