"""Shared fixtures and helpers of tests/test_training.py and tests/test_training_ray.py (no tests here)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

N_USERS, N_ITEMS = 160, 120


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """One torch thread while these tests run: on a small shared machine two OpenMP threads
    competing with other processes run ~10x slower than one."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tdata(tmp_path_factory):
    """A small synthetic dataset on disk, its tiny model folder, and preference files:
    ``prefs1`` (one random negative per row), ``prefs3`` (1..3 negatives per row)."""
    from raydpo.data.synthetic import SyntheticConfig, generate
    from raydpo.models import resolve_model_path
    from raydpo.training.data import random_preferences

    root = tmp_path_factory.mktemp("training")
    ds = generate(SyntheticConfig(n_users=N_USERS, n_items=N_ITEMS, seed=11))
    ds.save(root / "data")
    base = resolve_model_path("tiny", catalog=ds.catalog)
    p1 = random_preferences(ds, n_negatives=1, seed=1, limit=48)
    p3 = random_preferences(ds, n_negatives=3, variable=True, seed=2, limit=48)
    p1.to_parquet(root / "prefs1.parquet")
    p3.to_parquet(root / "prefs3.parquet")
    p3.iloc[40:].reset_index(drop=True).to_parquet(root / "prefs3_eval.parquet")
    return {"root": root, "dataset": ds, "data_dir": str(root / "data"), "base": base,
            "prefs1": str(root / "prefs1.parquet"), "prefs3": str(root / "prefs3.parquet"),
            "prefs3_eval": str(root / "prefs3_eval.parquet"), "frame1": p1, "frame3": p3}


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def fresh_lora_tensors(base: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The LoRA weights a stage with ``seed`` starts from (same seeding as load_policy)."""
    from peft import get_peft_model_state_dict

    from raydpo.training.common import ModelState, WorkerContext, load_policy
    from raydpo.training.config import LoraSettings

    model, _ = load_policy(ModelState(base=base), lora=LoraSettings(), dtype="auto",
                           ctx=WorkerContext(run_dir=Path(".")), seed=seed)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def assert_all_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert before.keys() == after.keys() and len(after) > 0
    same = [k for k in after if torch.equal(before[k], after[k])]
    assert not same, f"{len(same)} of {len(after)} LoRA tensors did not change, e.g. {same[:3]}"


def probe_logps_of(base: str, adapter: str, frame, stage_json: dict, tokenizer_max: int = 1024) -> torch.Tensor:
    """Response log-probs of the probe rows (the first training rows) under base + adapter."""
    from raydpo.models import load_model
    from raydpo.training.data import PackedCollator, packed_logps, tokenize_frame

    model, tok = load_model(base, adapter=adapter)
    n = len(stage_json["probe_logps"])
    ex = tokenize_frame(frame.iloc[:n].reset_index(drop=True), tok, max_length=tokenizer_max,
                        with_negatives=stage_json["kind"] == "preference")
    batch = PackedCollator(tok.pad_token_id, share_prompt=False)(ex)
    with torch.no_grad():
        lp = packed_logps(model, batch)
    return torch.cat([lp[i, : len(e["responses"])] for i, e in enumerate(ex)])


def flat(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for row in values for x in row])
