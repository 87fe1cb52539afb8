"""The pipeline's training and sampling stages: pipeline config -> raydpo.training / raydpo.sampling.

Kept apart from ``raydpo.pipeline`` (which only orders, caches and resumes stages) so that each
side reads top to bottom; ``pipeline`` imports this module, never the other way round.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import PipelineConfig
from .io import atomic_path, write_json


def preference_sets(cfg: PipelineConfig) -> list[tuple[str, int]]:
    """The (strategy, n_negatives) preference datasets the alignment stages need."""
    s, a = cfg.sampling, cfg.alignment
    if not a.stages:
        return [(s.strategy, s.n_negatives)]
    sets = []
    for st in a.stages:
        key = (st.strategy or s.strategy, st.n_negatives or s.n_negatives)
        if key not in sets:
            sets.append(key)
    return sets


def preference_file(sample_dir: Path, split: str, strategy: str, n: int) -> Path:
    return Path(sample_dir) / split / f"{strategy}-n{n}.parquet"


def _ray_settings(cfg: PipelineConfig, out: Path):
    from .training.config import RayTrainSettings

    r = cfg.ray
    storage = f"{r.storage_path.rstrip('/')}/train/{out.parent.name}-{out.name}" if r.storage_path else None
    return RayTrainSettings(num_workers=r.num_workers, use_gpu=r.use_gpu, cpus_per_worker=r.cpus_per_worker,
                            deepspeed=r.deepspeed, max_failures=r.max_failures, storage_path=storage)


def model_settings(cfg: PipelineConfig, **kw):
    """The training plan's model: the pipeline's base, dtype and quantization (QLoRA)."""
    from .training.config import ModelSettings

    m = cfg.model
    return ModelSettings(**{"name_or_path": m.name_or_path, "dtype": m.dtype, "quantization": m.quantization,
                            "compute_dtype": m.compute_dtype, **kw})


def inference_quantization(cfg: PipelineConfig) -> dict:
    """How generation and prediction load the base: quantised like training unless
    ``model.quantize_inference`` is false (the published runs decoded in full precision)."""
    m = cfg.model
    if m.quantization == "none" or not m.quantize_inference:
        return {}
    return {"quantization": m.quantization, "compute_dtype": m.compute_dtype}


def _lora(cfg: PipelineConfig):
    from .training.config import LoraSettings

    lo = cfg.sft.lora
    kw = dict(r=lo.r, alpha=lo.alpha, dropout=lo.dropout)
    if lo.target_modules:
        kw["target_modules"] = list(lo.target_modules)
    return LoraSettings(**kw)


def _publish(result, out: Path) -> dict:
    """Copy the run's final adapter (or full model) to OUT/adapter (OUT/model), atomically."""
    if result.adapter_path:
        target, src = out / "adapter", Path(result.adapter_path)
    else:
        target, src = out / "model", Path(result.final_path)
    with atomic_path(target, kind="model") as tmp:
        shutil.copytree(src, tmp)
    # what to load: the base the adapter was trained on (for a curriculum after a full
    # fine-tuning stage, that is the fine-tuned model, not the preset)
    write_json(out / "model.json", {"name_or_path": result.base_model if result.adapter_path else str(target),
                                    "adapter": str(target) if result.adapter_path else None})
    last = result.metrics[-1] if result.metrics else {}
    return {"output": str(target), "elapsed_s": round(result.elapsed_s, 2),
            "final_metrics": {k: v for k, v in last.items() if isinstance(v, (int, float))}}


def train_sft(cfg: PipelineConfig, dataset_dir: Path, out: Path) -> dict:
    if not cfg.sft.enabled:
        return {"skipped": True}
    from .training.config import Plan, SFTConfig
    from .training.ray_train import run_plan

    s = cfg.sft
    stage = SFTConfig(name="sft", data=str(dataset_dir), split="train", epochs=s.epochs,
                      learning_rate=s.learning_rate, batch_size=s.batch_size, grad_accum=s.grad_accum,
                      warmup_steps=s.warmup_steps, max_length=s.max_length, seed=s.seed, max_rows=s.max_rows,
                      lora=None if s.full_finetune else _lora(cfg))
    plan = Plan(model=model_settings(cfg),
                dataset=str(dataset_dir), output_dir=str(out / "train"), stages=[stage], ray=_ray_settings(cfg, out))
    return _publish(run_plan(plan), out)


