"""raydpo.training on Ray Train: the tiny model on 2 CPU workers (gloo), plain DDP, DeepSpeed
ZeRO-2 and ZeRO-3, a worker killed mid-run, a curriculum and the SPRec loop. All slow."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_training_helpers import (  # noqa: F401 - fixtures
    adapter_tensors,
    assert_all_changed,
    flat,
    fresh_lora_tensors,
    probe_logps_of,
    tdata,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BASE_WEIGHT = re.compile(r"(embed_tokens|lm_head|(q|k|v|o|gate|up|down)_proj)\.weight$")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


def assert_no_base_weights(ckpt: Path) -> int:
    """No frozen base weight (a non-LoRA projection, the embeddings) with data in any checkpoint
    file; returns the number of tensor elements in the checkpoint."""
    from safetensors.torch import load_file

    total = 0
    for f in ckpt.rglob("*"):
        if f.suffix == ".safetensors":
            items = load_file(str(f)).items()
        elif f.suffix in (".pt", ".pth", ".bin"):
            items = _tensors(torch.load(f, map_location="cpu", weights_only=False))
        else:
            continue
        for key, t in items:
            total += t.numel()
            if BASE_WEIGHT.search(key) and "lora_" not in key:
                assert t.numel() == 0, f"{f.name}: base weight {key} ({t.numel()} values) in the checkpoint"
    return total


def _plan(tdata, tmp_path, stages, **ray):
    return {"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"], "output_dir": str(tmp_path / "run"),
            "stages": stages, "ray": {"num_workers": 2, **ray}}


def test_ddp_dpo_two_workers(ray_session, tdata, tmp_path):
    """DPO through TRL on 2 gloo workers: per-epoch metrics reach Ray Train, the loss falls,
    every LoRA weight changes, checkpoints hold the adapter only, and both the final adapter
    and the last Ray checkpoint reload to the trained model's log-probs."""
    from ray.train import Result

    from raydpo.training import run_plan

    res = run_plan(_plan(tdata, tmp_path, [
        {"kind": "preference", "name": "dpo", "data": tdata["prefs1"], "loss": "sigmoid", "beta": 0.5, "epochs": 3,
         "batch_size": 4, "learning_rate": 3e-3, "max_rows": 32}], checkpoint_keep=None))
    m = res.stage_metrics("dpo")
    assert [r["epoch"] for r in m] == [1.0, 2.0, 3.0] and [r["step"] for r in m] == [4, 8, 12]
    assert m[-1]["loss"] < m[0]["loss"] and m[-1]["reward_margin"] > m[0]["reward_margin"]
    ray_metrics = Result.from_path(res.ray_result_path).metrics_dataframe
    assert len(ray_metrics) == 3 and {"loss", "reward_accuracy", "reward_margin"} <= set(ray_metrics.columns)
    final = adapter_tensors(res.adapter_path)
    assert_all_changed(fresh_lora_tensors(tdata["base"], seed=0), final)
    ckpt = Path(res.checkpoint_path)
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
            "raydpo_state.json"} <= {p.name for p in ckpt.iterdir()}
    assert_no_base_weights(ckpt)
    info = json.loads((Path(res.stages["dpo"]) / "stage.json").read_text())
    frame = pd.read_parquet(Path(res.output_dir) / "data" / "dpo.parquet")
    expected = flat(info["probe_logps"])
    assert torch.allclose(probe_logps_of(tdata["base"], res.adapter_path, frame, info), expected, atol=1e-4)
    assert torch.allclose(probe_logps_of(tdata["base"], str(ckpt), frame, info), expected, atol=1e-4)


