"""``raydpo run CONFIG.yaml``: the whole flow as cached, resumable stages.

    data -> sft -> generate -> sample -> align -> predict -> evaluate

Each stage writes under ``RUN_DIR/<stage>/<key>/`` where the key hashes the part of the config
that affects the stage plus the keys of the stages it reads. A stage is finished when its
``_SUCCESS`` file exists (written last, atomically). So:

- a rerun skips finished stages; a changed parameter changes the keys of its stage and of
  everything downstream, and only those rerun;
- ``--from STAGE`` reruns STAGE and everything after it;
- a killed run resumes: finished stages are kept, the interrupted stage resumes where it can
  (generation reuses finished shards, training resumes from its last Ray Train checkpoint);
- concurrent runs (Tune trials) that share upstream stages wait on a per-stage lock and reuse
  the result instead of computing it twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import PipelineConfig
from .errors import RaydpoError
from .io import file_lock, read_json, write_json

log = logging.getLogger(__name__)

STAGES = ("data", "sft", "generate", "sample", "align", "predict", "evaluate")
DEPENDS = {
    "data": (),
    "sft": ("data",),
    "generate": ("sft", "data"),
    "sample": ("generate", "data"),
    "align": ("sample", "sft", "data"),
    "predict": ("align", "data"),
    "evaluate": ("predict", "data"),
}


def stage_params(cfg: PipelineConfig, stage: str) -> dict:
    """The slice of the config that affects ``stage`` (its own inputs, not upstream ones)."""
    c = cfg
    if stage == "data":
        return c.data.model_dump()
    if stage == "sft":
        return {"model": c.model.model_dump(), "sft": c.sft.model_dump(), "deepspeed": c.ray.deepspeed}
    if stage == "generate":
        return c.generation.model_dump()
    if stage == "sample":
        return {"sampling": c.sampling.model_dump(), "datasets": preference_sets(c)}
    if stage == "align":
        return {"alignment": c.alignment.model_dump(), "sampling": c.sampling.model_dump(),
                "deepspeed": c.ray.deepspeed}
    if stage == "predict":
        return {"prediction": c.prediction.model_dump(), "split": c.evaluation.split}
    if stage == "evaluate":
        return c.evaluation.model_dump()
    raise RaydpoError(f"unknown stage {stage!r}; stages are {list(STAGES)}")


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    keys: dict[str, str] = {}
    for stage in STAGES:
        payload = {"stage": stage, "params": stage_params(cfg, stage), "deps": [keys[d] for d in DEPENDS[stage]]}
        keys[stage] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return keys


@dataclass
class Context:
    cfg: PipelineConfig
    run_dir: Path
    keys: dict[str, str]
    outputs: dict[str, Path] = field(default_factory=dict)
    progress: bool = True

    def dir(self, stage: str) -> Path:
        return self.run_dir / stage / self.keys[stage]


def _ray_init(cfg: PipelineConfig) -> None:
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, include_dashboard=False, log_to_driver=False)


# --- stages --------------------------------------------------------------------------------------


def run_data(ctx: Context, out: Path) -> dict:
    from .data import load_dataset
    from .data.synthetic import SyntheticConfig, generate

    d = ctx.cfg.data
    if d.source == "synthetic":
        s = d.synthetic
        ds = generate(SyntheticConfig(n_users=s.n_users, n_items=s.n_items, n_genres=s.n_genres,
                                      history_len=s.history_len, seed=s.seed))
    else:
        ds = load_dataset(d.path)
    k = max(ctx.cfg.evaluation.ks)
    if k > len(ds.catalog):  # checked as soon as the catalog is known, before any model is touched
        from .config import ConfigError

        raise ConfigError(f"evaluation.ks: k={k} exceeds the catalog size {len(ds.catalog)} of {d.path or 'the data'}")
    ds.save(out / "dataset")
    counts = ds.samples.frame["split"].value_counts().to_dict()
    return {"items": len(ds.catalog), "samples": counts}


def run_sft(ctx: Context, out: Path) -> dict:
    from .stages import train_sft

    return train_sft(ctx.cfg, ctx.outputs["data"] / "dataset", out)


def run_generate(ctx: Context, out: Path) -> dict:
    from .generation.candidates import DecodeConfig
    from .generation.distributed import Resources, run_sharded

    g = ctx.cfg.generation
    decode = DecodeConfig(mode=g.mode, num_return_sequences=g.num_return_sequences, num_beams=g.num_beams,
                          num_beam_groups=g.num_beam_groups, diversity_penalty=g.diversity_penalty,
                          temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                          exclude_history=g.exclude_history, exclude_target=g.exclude_target,
                          batch_size=g.batch_size, seed=g.seed, reference_logprobs=g.reference_logprobs)
    r = ctx.cfg.ray
    _ray_init(ctx.cfg)
    return run_sharded("candidates", ctx.outputs["data"] / "dataset", out / "candidates",
                       _model_spec(ctx, "sft"), decode, g.splits,
                       Resources(r.generation_actors, r.gpus_per_actor, None, r.shard_size), limit=g.limit,
                       progress=ctx.progress)


def run_sample(ctx: Context, out: Path) -> dict:
    from .stages import sample_preferences

    return sample_preferences(ctx.cfg, ctx.outputs["data"] / "dataset", ctx.outputs["generate"] / "candidates",
                              out)


def run_align(ctx: Context, out: Path) -> dict:
    from .stages import align

    _ray_init(ctx.cfg)
    return align(ctx.cfg, ctx.outputs["data"] / "dataset", ctx.outputs["sample"], ctx.outputs["sft"], out)


def run_predict(ctx: Context, out: Path) -> dict:
    from .generation.candidates import DecodeConfig
    from .generation.distributed import Resources, run_sharded

    p = ctx.cfg.prediction
    constrained = p.mode == "constrained"
    decode = DecodeConfig(mode="beam" if constrained else "greedy", num_return_sequences=1,
                          num_beams=p.num_beams if constrained else 1, constrained=constrained,
                          exclude_history=False, exclude_target=False, batch_size=p.batch_size,
                          max_new_tokens=p.max_new_tokens)
    r = ctx.cfg.ray
    _ray_init(ctx.cfg)
    return run_sharded("predictions", ctx.outputs["data"] / "dataset", out / "predictions",
                       _model_spec(ctx, "align"), decode, [ctx.cfg.evaluation.split],
                       Resources(r.generation_actors, r.gpus_per_actor, None, r.shard_size), limit=p.limit,
                       progress=ctx.progress)


def run_evaluate(ctx: Context, out: Path) -> dict:
    from .data import Dataset, Samples, load_dataset
    from .evaluation import evaluate, format_table, to_json
    from .evaluation.evaluate import Predictions

    e = ctx.cfg.evaluation
    ds = load_dataset(ctx.outputs["data"] / "dataset")
    preds = Predictions.read(ctx.outputs["predict"] / "predictions" / "predictions.json")
    limit = ctx.cfg.prediction.limit
    if limit:  # evaluate exactly the rows that were predicted
        f = ds.samples.frame
        keep = (f["split"] != e.split) | (f.groupby("split").cumcount() < limit)
        ds = Dataset(ds.catalog, Samples(f[keep].reset_index(drop=True)), ds.name, ds.instruction)
    res = evaluate(preds, ds, e.ks, encoder=e.encoder, protocol=e.protocol, split=e.split, progress=False)
    write_json(out / "metrics.json", to_json(res))
    print(f"evaluation on {e.split} ({len(preds)} rows):\n{format_table(res)}")
    return {"metrics": to_json(res)}


RUNNERS: dict[str, Callable[[Context, Path], dict]] = {
    "data": run_data, "sft": run_sft, "generate": run_generate, "sample": run_sample, "align": run_align,
    "predict": run_predict, "evaluate": run_evaluate,
}


def _model_spec(ctx: Context, stage: str):
    """The model a stage produced: base + its LoRA adapter, its full model, or the base."""
    from .generation.distributed import ModelSpec

    out = ctx.outputs[stage]
    if (out / "model.json").exists():
        m = read_json(out / "model.json")
        return ModelSpec(m["name_or_path"], m.get("adapter"), ctx.cfg.model.dtype)
    if (out / "adapter").exists():
        return ModelSpec(ctx.cfg.model.name_or_path, str(out / "adapter"), ctx.cfg.model.dtype)
    if (out / "model").exists():
        return ModelSpec(str(out / "model"), None, ctx.cfg.model.dtype)
    return ModelSpec(ctx.cfg.model.name_or_path, None, ctx.cfg.model.dtype)


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


# --- driver --------------------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig, *, from_stage: str | None = None, until: str = "evaluate",
                 run_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the stages up to ``until``; returns ``{stage: summary}``."""
    for s in (from_stage, until):
        if s is not None and s not in STAGES:
            raise RaydpoError(f"unknown stage {s!r}; stages are {list(STAGES)}")
    # absolute: Ray workers do not share the driver's working folder
    ctx = Context(cfg, Path(run_dir or cfg.run_dir).expanduser().absolute(), stage_keys(cfg), progress=progress)
    from .outputs import check_output, claim_folder

    # never into a folder raydpo did not write, nor onto the input data
    check_output(ctx.run_dir, kind="run", folder=True, resumable=True, option="run_dir",
                 inputs=[cfg.data.path] if cfg.data.source == "path" else [])
    claim_folder(ctx.run_dir, "run")
    forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    summaries: dict[str, Any] = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        out = ctx.dir(stage)
        with file_lock(ctx.run_dir / stage / f".{ctx.keys[stage]}.lock"):
            done = out / "_SUCCESS"
            if stage in forced and out.exists():
                shutil.rmtree(out)
            if done.exists():
                summaries[stage] = read_json(done)
                print(f"[{stage}] cached ({ctx.keys[stage]})")
            else:
                print(f"[{stage}] running -> {out}")
                out.mkdir(parents=True, exist_ok=True)
                t0 = time.perf_counter()
                summary = RUNNERS[stage](ctx, out) or {}
                summary = {"stage": stage, "key": ctx.keys[stage], "seconds": round(time.perf_counter() - t0, 2),
                           **summary}
                write_json(out / "config.json", stage_params(cfg, stage))
                write_json(done, summary)
                summaries[stage] = summary
                print(f"[{stage}] done in {summary['seconds']} s")
        ctx.outputs[stage] = out
    dump = cfg.model_dump(mode="json")
    write_json(ctx.run_dir / "last_run.json", {"keys": ctx.keys, "until": until, "config": dump})
    if until == "evaluate":  # what produced this evaluation, for `raydpo report`
        write_json(ctx.run_dir / "chains" / f"{ctx.keys['evaluate']}.json",
                   {**dump, "split": cfg.evaluation.split, "keys": ctx.keys})
    return summaries