def sample_preferences(cfg: PipelineConfig, dataset_dir: Path, candidates_dir: Path, out: Path) -> dict:
    from .data import load_dataset
    from .generation.distributed import read_candidates
    from .sampling.annotate import annotate
    from .sampling.lightgcn import LightGCN, LightGCNConfig
    from .sampling.run import sample_to_file
    from .sampling.strategies import get_strategy

    s = cfg.sampling
    ds = load_dataset(dataset_dir)
    cands = read_candidates(candidates_dir)
    sets = preference_sets(cfg)
    # one LightGCN (trained on the train split) and one annotation per split serve every set
    lightgcn = (LightGCN.fit(ds, LightGCNConfig(seed=s.seed))
                if any(get_strategy(strategy).needs_embeddings for strategy, _ in sets) else None)
    summaries = {}
    for split in cfg.generation.splits:
        ids = set(ds.split(split).frame["sample_id"])
        part = cands[cands["sample_id"].isin(ids)].reset_index(drop=True)
        if part.empty:
            continue
        ann = annotate(ds, part, exposure_scope=s.exposure_scope, cluster_k=s.cluster_k,
                       ignore_genres=tuple(s.ignore_genres), ignore_genres_above=s.ignore_genres_above)
        for strategy, n in sets:
            (summary,) = sample_to_file(ds, ann, strategy, preference_file(out, split, strategy, n), seed=s.seed,
                                        n_negatives=n, quiet=split != "train", lightgcn=lightgcn)
            summaries[f"{split}/{strategy}-n{n}"] = {"records": summary.get("records"),
                                                     "negatives": summary.get("negatives"),
                                                     "fallbacks": summary.get("fallbacks")}
    return {"datasets": summaries}


REFERENCE = {"adapter_disabled": "adapter_disabled", "precomputed": "precomputed", "previous_stage": "initial",
             "sft": "start"}


def align(cfg: PipelineConfig, dataset_dir: Path, sample_dir: Path, sft_dir: Path, out: Path) -> dict:
    from .training.config import Plan, PreferenceConfig
    from .training.ray_train import run_plan

    a, s = cfg.alignment, cfg.sampling
    specs = a.stages or [None]
    stages = []
    for i, st in enumerate(specs):
        strategy = (st.strategy if st and st.strategy else s.strategy)
        n = (st.n_negatives if st and st.n_negatives else s.n_negatives)
        loss = st.loss if st else a.loss
        stages.append(PreferenceConfig(
            name=st.name if st else "align", data=str(preference_file(sample_dir, "train", strategy, n)),
            loss=loss, beta=st.beta if st else a.beta, epochs=st.epochs if st else a.epochs,
            learning_rate=(st.learning_rate if st and st.learning_rate else a.learning_rate),
            batch_size=a.batch_size, grad_accum=a.grad_accum, warmup_steps=a.warmup_steps, max_length=a.max_length,
            seed=a.seed, max_rows=a.max_rows,
            reference=REFERENCE[a.reference], dsdpo=a.dsdpo if loss == "dsdpo" else None))
    adapter = sft_dir / "adapter"
    model = model_settings(cfg, name_or_path=str(sft_dir / "model") if (sft_dir / "model").exists()
                           else cfg.model.name_or_path, adapter=str(adapter) if adapter.exists() else None)
    plan = Plan(model=model, dataset=str(dataset_dir), output_dir=str(out / "train"), stages=stages,
                ray=_ray_settings(cfg, out))
    return _publish(run_plan(plan), out)
