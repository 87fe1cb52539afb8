"""QLoRA: bitsandbytes NF4 / int8 bases through loading, SFT, DPO, S-DPO (every reference choice),
generation and prediction, on this CPU for real (bitsandbytes 0.50.2 runs both on CPU), and the
combinations refused at config load. The smollm2-135m runs are slow (conversion + real model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_training_helpers import (  # noqa: F401 - fixtures
    adapter_tensors,
    assert_all_changed,
    flat,
    one_thread,
    tdata,
)

from raydpo.errors import RaydpoError

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


# --- configs: values and combinations that cannot work ----------------------------------------------


def test_pipeline_config_quantization_keys_and_refusals():
    from raydpo.config import ConfigError, load_config

    cfg = load_config(None, {"model.quantization": "nf4", "model.compute_dtype": "bfloat16", "ray.deepspeed": "zero2"})
    assert (cfg.model.quantization, cfg.model.compute_dtype, cfg.model.quantize_inference) == ("nf4", "bfloat16", True)
    with pytest.raises(ConfigError, match=r"^<defaults>: model\.quantization: Input should be 'none', 'nf4' or 'int8'"):
        load_config(None, {"model.quantization": "fp4"})
    cases = {
        "sft.full_finetune": {"model.quantization": "nf4", "sft.full_finetune": True},
        "ray.deepspeed: ZeRO-3": {"model.quantization": "nf4", "ray.deepspeed": "zero3"},
        "ray.deepspeed: DeepSpeed cannot move or cast an LLM.int8": {"model.quantization": "int8",
                                                                     "ray.deepspeed": "zero2"},
    }
    for key, overrides in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        msg = str(e.value)
        assert msg.startswith(f"<defaults>: {key}") and "\n" not in msg, msg
        assert "model.quantization" in msg
    # full fine-tuning is fine when SFT is off, and unquantised
    load_config(None, {"model.quantization": "nf4", "sft.full_finetune": True, "sft.enabled": False})
    load_config(None, {"sft.full_finetune": True, "ray.deepspeed": "zero3"})


def test_pipeline_deepspeed_json_zero3_is_refused(tmp_path):
    from raydpo.config import ConfigError, load_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    with pytest.raises(ConfigError, match="ray.deepspeed: ZeRO-3 cannot partition a quantised base"):
        load_config(None, {"model.quantization": "nf4", "ray.deepspeed": str(ds)})


def test_training_plan_quantization_refusals(tdata, tmp_path):
    from raydpo.training.config import Curriculum, Plan, SPRecConfig, build

    base = {"model": {"name_or_path": tdata["base"], "quantization": "nf4"}, "dataset": tdata["data_dir"],
            "output_dir": str(tmp_path / "o")}
    sft = {"kind": "sft", "data": tdata["data_dir"]}
    plan = build(Plan, {**base, "stages": [sft]})
    assert plan.model.quantization == "nf4" and plan.model.compute_dtype == "auto"
    with pytest.raises(RaydpoError, match=r"^x\.yaml: model\.quantization: unknown quantization 'nf8'"):
        build(Plan, {**base, "model": {"name_or_path": tdata["base"], "quantization": "nf8"}, "stages": [sft]},
              what="x.yaml")
    with pytest.raises(RaydpoError, match=r"^x\.yaml: stages\[1\]\.lora: full fine-tuning \(no LoRA\) cannot train "
                                          r"a quantised base \(model\.quantization: nf4\)"):
        build(Plan, {**base, "stages": [sft, {**sft, "lora": None}]}, what="x.yaml")
    with pytest.raises(RaydpoError, match=r"ray\.deepspeed: ZeRO-3 cannot partition"):
        build(Plan, {**base, "stages": [sft], "ray": {"num_workers": 2, "deepspeed": "zero3"}})
    with pytest.raises(RaydpoError, match=r"ray\.deepspeed: ZeRO-3 cannot partition"):
        build(Curriculum, {**base, "stages": [{"data": tdata["prefs1"]}], "ray": {"num_workers": 2,
                                                                                  "deepspeed": "zero3"}})
    with pytest.raises(RaydpoError, match=r"sft\.lora: full fine-tuning \(no LoRA\)"):
        build(SPRecConfig, {**base, "sft": {"lora": None}})
    build(Plan, {**base, "stages": [sft], "ray": {"num_workers": 2, "deepspeed": "zero2"}})  # nf4 + ZeRO-2: allowed


def test_cli_flags_reach_the_configs(tdata, tmp_path):
    import argparse

    from raydpo.cli import build_parser
    from raydpo.training.cli import _overrides

    args = argparse.Namespace(output_dir=None, config="c.yaml", gpu=False, quantization="nf4", compute_dtype="bfloat16")
    data = _overrides({"model": {"name_or_path": "tiny"}}, args)
    assert data["model"] == {"name_or_path": "tiny", "quantization": "nf4", "compute_dtype": "bfloat16"}
    p = build_parser()
    for cmd in (["generate"], ["predict"]):
        a = p.parse_args([*cmd, "--data", "d", "--out", "o", "--quantization", "int8", "--compute-dtype", "float32"])
        assert (a.quantization, a.compute_dtype) == ("int8", "float32")
    a = p.parse_args(["train", "dpo", "c.yaml", "--quantization", "nf4"])
    assert a.quantization == "nf4" and a.compute_dtype is None
    with pytest.raises(SystemExit):
        p.parse_args(["predict", "--data", "d", "--out", "o", "--quantization", "fp4"])


def test_load_model_refuses_unknown_values(tdata):
    from raydpo.models import load_model

    with pytest.raises(RaydpoError, match="unknown quantization 'q4'"):
        load_model(tdata["base"], quantization="q4")
    with pytest.raises(RaydpoError, match="unknown compute dtype 'int4'"):
        load_model(tdata["base"], quantization="nf4", compute_dtype="int4")


# --- loading -------------------------------------------------------------------------------------------


def _logps(model, tok, frame, with_negatives=True):
    from raydpo.training.data import PackedCollator, packed_logps, tokenize_frame

    ex = tokenize_frame(frame.reset_index(drop=True), tok, max_length=1024, with_negatives=with_negatives)
    batch = PackedCollator(tok.pad_token_id, share_prompt=False)(ex)
    was = model.training
    model.eval()
    with torch.no_grad():
        lp = packed_logps(model, batch)
    model.train(was)
    return torch.cat([lp[i, : len(e["responses"])] for i, e in enumerate(ex)])


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantised_tiny_loads_and_scores_close_to_fp32(tdata, quantization):
    import bitsandbytes as bnb

    from raydpo.models import load_model

    frame = tdata["frame1"].iloc[:4]
    ref_model, tok = load_model(tdata["base"])
    q_model, _ = load_model(tdata["base"], quantization=quantization, compute_dtype="bfloat16")
    kind = bnb.nn.Linear4bit if quantization == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(q_model.model.layers[0].self_attn.q_proj, kind)
    assert q_model.model.norm.weight.dtype == torch.float32  # unquantised modules stay fp32
    a, b = _logps(ref_model, tok, frame), _logps(q_model, tok, frame)
    # a random-init model scores every title at about -log(vocab) per token: quantisation moves it a little
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.05 * a.abs().max()


def test_quantised_weights_survive_eval_then_state_dict(tdata):
    """bitsandbytes 0.50.2 repacks 4-bit weights for a faster CPU kernel on the first no-grad
    eval forward, and state_dict() unpacks them lossily; raydpo pins one kernel path."""
    from raydpo.models import load_model

    frame = tdata["frame1"].iloc[:4]
    model, tok = load_model(tdata["base"], quantization="nf4", compute_dtype="bfloat16")
    first = _logps(model, tok, frame)
    model.state_dict()  # what every adapter save and checkpoint does
    assert torch.equal(first, _logps(model, tok, frame))


# --- training: SFT, DPO, S-DPO and the reference choices on a quantised base -----------------------------


def _probe_matches(base: str, run: Path, name: str, quantization: str) -> None:
    from raydpo.models import load_model

    info = json.loads((run / "stages" / name / "stage.json").read_text())
    frame = pd.read_parquet(run / "data" / f"{name}.parquet")
    model, tok = load_model(base, adapter=info["adapter"], quantization=quantization, compute_dtype="bfloat16")
    got = _logps(model, tok, frame.iloc[: len(info["probe_logps"])], with_negatives=info["kind"] == "preference")
    assert torch.equal(got, flat(info["probe_logps"])), name  # the same kernels: the same numbers


def test_nf4_tiny_sft_dpo_sdpo_and_every_reference(tdata, tmp_path):
    """QLoRA on the tiny model in this process: SFT (new LoRA) -> DPO (TRL; reference: a frozen
    copy of the SFT adapter on the same 4-bit base) -> S-DPO (reference: the SFT stage) -> DPO
    with a precomputed reference -> S-DPO with the adapter disabled. Every LoRA tensor changes in
    every stage, stays fp32, and a saved adapter reloaded on a fresh 4-bit base gives exactly the
    trained model's log-probs."""
    from raydpo.training import run_plan
    from raydpo.training.common import ModelState, WorkerContext, load_policy
    from raydpo.training.config import LoraSettings

    out = tmp_path / "run"
    common = {"epochs": 1, "batch_size": 8, "max_rows": 16}
    plan = {"model": {"name_or_path": tdata["base"], "quantization": "nf4", "compute_dtype": "bfloat16"},
            "dataset": tdata["data_dir"], "output_dir": str(out), "ray": {"num_workers": 0},
            "stages": [
                {"kind": "sft", "name": "sft", "data": tdata["data_dir"], "learning_rate": 2e-3, **common},
                {"kind": "preference", "name": "dpo", "data": tdata["prefs1"], "beta": 0.5, "learning_rate": 3e-3,
                 **common},
                {"kind": "preference", "name": "sdpo", "data": tdata["prefs3"], "loss": "sdpo", "beta": 0.5,
                 "learning_rate": 2e-3, "reference": "stage:sft", "eval_data": tdata["prefs3_eval"], **common},
                {"kind": "preference", "name": "pre", "data": tdata["prefs1"], "reference": "precomputed",
                 "learning_rate": 2e-3, **common},
                {"kind": "preference", "name": "off", "data": tdata["prefs3"], "loss": "sdpo",
                 "reference": "adapter_disabled", "learning_rate": 2e-3, **common},
            ]}
    res = run_plan(plan)
    assert all(math.isfinite(m["loss"]) for m in res.metrics)
    policy, _ = load_policy(ModelState(base=tdata["base"]), lora=LoraSettings(), dtype="auto",
                            ctx=WorkerContext(run_dir=Path(".")), seed=0, quantization="nf4", compute_dtype="bfloat16")
    from peft import get_peft_model_state_dict

    before = {k: v.detach().clone() for k, v in get_peft_model_state_dict(policy).items()}
    for name in ("sft", "dpo", "sdpo", "pre", "off"):
        after = adapter_tensors(Path(res.stages[name]) / "adapter")
        assert_all_changed(before, after)
        assert all(v.dtype == torch.float32 and "lora_" in k for k, v in after.items()), name
        before = after
        _probe_matches(tdata["base"], out, name, "nf4")
    # DPO continued the SFT adapter with a frozen copy of it as reference: the first step starts at margin 0;
    # S-DPO (reference: the SFT stage) started from the DPO adapter: already away from its reference
    assert abs(res.stage_metrics("sdpo")[0]["reward_margin"]) > 0
    assert math.isfinite(res.stage_metrics("sdpo")[0]["eval_loss"])
    stage = json.loads((out / "plan.json").read_text())
    assert stage["model"]["quantization"] == "nf4"


