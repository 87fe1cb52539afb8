"""raydpo.training, fast tests (no Ray): losses against hand-computed values, masking, DS-DPO
betas, tokenisation, shared-prompt log-probs, S-DPO(K=1) == TRL DPO, DeepSpeed configs, bad
input, and short in-process training runs. The Ray Train tests are in test_training_ray.py."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_training_helpers import (  # noqa: F401 - fixtures
    adapter_tensors,
    assert_all_changed,
    flat,
    fresh_lora_tensors,
    one_thread,
    probe_logps_of,
    tdata,
)

from raydpo.errors import DataError, RaydpoError
from raydpo.training import losses
from raydpo.training.config import Plan, PreferenceConfig, build

pytestmark = pytest.mark.usefixtures("one_thread")

# --- losses --------------------------------------------------------------------------------------


def test_sdpo_loss_and_gradient_match_hand_computation():
    beta = 0.5
    pc = torch.tensor([-10.0], requires_grad=True)
    rc = torch.tensor([-11.0])
    pr = torch.tensor([[-12.0, -9.0]], requires_grad=True)
    rr = torch.tensor([[-12.5, -10.0]])
    loss = losses.sdpo(pc, pr, rc, rr, beta=beta)
    # by hand: d_w = 1, d = [0.5, 1.0], z_i = beta (d_i - d_w) = [-0.25, 0]
    z = [beta * (0.5 - 1.0), beta * (1.0 - 1.0)]
    denom = 1.0 + math.exp(z[0]) + math.exp(z[1])
    assert loss.item() == pytest.approx(math.log(denom), abs=1e-6)
    # L = -log sigmoid(-log sum exp z) as written in the issue
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(math.log(math.exp(z[0]) + math.exp(z[1]))))),
                                        abs=1e-6)
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(-beta * (math.exp(z[0]) + math.exp(z[1])) / denom, abs=1e-6)
    assert pr.grad[0, 0].item() == pytest.approx(beta * math.exp(z[0]) / denom, abs=1e-6)
    assert pr.grad[0, 1].item() == pytest.approx(beta * math.exp(z[1]) / denom, abs=1e-6)


def test_sdpo_with_one_negative_is_dpo_sigmoid():
    g = torch.Generator().manual_seed(0)
    pc, rc = torch.randn(6, generator=g), torch.randn(6, generator=g)
    pr, rr = torch.randn(6, 1, generator=g), torch.randn(6, 1, generator=g)
    a = losses.sdpo(pc, pr, rc, rr, beta=0.3)
    b = losses.dpo_sigmoid(pc, pr[:, 0], rc, rr[:, 0], beta=0.3)
    assert torch.allclose(a, b, atol=1e-6)


def test_sdpo_mask_ignores_missing_negatives_even_garbage():
    pc = torch.tensor([-5.0, -6.0], requires_grad=True)
    rc = torch.tensor([-5.5, -6.5])
    pr = torch.tensor([[-7.0, float("inf"), float("nan")], [-8.0, -6.0, -9.0]], requires_grad=True)
    rr = torch.tensor([[-7.2, float("nan"), 3.0], [-8.1, -6.3, -9.4]])
    mask = torch.tensor([[True, False, False], [True, True, True]])
    loss = losses.sdpo(pc, pr, rc, rr, mask, beta=0.2)
    alone = losses.sdpo(pc[:1], pr[:1, :1], rc[:1], rr[:1, :1], beta=0.2)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(alone.item(), abs=1e-7)
    loss.sum().backward()
    assert torch.isfinite(pr.grad).all() and torch.isfinite(pc.grad).all()
    assert pr.grad[0, 1:].abs().sum().item() == 0.0
    # an all-masked row is an error, not a silent 0
    with pytest.raises(ValueError, match="at least one negative"):
        losses.sdpo(pc, pr.detach(), rc, rr, torch.zeros(2, 3, dtype=torch.bool))


def test_sdpo_per_negative_betas():
    pc, rc = torch.tensor([0.0]), torch.tensor([0.0])
    pr, rr = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    betas = torch.tensor([[0.1, 0.3]])
    loss = losses.sdpo(pc, pr, rc, rr, beta=betas)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(0.1 * 1.0) + math.exp(0.3 * 2.0)), abs=1e-6)


# --- DS-DPO --------------------------------------------------------------------------------------

# item embeddings: 0 (0,0), 1 (1,0), 2 (0,2), 3 (3,0), 4 (0,-1)
EMB = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, -1.0]])


def test_item_distances_by_hand():
    hist, chosen, rej = np.array([0]), 1, np.array([2, 3, 4])
    dc = losses.item_distances(EMB, hist, chosen, rej, "dc")
    assert dc == pytest.approx([math.sqrt(5), 2.0, math.sqrt(2)])
    dp = losses.item_distances(EMB, hist, chosen, rej, "dp")
    assert dp == pytest.approx([2.0, 3.0, 1.0])
    dpc = losses.item_distances(EMB, hist, chosen, rej, "dpc")  # anchor (0.5, 0)
    assert dpc == pytest.approx([math.sqrt(4.25), 2.5, math.sqrt(1.25)])


def test_dsdpo_betas_use_their_own_distance_range():
    hist, chosen, rej = np.array([0]), 1, np.array([2, 3, 4])
    dc = losses.item_distances(EMB, hist, chosen, rej, "dc")
    lin = losses.dsdpo_betas(dc, 0.1, 0.3, "linear")
    x_mid = (2.0 - math.sqrt(2)) / (math.sqrt(5) - math.sqrt(2))
    assert lin == pytest.approx([0.3, 0.1 + 0.2 * x_mid, 0.1])
    # the reference normalised dc by the dpc range: item 2 would not get beta_max
    dpc = losses.item_distances(EMB, hist, chosen, rej, "dpc")
    buggy = 0.1 + 0.2 * (dc - dpc.min()) / (dpc.max() - dpc.min())
    assert buggy[0] != pytest.approx(0.3) and lin[0] == pytest.approx(0.3)
    sig = losses.dsdpo_betas(dc, 0.1, 0.3, "sigmoid", temperature=0.8)
    s = lambda x: 1 / (1 + math.exp(-(x - 0.5) / 0.8))
    assert sig == pytest.approx([0.1 + 0.2 * s(1.0), 0.1 + 0.2 * s(x_mid), 0.1 + 0.2 * s(0.0)])
    # equal distances: x = 0 for all; masked entries are nan and do not set the range
    eq = losses.dsdpo_betas(np.array([[1.0, 1.0, 9.0]]), 0.1, 0.3, "linear", mask=np.array([[1, 1, 0]]))
    assert eq[0, :2] == pytest.approx([0.1, 0.1]) and np.isnan(eq[0, 2])


def test_add_betas_on_data(tdata, tmp_path):
    from raydpo.training.config import DSDPOSettings
    from raydpo.training.dsdpo import add_betas

    ds = tdata["dataset"]
    emb = np.random.default_rng(0).normal(size=(len(ds.catalog), 8))
    np.save(tmp_path / "emb.npy", emb)
    s = DSDPOSettings(embeddings=str(tmp_path / "emb.npy"), distance="dpc", beta_min=0.05, beta_max=0.15,
                      mapping="linear")
    out = add_betas(tdata["frame3"], ds, s)
    for negs, betas in zip(out["rejected"], out["betas"]):
        assert len(betas) == len(negs)
        assert all(0.05 - 1e-12 <= b <= 0.15 + 1e-12 for b in betas)
        if len(negs) > 1:
            assert min(betas) == pytest.approx(0.05) and max(betas) == pytest.approx(0.15)
    bad = tdata["frame3"].copy()
    bad.loc[0, "rejected_item_ids"] = None
    bad = bad.drop(columns=["rejected_item_ids", "chosen_item_id"])
    bad.loc[0, "rejected"] = ['"Not A Catalog Title"']
    with pytest.raises(DataError, match="not a catalog item"):
        add_betas(bad, ds, s)
    np.save(tmp_path / "short.npy", emb[:5])
    with pytest.raises(DataError, match="one row per catalog item"):
        add_betas(tdata["frame3"], ds, s.model_copy(update={"embeddings": str(tmp_path / "short.npy")}))


# --- tokenisation and log-probs --------------------------------------------------------------------


def test_tokenisation_is_raydpo_prompt(tdata):
    from raydpo.models import load_tokenizer
    from raydpo.prompt import encode_prompt, encode_response, render_prompt
    from raydpo.training.data import tokenize_frame

    tok = load_tokenizer(tdata["base"])
    ds = tdata["dataset"]
    frame = tdata["frame3"].iloc[:5]
    ex = tokenize_frame(frame, tok, max_length=1024)
    samples = ds.split("train").frame.set_index("sample_id")
    for e, (_, row) in zip(ex, frame.iterrows()):
        s = samples.loc[row["sample_id"]]
        assert e["prompt_ids"] == encode_prompt(tok, render_prompt(tok, list(s["history_titles"]), ds.instruction))
        assert e["responses"][0] == encode_response(tok, s["target_title"])
        assert e["responses"][0][-1] == tok.eos_token_id
        titles = [r[1:-1] for r in row["rejected"]]
        assert e["responses"][1:] == [encode_response(tok, t) for t in titles]
    with pytest.raises(DataError, match="max_length"):
        tokenize_frame(frame, tok, max_length=32)


@pytest.mark.parametrize("share", [True, False])
def test_packed_logps_equal_sequence_logprobs(tdata, share):
    from raydpo.models import load_model, sequence_logprobs
    from raydpo.prompt import render_user_message
    from raydpo.training.data import PackedCollator, packed_logps, tokenize_frame

    model, tok = load_model(tdata["base"])
    frame = tdata["frame3"].iloc[:6]
    ex = tokenize_frame(frame, tok, max_length=1024)
    batch = PackedCollator(tok.pad_token_id, share_prompt=share)(ex)
    if share:
        assert batch["input_ids"].shape[0] == len(ex)  # one row per example: the prompt once
    with torch.no_grad():
        lp = packed_logps(model, batch)
    prompts, titles = [], []
    for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"]):
        for t in [c, *r]:
            prompts.append(render_user_message(tok, p))
            titles.append(t[1:-1])
    ref = sequence_logprobs(model, tok, prompts, titles)
    assert torch.allclose(lp[batch["slot_mask"]], ref, atol=1e-4)
    # an example's numbers do not depend on the other examples of the batch
    alone = packed_logps(model, PackedCollator(tok.pad_token_id, share_prompt=share)(ex[:1]))
    assert torch.allclose(alone[0, : len(ex[0]["responses"])], lp[0, : len(ex[0]["responses"])], atol=1e-4)


def _local_ctx(tmp_path):
    from raydpo.training.common import WorkerContext

    return WorkerContext(run_dir=tmp_path)


def test_sdpo_k1_equals_trl_dpo_loss_and_gradients(tdata, tmp_path):
    """S-DPO with one negative on the same batch as TRL's DPOTrainer (sigmoid): same loss, same
    gradient on every LoRA weight, same reward metrics."""
    from raydpo.training import dpo, sdpo
    from raydpo.training.common import ModelState, load_policy
    from raydpo.training.config import LoraSettings
    from raydpo.training.data import tokenize_frame
    from raydpo.training.reference import ReferenceSpec

    ctx = _local_ctx(tmp_path)
    models = []
    for _ in range(2):
        m, tok = load_policy(ModelState(base=tdata["base"]), lora=LoraSettings(), dtype="auto", ctx=ctx, seed=0)
        g = torch.Generator().manual_seed(5)  # move the policy away from the reference, identically
        with torch.no_grad():
            for name, p in sorted(m.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        models.append(m)
    ex = tokenize_frame(tdata["frame1"].iloc[:6], tok, max_length=1024)
    st = PreferenceConfig(data="unused", loss="sigmoid", beta=0.2, batch_size=6)
    t_dpo = dpo.build_trainer(st, models[0], tok, ex, None, ctx, tmp_path / "a", [], ReferenceSpec())
    t_sdpo = sdpo.build_trainer(st.model_copy(update={"loss": "sdpo"}), models[1], tok, ex, None, ctx,
                                tmp_path / "b", [], ReferenceSpec())
    from raydpo.training.data import to_pairs

    # TRL trains on raydpo's tokens unchanged (its own raw-text tokenisation is skipped)
    for i, e in enumerate(ex):
        row = t_dpo.train_dataset[i]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (e["prompt_ids"], *e["responses"])
    b_dpo = t_dpo._prepare_inputs(t_dpo.data_collator(to_pairs(ex)))
    b_sdpo = t_sdpo._prepare_inputs(t_sdpo.data_collator(ex))
    l_dpo = t_dpo.compute_loss(t_dpo.model, b_dpo)
    l_sdpo = t_sdpo.compute_loss(t_sdpo.model, b_sdpo)
    assert l_dpo.item() > 0.01 and abs(l_dpo.item() - math.log(2)) > 1e-3  # not the trivial ln 2 of policy == ref
    assert l_sdpo.item() == pytest.approx(l_dpo.item(), abs=1e-5)
    l_dpo.backward()
    l_sdpo.backward()
    ga = {n: p.grad for n, p in models[0].named_parameters() if p.requires_grad}
    gb = {n: p.grad for n, p in models[1].named_parameters() if p.requires_grad}
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        assert ga[n] is not None and torch.allclose(ga[n], gb[n], rtol=1e-3, atol=1e-7), n
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"):
        assert t_sdpo._metrics["train"][key][-1] == pytest.approx(t_dpo._metrics["train"][key][-1], abs=1e-4), key
    # logged: rewards/pair_accuracy per (example, negative) pair and rewards/accuracies = the chosen
    # beats every negative, the same number with one negative; TRL's per-pair key is renamed
    for t in (t_dpo, t_sdpo):
        t.log({})
        logged = t.state.log_history[-1]
        assert logged["rewards/accuracies"] == pytest.approx(logged["rewards/pair_accuracy"], abs=1e-6)
        assert not [k for k in logged if "accuracies_" in k]


def test_pair_accuracy_and_all_negatives_accuracy_hand_computed():
    """Two examples: the first beats both its negatives, the second one of two (a third slot
    masked): 3 of 4 pairs won, 1 of 2 examples beat every negative."""
    from raydpo.training.common import summarize_logs
    from raydpo.training.losses import preference_stats

    zeros = torch.zeros(2)
    chosen = torch.tensor([1.0, 1.0])
    rejected = torch.tensor([[0.0, 0.5, 9.0], [2.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    stats = preference_stats(chosen, rejected, zeros, torch.zeros(2, 3), mask, beta=1.0)
    assert stats["rewards/pair_accuracy"].item() == pytest.approx(0.75)
    assert stats["rewards/accuracies"].item() == pytest.approx(0.5)
    assert "rewards/accuracies_all" not in stats
    logged = summarize_logs([{"rewards/accuracies": 0.5, "rewards/pair_accuracy": 0.75,
                              "eval_rewards/accuracies": 0.25, "eval_rewards/pair_accuracy": 0.5}])
    assert logged == {"reward_accuracy": 0.5, "reward_pair_accuracy": 0.75, "eval_reward_accuracy": 0.25,
                      "eval_reward_pair_accuracy": 0.5}


def test_precomputed_reference_equals_on_the_fly(tdata, tmp_path):
    from raydpo.training import sdpo
    from raydpo.training.common import ModelState, load_policy
    from raydpo.training.config import LoraSettings
    from raydpo.training.data import tokenize_frame
    from raydpo.training.reference import ReferenceSpec, precompute_logps

    ctx = _local_ctx(tmp_path)
    m, tok = load_policy(ModelState(base=tdata["base"]), lora=LoraSettings(), dtype="auto", ctx=ctx, seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    ex = tokenize_frame(tdata["frame3"].iloc[:6], tok, max_length=1024)
    st = PreferenceConfig(data="unused", loss="sdpo", beta=0.1, batch_size=6)
    t = sdpo.build_trainer(st, m, tok, ex, None, ctx, tmp_path / "a", [], ReferenceSpec())
    on_the_fly = t.compute_loss(t.model, t._prepare_inputs(t.data_collator(ex))).item()
    lps = precompute_logps(m, ex, pad_token_id=tok.pad_token_id, batch_size=4)
    ex2 = [{**e, "ref_logps": lp} for e, lp in zip(ex, lps)]
    batch = t._prepare_inputs(t.data_collator(ex2))
    assert "ref_logps" in batch
    assert t.compute_loss(t.model, batch).item() == pytest.approx(on_the_fly, abs=1e-5)


# --- DeepSpeed configs ---------------------------------------------------------------------------


def test_generated_deepspeed_configs():
    from raydpo.training.deepspeed import check_config, zero_config

    z2 = zero_config(2, micro_batch=4, grad_accum=2, world_size=2)
    z3 = zero_config(3, micro_batch=4, grad_accum=2, world_size=2)
    assert z2["zero_optimization"]["stage"] == 2 and z3["zero_optimization"]["stage"] == 3
    assert z2["train_batch_size"] == 16 and z2["train_micro_batch_size_per_gpu"] == 4
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "optimizer" not in z2 and z2["zero_allow_untested_optimizer"] is True  # a torch optimizer: no cpu_adam
    check_config(z3, micro_batch=4, grad_accum=2, world_size=2)
    assert zero_config(2)["train_batch_size"] == "auto"


def test_user_deepspeed_json_is_checked(tmp_path):
    from raydpo.training.deepspeed import resolve

    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
                             "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2}}))
    with pytest.raises(RaydpoError, match=r"train_batch_size=32 != micro batch 4 x grad_accum 2 x 2 workers = 16"):
        resolve(str(f), micro_batch=4, grad_accum=2, world_size=2, use_gpu=False)
    assert resolve(str(f), micro_batch=4, grad_accum=2, world_size=4, use_gpu=False)["train_batch_size"] == 32
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    with pytest.raises(RaydpoError, match="contradicts the stage's batch_size=4"):
        resolve(str(f), micro_batch=4, grad_accum=1, world_size=2, use_gpu=False)
    f.write_text("{not json")
    with pytest.raises(RaydpoError, match="malformed DeepSpeed JSON"):
        resolve(str(f), micro_batch=4, grad_accum=1, world_size=2, use_gpu=False)


# --- bad input: clear errors before training starts -------------------------------------------------


def _plan(tdata, tmp_path, stage: dict, **ray) -> dict:
    return {"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"],
            "output_dir": str(tmp_path / "run"), "stages": [stage], "ray": {"num_workers": 0, **ray}}


def _run_expecting(tdata, tmp_path, plan: dict, exc, match: str):
    from raydpo.training import run_plan

    with pytest.raises(exc, match=match):
        run_plan(plan)
    stages = Path(plan["output_dir"]) / "stages"
    assert not stages.exists() or not any(stages.iterdir()), "training started despite bad input"


def _write(frame: pd.DataFrame, path: Path) -> str:
    frame.to_parquet(path)
    return str(path)


def test_bad_preference_data_fails_before_training(tdata, tmp_path):
    good = tdata["frame3"]
    missing = _write(good.drop(columns=["chosen"]), tmp_path / "missing.parquet")
    _run_expecting(tdata, tmp_path, _plan(tdata, tmp_path, {"kind": "preference", "data": missing}),
                   DataError, r"missing\.parquet: field 'chosen': missing column")
    empty = good.copy()
    empty.loc[3, "chosen"] = "  "
    _run_expecting(tdata, tmp_path, _plan(tdata, tmp_path, {"kind": "preference", "data": _write(
        empty, tmp_path / "empty.parquet")}), DataError, r"record \S+, field 'chosen': empty chosen response")
    zero = good.copy()
    zero.at[5, "rejected"] = []
    _run_expecting(tdata, tmp_path, _plan(tdata, tmp_path, {"kind": "preference", "data": _write(
        zero, tmp_path / "zero.parquet")}), DataError, r"field 'rejected': 0 negatives \(need at least 1\)")
    jsonl = tmp_path / "hole.jsonl"
    rows = good.head(4).to_dict("records")
    del rows[2]["chosen"]
    jsonl.write_text("\n".join(json.dumps({k: (list(v) if hasattr(v, "tolist") else v) for k, v in r.items()},
                                          default=lambda x: x.tolist()) for r in rows) + "\n")
    _run_expecting(tdata, tmp_path, _plan(tdata, tmp_path, {"kind": "preference", "data": str(jsonl)}),
                   DataError, "field 'chosen'")


@pytest.mark.parametrize("beta", [0, -0.5])
def test_nonpositive_beta_is_rejected(tdata, tmp_path, beta):
    _run_expecting(tdata, tmp_path, _plan(tdata, tmp_path, {"kind": "preference", "data": tdata["prefs1"],
                                                            "beta": beta}),
                   RaydpoError, rf"stages\.0\.beta: beta must be > 0, got {beta}")


def test_deepspeed_config_contradicting_batch_sizes_fails_before_training(tdata, tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    plan = _plan(tdata, tmp_path, {"kind": "preference", "data": tdata["prefs1"], "batch_size": 4, "grad_accum": 2},
                 num_workers=2, deepspeed=str(f))
    _run_expecting(tdata, tmp_path, plan, RaydpoError, r"train_batch_size=64 != micro batch 4 x grad_accum 2 x 2 "
                                                      r"workers = 16")


def test_other_config_errors_are_clear(tdata, tmp_path):
    base = _plan(tdata, tmp_path, {"kind": "preference", "data": tdata["prefs1"]})
    cases = [
        ({"loss": "softmax"}, "unknown loss 'softmax'"),
        ({"loss": "dsdpo"}, "needs the 'dsdpo' settings"),
        ({"reference": "stage:nope"}, "must name an earlier stage"),
        ({"reference": "/no/such/adapter"}, "existing adapter folder"),
        ({"epochs": 0}, "epochs"),
        ({"trl_args": {"beta": 1.0}}, "set by raydpo"),
        ({"trl_args": {"no_such_field": 1}}, "not a DPOConfig field"),
        ({"max_length": 40}, "more than max_length=40"),
    ]
    from raydpo.training import run_plan

    for update, match in cases:
        plan = json.loads(json.dumps(base))
        plan["stages"][0].update(update)
        with pytest.raises(RaydpoError, match=match):
            run_plan(plan)
    with pytest.raises(RaydpoError, match="deepspeed needs Ray Train workers"):
        build(Plan, {**base, "ray": {"num_workers": 0, "deepspeed": "zero2"}})
    with pytest.raises(RaydpoError, match="data '@x' must name an earlier selfplay stage"):
        build(Plan, {**base, "stages": [{"kind": "sft", "data": "@x"}]})


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_check_and_bad_config(tdata, tmp_path, capsys):
    import yaml

    from raydpo.training.cli import add_training_parsers

    parser = argparse.ArgumentParser(prog="raydpo")
    add_training_parsers(parser.add_subparsers(dest="command"))
    cfg = {"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"], "output_dir": str(tmp_path / "o"),
           "dpo": {"data": tdata["prefs3"], "loss": "sdpo", "beta": 0.1}, "ray": {"num_workers": 2}}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = parser.parse_args(["train", "dpo", str(path), "--check", "--num-workers", "0"])
    assert args.func(args) == 0
    assert "OK (1 stages" in capsys.readouterr().out
    cfg["dpo"]["beta"] = 0
    path.write_text(yaml.safe_dump(cfg))
    args = parser.parse_args(["train", "dpo", str(path), "--check", "--num-workers", "0"])
    with pytest.raises(RaydpoError, match=r"dpo\.yaml: stages\.0\.beta: beta must be > 0"):
        args.func(args)


# --- short in-process runs (num_workers: 0) -------------------------------------------------------


def test_in_process_sft_dpo_sdpo_plan(tdata, tmp_path):
    """SFT -> DPO -> S-DPO (reference: the SFT stage) in this process: every loss falls or stays
    finite, every LoRA weight changes in every stage, the reloaded adapters give the trained
    model's log-probs, and rerunning skips finished stages."""
    from raydpo.training import run_plan

    out = tmp_path / "run"
    plan = {"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"], "output_dir": str(out),
            "stages": [
                {"kind": "sft", "name": "sft", "data": tdata["data_dir"], "max_rows": 16, "epochs": 1,
                 "batch_size": 8, "learning_rate": 2e-3},
                {"kind": "preference", "name": "dpo", "data": tdata["prefs1"], "loss": "sigmoid", "beta": 0.5,
                 "epochs": 3, "batch_size": 8, "learning_rate": 3e-3, "max_rows": 16},
                {"kind": "preference", "name": "sdpo", "data": tdata["prefs3"], "loss": "sdpo", "beta": 0.5,
                 "epochs": 1, "batch_size": 8, "learning_rate": 2e-3, "reference": "stage:sft", "max_rows": 16,
                 "eval_data": tdata["prefs3_eval"]},
            ], "ray": {"num_workers": 0}}
    res = run_plan(plan)
    dpo_m = res.stage_metrics("dpo")
    assert [m["epoch"] for m in dpo_m] == [1.0, 2.0, 3.0]
    assert dpo_m[-1]["loss"] < dpo_m[0]["loss"]
    assert dpo_m[-1]["reward_margin"] > 0 and 0 <= dpo_m[-1]["reward_accuracy"] <= 1
    assert dpo_m[-1]["reward_accuracy"] == dpo_m[-1]["reward_pair_accuracy"]  # one negative a row
    sdpo_m = res.stage_metrics("sdpo")[-1]
    assert 0 <= sdpo_m["reward_accuracy"] <= 1 and 0 <= sdpo_m["reward_pair_accuracy"] <= 1
    assert all(math.isfinite(m["loss"]) for m in res.metrics)
    sft_a = adapter_tensors(Path(res.stages["sft"]) / "adapter")
    dpo_a = adapter_tensors(Path(res.stages["dpo"]) / "adapter")
    sdpo_a = adapter_tensors(Path(res.stages["sdpo"]) / "adapter")
    assert_all_changed(fresh_lora_tensors(tdata["base"], seed=0), sft_a)
    assert_all_changed(sft_a, dpo_a)
    assert_all_changed(dpo_a, sdpo_a)
    assert all("lora_" in k for k in sdpo_a)  # the adapter only, never base weights
    assert res.adapter_path and adapter_tensors(res.adapter_path).keys() == sdpo_a.keys()
    # a reloaded adapter gives the numbers of the trained in-memory model
    for name in ("sft", "dpo", "sdpo"):
        info = json.loads((Path(res.stages[name]) / "stage.json").read_text())
        frame = pd.read_parquet(out / "data" / f"{name}.parquet")
        got = probe_logps_of(tdata["base"], info["adapter"], frame, info)
        assert torch.allclose(got, flat(info["probe_logps"]), atol=1e-4), name
    # the S-DPO stage started from the DPO adapter, with the SFT model as reference: at its
    # first step the policy is already away from the reference (non-zero margins)
    assert res.stage_metrics("sdpo")[0]["reward_margin"] != 0
    ev = res.stage_metrics("sdpo")[0]
    assert math.isfinite(ev["eval_loss"]) and 0 <= ev["eval_reward_accuracy"] <= 1
    # rerun: every stage is skipped (same settings and data), outputs unchanged
    res2 = run_plan(plan)
    assert adapter_tensors(Path(res2.stages["sdpo"]) / "adapter")["base_model.model.model.layers.0.self_attn.q_proj."
                                                                 "lora_B.weight"].equal(
        sdpo_a["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert res2.metrics == []
    # a changed stage with the same output_dir is refused, not silently mixed
    plan["stages"][1]["beta"] = 0.25
    with pytest.raises(RaydpoError, match="from other settings or data"):
        run_plan(plan)


def test_in_process_precomputed_reference_and_trl_loss_types(tdata, tmp_path):
    """reference: precomputed (from data columns) trains; TRL's other loss types pass through."""
    from raydpo.models import load_model, sequence_logprobs
    from raydpo.prompt import render_user_message
    from raydpo.training import run_plan

    frame = tdata["frame1"].iloc[:16].copy()
    model, tok = load_model(tdata["base"])
    prompts = [render_user_message(tok, p) for p in frame["prompt"]]
    frame["ref_chosen_logps"] = sequence_logprobs(model, tok, prompts, [c[1:-1] for c in frame["chosen"]]).tolist()
    frame["ref_rejected_logps"] = [[x] for x in sequence_logprobs(
        model, tok, prompts, [r[0][1:-1] for r in frame["rejected"]]).tolist()]
    path = _write(frame, tmp_path / "withref.parquet")
    from raydpo.training.reference import add_reference_columns

    ours = add_reference_columns(frame.drop(columns=["ref_chosen_logps", "ref_rejected_logps"]), tdata["base"])
    assert np.allclose(ours["ref_chosen_logps"], frame["ref_chosen_logps"], atol=1e-4)
    assert np.allclose([r[0] for r in ours["ref_rejected_logps"]], [r[0] for r in frame["ref_rejected_logps"]],
                       atol=1e-4)
    res = run_plan({"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"],
                    "output_dir": str(tmp_path / "run"),
                    "stages": [{"kind": "preference", "name": "pre", "data": path, "reference": "precomputed",
                                "epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
                               {"kind": "preference", "name": "ipo", "data": path, "loss": "ipo", "epochs": 1,
                                "batch_size": 8, "learning_rate": 1e-3}],
                    "ray": {"num_workers": 0}})
    first = res.stage_metrics("pre")[0]
    assert math.isfinite(first["loss"]) and first["step"] == 2
    assert math.isfinite(res.stage_metrics("ipo")[0]["loss"])
    # the numbers in the data disagree with the columns' length: clear error
    bad = frame.copy()
    bad.at[0, "ref_rejected_logps"] = [1.0, 2.0]
    with pytest.raises(DataError, match="2 reference log-probs for 1 negatives"):
        run_plan({"model": {"name_or_path": tdata["base"]}, "output_dir": str(tmp_path / "run2"),
                  "dataset": tdata["data_dir"],
                  "stages": [{"kind": "preference", "data": _write(bad, tmp_path / "bad.parquet"),
                              "reference": "precomputed"}], "ray": {"num_workers": 0}})


def test_in_process_full_finetune_then_dsdpo(tdata, tmp_path):
    """Full fine-tuning SFT (every weight, a full model folder out), then DS-DPO with a new
    LoRA on that model (reference: the SFT model with the adapter disabled)."""
    from safetensors.torch import load_file

    from raydpo.training import run_plan

    emb = np.random.default_rng(0).normal(size=(len(tdata["dataset"].catalog), 8))
    np.save(tmp_path / "emb.npy", emb)
    res = run_plan({"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"],
                    "output_dir": str(tmp_path / "run"), "ray": {"num_workers": 0},
                    "stages": [{"kind": "sft", "name": "full", "data": tdata["data_dir"], "lora": None,
                                "max_rows": 16, "batch_size": 8, "learning_rate": 1e-3},
                               {"kind": "preference", "name": "ds", "data": tdata["prefs3"], "loss": "dsdpo",
                                "max_rows": 16, "batch_size": 8, "learning_rate": 2e-3, "reference": "adapter_disabled",
                                "dsdpo": {"embeddings": str(tmp_path / "emb.npy"), "distance": "dpc",
                                          "beta_min": 0.05, "beta_max": 0.5}}]})
    full = Path(res.stages["full"]) / "model"
    assert (full / "config.json").is_file() and (full / "tokenizer.json").is_file()
    before = load_file(str(Path(tdata["base"]) / "model.safetensors"))
    after = load_file(str(full / "model.safetensors"))
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert len(changed) >= len(before) - 1  # every trained weight (tied lm_head/embeddings count once)
    info = json.loads((Path(res.stages["ds"]) / "stage.json").read_text())
    assert info["base"] == str(full) and info["adapter"] == str(Path(res.output_dir) / "stages" / "ds" / "adapter")
    assert info["start"] == {"base": str(full), "adapter": None}  # a new LoRA on the fully fine-tuned model
    assert res.base_model == str(full)
    data = pd.read_parquet(Path(res.output_dir) / "data" / "ds.parquet")
    assert all(0.05 - 1e-9 <= b <= 0.5 + 1e-9 for row in data["betas"] for b in row)
    (m,) = res.stage_metrics("ds")
    assert math.isfinite(m["loss"]) and math.isfinite(m["reward_margin"]) and m["step"] == 2
    # a reference adapter on the plan's base is refused after a full fine-tuning stage
    with pytest.raises(RaydpoError, match="on another base model"):
        run_plan({"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"],
                  "output_dir": str(tmp_path / "run2"), "ray": {"num_workers": 0},
                  "stages": [{"kind": "sft", "name": "a", "data": tdata["data_dir"]},
                             {"kind": "sft", "name": "full", "data": tdata["data_dir"], "lora": None},
                             {"kind": "preference", "data": tdata["prefs1"], "reference": "stage:a"}]})
