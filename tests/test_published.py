"""configs/published/: every published setup loads and validates with method.md's hyper-parameters
(fast), and with the model swapped for `tiny`, synthetic data and a few users each runs through
its stages, two of them fully through jobs/published.py and `raydpo report` (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from raydpo.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "configs" / "published"
FILES = sorted(PUBLISHED.rglob("*.yaml"))
NINE = {"balanced_popularity", "clusterin_high", "clusterin_low", "low_exposure", "high_exposure", "clusterout_low",
        "clusterout_high", "clusterin_high_clusterout_low", "clusterin_low_clusterout_low"}
PAIRS = {"balanced_popularity", "clusterin_high_clusterout_low", "clusterin_low_clusterout_low"}


def _job():
    spec = importlib.util.spec_from_file_location("published_job", ROOT / "jobs" / "published.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_published_config_loads():
    assert len(FILES) >= 20
    for f in FILES:
        cfg = load_config(f)
        assert cfg.name == f"{f.parent.name}-{f.stem}"
        assert cfg.run_dir == f"runs/published/{f.parent.name}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_published_hyperparameters(path):
    """method.md 1 (data), 2.1 (QLoRA SFT), 3.4 (candidates), 6.1-6.3 (DPO, S-DPO, DS-DPO), 7, 8."""
    c = load_config(path)
    m, s, g, a, r = c.model, c.sft, c.generation, c.alignment, c.ray
    assert (m.quantization, m.compute_dtype, m.quantize_inference, m.dtype) == ("nf4", "bfloat16", False, "float32")
    assert c.data.source == "path" and c.data.fetch == "goodreads"
    assert (s.lora.r, s.lora.alpha, s.lora.dropout, s.max_length) == (16, 32, 0.05, 512) and not s.full_finetune
    assert g.mode == "diverse_beam" and g.diversity_penalty == 1.0 and g.splits == ["train", "valid"]
    assert (a.beta, a.max_length, a.reference) == (0.1, 512, "previous_stage")  # the frozen SFT adapter
    assert (c.prediction.mode, c.prediction.max_new_tokens) == ("greedy", 50)
    assert (c.evaluation.split, c.evaluation.ks, c.evaluation.protocol) == ("test", [5, 10], "reference")
    # GPU resources where used: Ray Train workers and the decoding actors
    assert r.use_gpu and r.gpus_per_actor == 1 and r.num_workers == 1
    if path.parent.name == "smollm2-1.7b":
        assert m.name_or_path == "HuggingFaceTB/SmolLM2-1.7B-Instruct"
        assert (s.epochs, s.learning_rate, s.batch_size, s.grad_accum, s.warmup_steps) == (5, 2e-5, 2, 2, 2)
        assert s.lora.target_modules == ["q_proj", "v_proj"]
        if a.loss == "sigmoid":  # TRL DPO: batch 2 x GA 4, lr 1e-5, 20 warm-up steps, 1 epoch
            assert (a.batch_size, a.grad_accum, a.learning_rate, a.warmup_steps, a.epochs) == (2, 4, 1e-5, 20, 1)
        else:  # S-DPO / DS-DPO: batch 1 x GA 8, lr 1e-5, no warm-up
            assert (a.batch_size, a.grad_accum, a.learning_rate, a.warmup_steps) == (1, 8, 1e-5, 0)
        n = 5 if c.sampling.strategy == "top_n" else 10  # Div_5_1.0 / Div_10_1.0
        assert g.num_return_sequences == n
        if c.sampling.strategy == "top_n":
            assert c.sampling.n_negatives == 5
        if c.sampling.strategy in PAIRS:
            assert a.loss == "sdpo"
    else:  # the 2025-12 360M / Llama configs
        assert m.name_or_path in ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct",
                                  "meta-llama/Llama-3.2-1B-Instruct")
        assert (s.epochs, s.learning_rate, s.batch_size, s.grad_accum) == (4, 2e-4, 4, 16)
        assert len(s.lora.target_modules) == 7 and g.num_return_sequences == 50
        assert (a.loss, a.epochs, a.learning_rate, a.grad_accum) == ("sigmoid", 2, 2e-5, 16)


def test_published_setups_are_complete():
    main = [load_config(f) for f in FILES if f.parent.name == "smollm2-1.7b"]
    single = {c.sampling.strategy for c in main if not c.alignment.stages}
    assert NINE <= single and "selfplay" in single and "top_n" in single
    two_epochs = [c for c in main if c.alignment.loss == "sdpo" and c.alignment.epochs == 2
                  and c.sampling.strategy in PAIRS]
    assert len(two_epochs) == 2
    stages = [[st.strategy for st in c.alignment.stages] for c in main if c.alignment.stages]
    assert sorted(stages) == [["clusterout_low", "clusterin_high"], ["clusterout_low", "clusterin_low"]]
    ds = [c for c in main if c.alignment.loss == "dsdpo"]
    assert len(ds) == 1 and ds[0].alignment.dsdpo.distance == "dpc" and ds[0].generation.num_return_sequences == 5
    for setup in ("smollm2-135m", "smollm2-360m", "llama-3.2-1b"):
        assert {load_config(f).sampling.strategy for f in FILES if f.parent.name == setup} == {"clusterout_low",
                                                                                               "selfplay"}


def test_published_configs_share_their_upstream_stages():
    """One SFT model per setup, and one candidate set per beam width, through the pipeline cache."""
    from raydpo.pipeline import stage_keys

    by_setup: dict[str, set] = {}
    gens: dict[str, set] = {}
    for f in FILES:
        keys = stage_keys(load_config(f))
        by_setup.setdefault(f.parent.name, set()).add(keys["sft"])
        gens.setdefault(f.parent.name, set()).add(keys["generate"])
    assert all(len(v) == 1 for v in by_setup.values())
    assert len(gens["smollm2-1.7b"]) == 2  # Div_10_1.0 and Div_5_1.0


def test_published_job_lists_and_checks_configs():
    job = _job()
    assert [p.stem for p in job.configs_of("smollm2-135m")] == ["dpo-clusterout_low", "selfplay"]
    with pytest.raises(SystemExit, match="no config named"):
        job.configs_of("smollm2-1.7b", ["nope"])
    cmd = job._run_cmd(PUBLISHED / "smollm2-135m" / "selfplay.yaml", ["model.name_or_path=tiny"], "sample")
    assert cmd[-5:] == ["--until", "sample", "-q", "--set", "model.name_or_path=tiny"]


# --- every setup with the tiny model ----------------------------------------------------------------


def tiny_overrides(run_dir: Path) -> list[str]:
    """The published configs on a laptop: the tiny model (still NF4 QLoRA), 40 synthetic users,
    CPU workers, short decoding."""
    return [f"run_dir={run_dir}", "model.name_or_path=tiny", "data.source=synthetic", "data.path=null",
            "data.fetch=null", "data.synthetic.n_users=40", "data.synthetic.n_items=60", "data.synthetic.history_len=5",
            "sft.epochs=1", "sft.grad_accum=1", "sft.batch_size=8", "alignment.grad_accum=1",
            "alignment.warmup_steps=0", "alignment.batch_size=4", "generation.batch_size=16",
            "prediction.limit=6", "prediction.max_new_tokens=12", "ray.use_gpu=false", "ray.gpus_per_actor=0",
            "ray.cpus_per_worker=1", "ray.generation_actors=1"]


@pytest.mark.slow
def test_published_setups_run_with_tiny(tmp_path, ray_local):
    """Every published config, model swapped for `tiny`: all of them through negative sampling in
    one run folder (one SFT per setup's settings, one candidate set per beam width), then two
    (the two-stage curriculum and DS-DPO on Div_5 lists) through alignment, prediction and
    evaluation with jobs/published.py, which ends with `raydpo report`."""
    from raydpo.cli_args import parse_sets
    from raydpo.pipeline import run_pipeline

    run_dir = tmp_path / "published"
    sets = tiny_overrides(run_dir)
    overrides = parse_sets([sets])
    for f in FILES:
        cfg = load_config(f, overrides)
        summaries = run_pipeline(cfg, until="sample", progress=False)
        assert summaries["sample"]["datasets"], f
    # the SFT model of each setting was trained once (2 settings: the 1.7B recipe and the 2025-12 one)
    assert len(list((run_dir / "sft").glob("*/_SUCCESS"))) == 2
    assert len(list((run_dir / "generate").glob("*/_SUCCESS"))) == 3  # Div_10, Div_5, Div_50
    job = _job()
    env_before = dict(os.environ)
    try:
        os.environ["RAY_ADDRESS"] = ray_local.get_runtime_context().gcs_address  # the job's runs join this Ray
        report = job.run_setup("smollm2-1.7b", sets=sets, only=["two_stages-clusterout_low-clusterin_low",
                                                                  "dsdpo-dpc"])
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    text = report.read_text()
    assert "curriculum stage1-clusterout_low > stage2-clusterin_low" in text and "DS-DPO top_n x5" in text
    evals = list((run_dir / "evaluate").glob("*/_SUCCESS"))
    assert len(evals) == 2
    for done in evals:
        metrics = json.loads(done.read_text())["metrics"]
        assert {"5", "10"} <= set(metrics) and "NDCG" in metrics["10"]
    plan = json.loads(next((run_dir / "align").glob("*/train/plan.json")).read_text())
    assert plan["model"]["quantization"] == "nf4"