def test_int8_tiny_sft_then_sdpo(tdata, tmp_path):
    from raydpo.training import run_plan

    out = tmp_path / "run"
    res = run_plan({"model": {"name_or_path": tdata["base"], "quantization": "int8"}, "dataset": tdata["data_dir"],
                    "output_dir": str(out), "ray": {"num_workers": 0},
                    "stages": [{"kind": "sft", "name": "sft", "data": tdata["data_dir"], "max_rows": 8, "epochs": 1,
                                "batch_size": 8, "learning_rate": 2e-3},
                               {"kind": "preference", "name": "sdpo", "data": tdata["prefs3"], "loss": "sdpo",
                                "max_rows": 8, "epochs": 1, "batch_size": 8, "learning_rate": 2e-3}]})
    assert_all_changed(adapter_tensors(Path(res.stages["sft"]) / "adapter"),
                       adapter_tensors(Path(res.stages["sdpo"]) / "adapter"))
    _probe_matches(tdata["base"], out, "sdpo", "int8")


# --- generation and prediction on a quantised base ------------------------------------------------------


def test_nf4_candidates_and_predictions(tdata):
    from raydpo.generation.candidates import CandidateGenerator, DecodeConfig
    from raydpo.models import load_model

    ds = tdata["dataset"]
    model, tok = load_model(tdata["base"], quantization="nf4", compute_dtype="bfloat16")
    frame = ds.split("train").frame.iloc[:3]
    gen = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="diverse_beam", num_return_sequences=4,
                                                                  reference_logprobs=True, batch_size=3),
                             ds.instruction)
    c = gen.candidates(frame)
    for ids, lps, refs in zip(c["candidate_item_ids"], c["candidate_logprobs"], c["candidate_ref_logprobs"]):
        assert len(ids) == len(set(ids)) > 0 and all(0 <= i < len(ds.catalog) for i in ids)
        assert lps == pytest.approx(refs, abs=1e-2)  # beam scores == teacher forcing on the 4-bit model
    preds = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="greedy", constrained=False,
                                                                    max_new_tokens=6)).predictions(
        ds.split("test").frame.iloc[:2])
    assert [set(r) for r in preds] == [{"prompt", "prediction", "ground_truth"}] * 2


