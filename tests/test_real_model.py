"""The shipped Goodreads + SmolLM2-135M CPU configs (issue 12), end to end with the real model on a
handful of users: data, SFT, diverse-beam candidates, negatives (selfplay and clusterout_low),
DPO against the frozen SFT adapter, constrained bf16 prediction and evaluation.

The configs themselves are loaded (with ``--set``-style overrides that only shrink the sizes and
move the outputs into tmp_path), so a change that breaks them breaks this test. The full-size runs
and their numbers are in docs/results.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import GOODREADS, ROOT, require_shared

N_TRAIN, N_TEST = 4, 4


def _sets(run_dir: Path, *extra: str) -> dict:
    from raydpo.cli_args import parse_sets

    # the shipped config, shrunk to a handful of users (the same flags `raydpo run --set` takes);
    # SFT in micro-batches of 1 so that the test fits next to other work in memory
    return parse_sets([[f"data.path={GOODREADS}", f"run_dir={run_dir}", f"sft.max_rows={N_TRAIN}",
                        "sft.batch_size=1", f"sft.grad_accum={N_TRAIN}", f"generation.limit={N_TRAIN}",
                        f"alignment.max_rows={N_TRAIN}", f"prediction.limit={N_TEST}", *extra]])


def _adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    (f,) = folder.glob("adapter_model.safetensors")
    return load_file(f)


def _check_run(run_dir: Path, summaries: dict, strategy: str) -> dict:
    from raydpo.data import load_dataset

    assert set(summaries) == {"data", "sft", "generate", "sample", "align", "predict", "evaluate"}
    stage = {s: run_dir / s / summaries[s]["key"] for s in summaries}
    for s, d in stage.items():
        assert (d / "_SUCCESS").is_file(), s
    # candidates: catalog titles for every selected train row
    gen = summaries["generate"]
    assert gen["rows"] == N_TRAIN and gen["candidates"] > 0
    # negatives of the requested strategy, one per usable record
    (name,) = summaries["sample"]["datasets"]
    assert name == f"train/{strategy}-n1"
    assert 0 < summaries["sample"]["datasets"][name]["records"]["out"] <= N_TRAIN
    # alignment trained the SFT adapter further: same tensors, different values
    sft = _adapter_tensors(stage["sft"] / "adapter")
    aligned = _adapter_tensors(stage["align"] / "adapter")
    assert sft.keys() == aligned.keys() and sft
    assert any(not (sft[k] == aligned[k]).all() for k in sft), "DPO left the SFT adapter unchanged"
    assert all(v.isfinite().all() for v in aligned.values())
    # a prediction for every test row, each a catalog title (constrained decoding)
    preds = json.loads((stage["predict"] / "predictions" / "predictions.json").read_text())
    assert len(preds) == N_TEST
    catalog = set(load_dataset(stage["data"] / "dataset").catalog.titles)
    texts = [r["prediction"].strip() for r in preds]
    assert all(t.startswith('"') and t.endswith('"') and t[1:-1] in catalog for t in texts), texts
    # every metric finite, ratios in [0, 1]
    metrics = json.loads((stage["evaluate"] / "metrics.json").read_text())
    assert set(map(str, metrics)) >= {"5", "10"}
    for k, row in metrics.items():
        for m, v in row.items():
            assert isinstance(v, (int, float)) and math.isfinite(v), (k, m, v)
        for m in ("NDCG", "HR", "DivRatio", "ORRatio"):
            assert 0 <= row[m] <= 1, (k, m, row[m])
        assert row["Predict_NotIn_Ratio"] == 0  # constrained: every prediction is a catalog title
    return stage


def test_cpu_configs_load_and_their_size_fields_key_only_their_stages():
    """The two shipped configs validate and differ only in the model; sft.max_rows,
    alignment.max_rows and prediction.dtype change the keys of their own stage and downstream only,
    and leave earlier runs' keys unchanged while unset."""
    from raydpo.config import load_config, with_overrides
    from raydpo.pipeline import STAGES, stage_keys, stage_params

    lora = load_config(ROOT / "configs" / "goodreads_smollm2_cpu.yaml")
    nf4 = load_config(ROOT / "configs" / "goodreads_smollm2_cpu_nf4.yaml")
    assert (lora.model.quantization, nf4.model.quantization) == ("none", "nf4")
    assert not nf4.model.quantize_inference  # decodes on the unquantised base, as published
    for section in ("sft", "generation", "sampling", "alignment", "prediction", "evaluation", "ray"):
        assert getattr(lora, section) == getattr(nf4, section), section
    assert lora.prediction.mode == "constrained" and lora.prediction.limit is None  # all test users
    base = stage_keys(lora)
    for field, value, first in (("sft.max_rows", 3, "sft"), ("alignment.max_rows", 3, "align"),
                                ("prediction.dtype", "float32", "predict")):
        changed = stage_keys(with_overrides(lora, {field: value}))
        i = STAGES.index(first)
        assert all(changed[s] == base[s] for s in STAGES[:i]), field
        assert all(changed[s] != base[s] for s in STAGES[i:]), field
    unset = with_overrides(lora, {"sft.max_rows": None, "alignment.max_rows": None, "prediction.dtype": None})
    params = {s: stage_params(unset, s) for s in STAGES}
    assert "max_rows" not in params["sft"]["sft"] and "max_rows" not in params["align"]["alignment"]
    assert "dtype" not in params["predict"]["prediction"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["goodreads_smollm2_cpu.yaml", "goodreads_smollm2_cpu_nf4.yaml"])
def test_shipped_cpu_config_end_to_end_on_a_handful_of_users(ray_local, tmp_path, config):
    require_shared()
    if "nf4" in config:
        pytest.importorskip("bitsandbytes")
    from raydpo.config import load_config
    from raydpo.pipeline import run_pipeline

    path = ROOT / "configs" / config
    run_dir = tmp_path / "run"
    first = run_pipeline(load_config(path, _sets(run_dir)), progress=False)
    stage = _check_run(run_dir, first, "selfplay")
    assert load_config(path).model.quantization == ("nf4" if "nf4" in config else "none")
    if "nf4" in config:
        return  # the second strategy adds nothing quantisation-specific
    # the second strategy reuses data, SFT and candidates, and trains its own alignment
    second = run_pipeline(load_config(path, _sets(run_dir, "sampling.strategy=clusterout_low")), progress=False)
    for s in ("data", "sft", "generate"):
        assert second[s]["key"] == first[s]["key"], s
    assert second["align"]["key"] != first["align"]["key"]
    stage2 = _check_run(run_dir, second, "clusterout_low")
    a1 = _adapter_tensors(stage["align"] / "adapter")
    a2 = _adapter_tensors(stage2["align"] / "adapter")
    assert any(not (a1[k] == a2[k]).all() for k in a1), "two strategies gave identical adapters"