def test_zero2_sdpo_resumes_after_a_worker_is_killed(ray_session, tdata, tmp_path):
    """DeepSpeed ZeRO-2, S-DPO with 1..3 negatives; rank 1 dies (os._exit) at step 6 of 8 on the
    first attempt; Ray Train restarts the workers and the stage resumes from the epoch-1
    checkpoint (step 4), not from 0, and finishes."""
    from raydpo.training import run_plan

    plan = _plan(tdata, tmp_path, [
        {"kind": "preference", "name": "sdpo", "data": tdata["prefs3"], "loss": "sdpo", "beta": 0.5, "epochs": 2,
         "batch_size": 4, "learning_rate": 3e-3, "max_rows": 32}],
        deepspeed="zero2", max_failures=1, fail_at_step=6, fail_rank=1)
    res = run_plan(plan)
    run = Path(res.output_dir)
    assert (run / ".raydpo_failure_injected").read_text().startswith("sdpo step 6")
    m = res.stage_metrics("sdpo")
    assert [r["step"] for r in m] == [4, 8]
    assert m[0]["resumed_from_step"] == 0 and m[1]["resumed_from_step"] == 4
    assert all(math.isfinite(r["loss"]) for r in m)
    info = json.loads((Path(res.stages["sdpo"]) / "stage.json").read_text())
    assert info["resumed_from"] is True
    assert_all_changed(fresh_lora_tensors(tdata["base"], seed=0), adapter_tensors(res.adapter_path))
    ckpt = Path(res.checkpoint_path)
    ds_files = {p.name for p in (ckpt / "global_step8").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= ds_files
    assert_no_base_weights(ckpt)
    frame = pd.read_parquet(run / "data" / "sdpo.parquet")
    assert torch.allclose(probe_logps_of(tdata["base"], res.adapter_path, frame, info), flat(info["probe_logps"]),
                          atol=1e-4)


def test_zero3_curriculum(ray_session, tdata, tmp_path):
    """A curriculum on ZeRO-3: SFT -> DPO (reference: the previous stage) -> S-DPO (reference:
    the SFT stage), each stage starting from the previous stage's adapter."""
    from raydpo.training import run_curriculum

    res = run_curriculum(_plan(tdata, tmp_path, [
        {"kind": "sft", "name": "sft", "data": tdata["data_dir"], "max_rows": 16, "epochs": 1, "batch_size": 4,
         "learning_rate": 3e-3},
        {"kind": "preference", "name": "dpo", "data": tdata["prefs1"], "loss": "sigmoid", "beta": 0.5,
         "max_rows": 16, "epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "reference": "previous"},
        {"kind": "preference", "name": "sdpo", "data": tdata["prefs3"], "loss": "sdpo", "beta": 0.5,
         "max_rows": 16, "epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "reference": "stage:sft"}],
        deepspeed="zero3"))
    a = {n: adapter_tensors(Path(res.stages[n]) / "adapter") for n in ("sft", "dpo", "sdpo")}
    assert_all_changed(fresh_lora_tensors(tdata["base"], seed=0), a["sft"])
    assert_all_changed(a["sft"], a["dpo"])
    assert_all_changed(a["dpo"], a["sdpo"])
    for n in ("sft", "dpo", "sdpo"):
        (r,) = res.stage_metrics(n)
        assert math.isfinite(r["loss"]) and r["step"] == 2
        info = json.loads((Path(res.stages[n]) / "stage.json").read_text())
        assert info["start"]["adapter"] == (None if n == "sft" else str(Path(res.stages[
            {"dpo": "sft", "sdpo": "dpo"}[n]]) / "adapter"))
        frame = pd.read_parquet(Path(res.output_dir) / "data" / f"{n}.parquet")
        got = probe_logps_of(tdata["base"], info["adapter"], frame, info)
        assert torch.allclose(got, flat(info["probe_logps"]), atol=1e-4), n  # ZeRO-3 gathered the right weights
    # DPO's reference is the SFT model it starts from (margins start at 0); S-DPO's reference is
    # the SFT model, not the DPO model it starts from, so its margins are not 0 from the start
    assert res.stage_metrics("sdpo")[0]["reward_margin"] != 0
    assert_no_base_weights(Path(res.checkpoint_path))


def test_sprec_loop(ray_session, tdata, tmp_path):
    """One SPRec iteration on 2 workers: self-play negatives from the current model (catalog
    titles, never the target or a history item), SFT on the rows, DPO on the pairs."""
    from raydpo.training import run_sprec

    res = run_sprec({"model": {"name_or_path": tdata["base"]}, "dataset": tdata["data_dir"],
                     "output_dir": str(tmp_path / "run"), "iterations": 1,
                     "selfplay": {"n_samples": 16, "decode": {"batch_size": 8}},
                     "sft": {"epochs": 1, "batch_size": 4, "learning_rate": 3e-3},
                     "dpo": {"epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "beta": 0.5},
                     "ray": {"num_workers": 2}})
    assert list(res.stages) == ["it0-selfplay", "it0-sft", "it0-dpo"]
    prefs = pd.read_parquet(Path(res.stages["it0-selfplay"]) / "preferences.parquet")
    ds = tdata["dataset"]
    samples = ds.split("train").frame.set_index("sample_id")
    assert len(prefs) == 16 and prefs["sample_id"].is_unique
    for _, r in prefs.iterrows():
        (neg,) = r["rejected"]
        title = neg[1:-1]
        s = samples.loc[r["sample_id"]]
        assert neg != r["chosen"] and title in ds.catalog.title_to_id
        assert title not in set(s["history_titles"]) and r["chosen"] == f'"{s["target_title"]}"'
    sft = adapter_tensors(Path(res.stages["it0-sft"]) / "adapter")
    dpo = adapter_tensors(Path(res.stages["it0-dpo"]) / "adapter")
    assert_all_changed(fresh_lora_tensors(tdata["base"], seed=0), sft)
    assert_all_changed(sft, dpo)
    assert adapter_tensors(res.adapter_path).keys() == dpo.keys()
    assert [m["stage"] for m in res.metrics] == ["it0-sft", "it0-dpo"]
    # DPO starts from the SFT adapter with the SFT model as reference
    info = json.loads((Path(res.stages["it0-dpo"]) / "stage.json").read_text())
    assert info["start"]["adapter"] == str(Path(res.stages["it0-sft"]) / "adapter")


def test_too_many_workers_is_a_clear_error(ray_session, tdata, tmp_path):
    from raydpo.errors import RaydpoError
    from raydpo.training import run_plan

    with pytest.raises(RaydpoError, match=r"3 workers x 1.0 CPUs = 3.0 CPUs, but the Ray cluster has 2"):
        run_plan(_plan(tdata, tmp_path, [{"kind": "preference", "data": tdata["prefs1"]}], num_workers=3))