# --- the real model ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nf4_smollm2_135m_sft_dpo_sdpo(tdata, tmp_path):
    """QLoRA on the real SmolLM2-135M-Instruct (NF4, bf16 compute, as published): a few steps of
    SFT -> DPO -> S-DPO; every LoRA tensor changes, reloaded adapters give the same log-probs."""
    from raydpo.models import smollm2_135m_path
    from raydpo.training import run_plan

    base = str(smollm2_135m_path())
    out = tmp_path / "run"
    common = {"epochs": 1, "batch_size": 2, "max_rows": 4, "learning_rate": 1e-3}
    lora = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}  # the 1.7B headline LoRA
    res = run_plan({"model": {"name_or_path": base, "quantization": "nf4", "compute_dtype": "bfloat16"},
                    "dataset": tdata["data_dir"], "output_dir": str(out), "ray": {"num_workers": 0},
                    "stages": [{"kind": "sft", "name": "sft", "data": tdata["data_dir"], "lora": lora, **common},
                               {"kind": "preference", "name": "dpo", "data": tdata["prefs1"], **common},
                               {"kind": "preference", "name": "sdpo", "data": tdata["prefs3"], "loss": "sdpo",
                                "reference": "start", **common}]})
    prev = None
    for name in ("sft", "dpo", "sdpo"):
        after = adapter_tensors(Path(res.stages[name]) / "adapter")
        assert len(after) == 2 * 2 * 30  # A and B of q_proj and v_proj in 30 layers
        if prev is not None:
            assert_all_changed(prev, after)
        prev = after
        _probe_matches(base, out, name, "nf4")
    assert all(math.isfinite(m["loss"]) for m in res.metrics)
