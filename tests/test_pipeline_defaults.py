"""One short pipeline run through the paths the other pipeline tests leave out: the defaults
(LoRA SFT, diverse-beam candidates, greedy prediction) and a curriculum (``alignment.stages``,
``reference: previous_stage``) whose stages train with the ``sdpo`` and ``dsdpo`` losses."""

import json
from pathlib import Path

import numpy as np
import pytest

from raydpo.config import load_config
from raydpo.pipeline import run_pipeline, stage_keys
from raydpo.storage import resolve_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_defaults_and_a_sdpo_dsdpo_curriculum(ray_local, tmp_path):
    emb = tmp_path / "item_emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(40, 8)))  # one row per catalog item
    cfg_path = tmp_path / "config.yaml"
    # sft / generation / prediction: no mode or LoRA settings, so the defaults run
    cfg_path.write_text(f"""name: defaults
run_dir: {tmp_path / 'runs'}
data:
  source: synthetic
  synthetic: {{n_users: 80, n_items: 40, n_genres: 4, seed: 2}}
sft: {{epochs: 1, learning_rate: 0.003, batch_size: 16, max_rows: 32}}
generation: {{num_return_sequences: 3, batch_size: 32, limit: 24, splits: [train]}}
sampling: {{strategy: random, n_negatives: 2}}
alignment:
  reference: previous_stage
  batch_size: 8
  learning_rate: 0.0005
  max_rows: 16
  dsdpo: {{embeddings: {emb}, distance: dp}}
  stages:
    - {{name: first, loss: sdpo, strategy: random, n_negatives: 2}}
    - {{name: second, loss: dsdpo, strategy: random, n_negatives: 2, beta: 0.2}}
prediction: {{batch_size: 16, limit: 8}}
evaluation: {{split: valid, ks: [5]}}
ray: {{num_workers: 1, cpus_per_worker: 0.5, shard_size: 24}}
""")
    cfg = load_config(cfg_path)
    assert (cfg.sft.full_finetune, cfg.generation.mode, cfg.prediction.mode) == (False, "diverse_beam", "greedy")
    assert cfg.generation.num_beams is None and cfg.alignment.dsdpo.mapping == "linear"  # dp: the research code's
    out = run_pipeline(cfg, progress=False)
    # the keys of the config as run_pipeline resolves it (absolute paths)
    run_dir, keys = Path(cfg.run_dir), stage_keys(resolve_config(cfg))

    # LoRA SFT: the stage publishes an adapter, not a full model
    sft = run_dir / "sft" / keys["sft"]
    assert (sft / "adapter" / "adapter_config.json").exists() and not (sft / "model").exists()
    # diverse beam search: 2n beams in n groups, every candidate a catalog item, the history and
    # target excluded
    from raydpo.generation.distributed import read_candidates

    cands = read_candidates(run_dir / "generate" / keys["generate"] / "candidates")
    assert len(cands) == 24 and all(0 < len(c) <= 3 for c in cands["candidate_item_ids"])
    assert all(i >= 0 for c in cands["candidate_item_ids"] for i in c)
    gen_cfg = json.loads((run_dir / "generate" / keys["generate"] / "config.json").read_text())
    assert "diverse_beam" in json.dumps(gen_cfg)

    # the curriculum: two stages, the second starting from (and referenced to) the first
    align = run_dir / "align" / keys["align"]
    plan = json.loads((align / "train" / "plan.json").read_text())
    st = plan["stages"]
    assert [(x["name"], x["loss"], x["reference"]) for x in st] == [("first", "sdpo", "initial"),
                                                                     ("second", "dsdpo", "initial")]
    assert st[1]["dsdpo"]["distance"] == "dp" and st[1]["dsdpo"]["mapping"] == "linear"
    assert (align / "train" / "stages" / "first").is_dir() and (align / "train" / "stages" / "second").is_dir()
    assert (align / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(line) for line in (align / "train" / "metrics.jsonl").read_text().splitlines() if line]
    assert {0, 1} <= {r.get("stage_index") for r in rows}  # both stages trained and logged
    losses = [v for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))]
    assert losses and np.isfinite(losses).all()

    # greedy prediction: free text, one per user of the limit
    preds = json.loads((run_dir / "predict" / keys["predict"] / "predictions" / "predictions.json").read_text())
    assert len(preds) == 8 and all("prediction" in p for p in preds)
    metrics = out["evaluate"]["metrics"]
    assert set(metrics) == {"5"} and 0.0 <= metrics["5"]["NDCG"] <= 1.0
