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
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import PipelineConfig, with_overrides
from .errors import RaydpoError
from .io import file_lock, read_json, write_json
from .stages import preference_file, preference_sets  # noqa: F401 - preference_file: for importers

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
    if stage == "data":  # where missing data is fetched from does not change it (checksums)
        d = c.data.model_dump(exclude={"fetch", "fetch_url"})
        return {**d, "synthetic": _defaults_dropped(c.data.synthetic, "valid_fraction", "test_fraction")}
    if stage == "sft":
        return {"model": c.model.model_dump(), "sft": _defaults_dropped(c.sft, "max_rows"),
                "deepspeed": c.ray.deepspeed}
    if stage == "generate":
        return c.generation.model_dump()
    if stage == "sample":
        return {"sampling": c.sampling.model_dump(), "datasets": preference_sets(c)}
    if stage == "align":
        return {"alignment": _defaults_dropped(c.alignment, "max_rows"), "sampling": c.sampling.model_dump(),
                "deepspeed": c.ray.deepspeed}
    if stage == "predict":
        return {"prediction": _defaults_dropped(c.prediction, "dtype"), "split": c.evaluation.split}
    if stage == "evaluate":
        return c.evaluation.model_dump()
    raise RaydpoError(f"unknown stage {stage!r}; stages are {list(STAGES)}")


def _defaults_dropped(section, *fields: str) -> dict:
    """``section`` dumped without ``fields`` that are at their declared defaults: fields added
    later leave the stage keys of earlier runs unchanged until a config sets them."""
    defaults = type(section).model_fields
    return {k: v for k, v in section.model_dump().items() if not (k in fields and v == defaults[k].default)}


def stage_keys(cfg: PipelineConfig) -> dict[str, str]:
    """The cache key of every stage. The config is validated again first, so that a copy made
    with ``model_copy(update=...)`` (no validation: ``epochs=1`` stays an int) keys like the
    validated config that ``run_pipeline`` runs (``epochs`` 1.0)."""
    cfg = with_overrides(cfg, {}, source="<stage keys>")
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
    """Start or join Ray (Ray's convention, printing which cluster), then check that every
    node sees the run folder before any work is scheduled."""
    import ray

    from .storage import check_nodes_share, ray_init

    ray_init(cfg.ray.address)
    if ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE:  # the driver; trials run inside Ray workers
        check_nodes_share(cfg.run_dir)


def _decode_device(cfg: PipelineConfig) -> str:
    """Generation and prediction actors decode on the GPU they request, else on the CPU (Ray
    2.60 leaves every GPU visible to an actor that requests none)."""
    return "cuda" if cfg.ray.gpus_per_actor > 0 else "cpu"


def stage_resources(cfg: PipelineConfig) -> dict[str, dict | None]:
    """What each Ray stage of a run requests from Ray and the device it computes on (the same
    settings the stages pass to Ray Train and Ray Data)."""
    from .stages import _ray_settings

    r = cfg.ray
    t = _ray_settings(cfg, Path(cfg.run_dir) / "x" / "y")
    train = {"kind": "ray_train", "count": t.num_workers, "CPU": t.cpus_per_worker, "GPU": 1 if t.use_gpu else 0,
             "device": "cuda" if t.use_gpu else "cpu"}
    decode = {"kind": "ray_data_actors", "count": r.generation_actors, "GPU": r.gpus_per_actor,
              "device": _decode_device(cfg)}
    return {"sft": train if cfg.sft.enabled else None, "generate": decode, "align": train, "predict": decode}


# --- stages --------------------------------------------------------------------------------------


def run_data(ctx: Context, out: Path) -> dict:
    from .data import load_dataset
    from .data.synthetic import SyntheticConfig, generate

    d = ctx.cfg.data
    if d.source == "path" and d.fetch and not Path(d.path).exists():
        from .data.fetch import fetch

        print(f"[data] {d.path} is missing: fetching the {d.fetch} sample", flush=True)
        fetch(d.fetch, d.path, base_url=d.fetch_url, progress=False)
    if d.source == "synthetic":
        s = d.synthetic
        ds = generate(SyntheticConfig(n_users=s.n_users, n_items=s.n_items, n_genres=s.n_genres,
                                      history_len=s.history_len, valid_fraction=s.valid_fraction,
                                      test_fraction=s.test_fraction, seed=s.seed))
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
                       _model_spec(ctx, "sft", _decode_device(ctx.cfg)), decode, g.splits,
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
    spec = _model_spec(ctx, "align", _decode_device(ctx.cfg))
    if p.dtype is not None:
        spec.dtype = p.dtype
    return run_sharded("predictions", ctx.outputs["data"] / "dataset", out / "predictions",
                       spec, decode, [ctx.cfg.evaluation.split],
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
    res, per_user = evaluate(preds, ds, e.ks, encoder=e.encoder, protocol=e.protocol, split=e.split,
                             progress=False, per_user=True)
    write_json(out / "metrics.json", to_json(res))
    # every metric recomputable on any subset of users: intervals and paired tests (raydpo compare)
    from .evaluation.stats import PER_USER_FILE

    per_user.meta["stage"] = out.name
    per_user.write(out / PER_USER_FILE)
    print(f"evaluation on {e.split} ({len(preds)} rows):\n{format_table(res)}")
    return {"metrics": to_json(res)}


RUNNERS: dict[str, Callable[[Context, Path], dict]] = {
    "data": run_data, "sft": run_sft, "generate": run_generate, "sample": run_sample, "align": run_align,
    "predict": run_predict, "evaluate": run_evaluate,
}


def _model_spec(ctx: Context, stage: str, device: str = "auto"):
    """The model a stage produced: base + its LoRA adapter, its full model, or the base (loaded
    quantised as ``model.quantization`` says, unless ``model.quantize_inference`` is false)."""
    from functools import partial

    from .generation.distributed import ModelSpec as _Spec
    from .stages import inference_quantization

    ModelSpec = partial(_Spec, **inference_quantization(ctx.cfg))

    out = ctx.outputs[stage]
    if (out / "model.json").exists():
        m = read_json(out / "model.json")
        return ModelSpec(m["name_or_path"], m.get("adapter"), ctx.cfg.model.dtype, device)
    if (out / "adapter").exists():
        return ModelSpec(ctx.cfg.model.name_or_path, str(out / "adapter"), ctx.cfg.model.dtype, device)
    if (out / "model").exists():
        return ModelSpec(str(out / "model"), None, ctx.cfg.model.dtype, device)
    return ModelSpec(ctx.cfg.model.name_or_path, None, ctx.cfg.model.dtype, device)


# --- driver --------------------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig, *, from_stage: str | None = None, until: str = "evaluate",
                 run_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the stages up to ``until``; returns ``{stage: summary}``."""
    from . import storage

    for s in (from_stage, until):
        if s is not None and s not in STAGES:
            raise RaydpoError(f"unknown stage {s!r}; stages are {list(STAGES)}")
    if run_dir is not None:
        cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    # absolute, under the storage root (Ray workers do not share the driver's working folder, and
    # a job's working dir is Ray's temporary copy); ray.storage_path set to the root
    root = storage.storage_root(cfg.ray.storage_path)
    cfg = storage.resolve_config(cfg)
    ctx = Context(cfg, Path(cfg.run_dir), stage_keys(cfg), progress=progress)
    if progress:
        print(f"run folder: {ctx.run_dir}" + (f"  (storage root {root.describe()}; Ray Train checkpoints "
                                              f"under {root.join('train')})" if root else ""), flush=True)
    from .outputs import check_output, claim_folder

    # never into a folder raydpo did not write, nor onto the input data
    check_output(ctx.run_dir, kind="run", folder=True, resumable=True, option="run_dir",
                 inputs=[cfg.data.path] if cfg.data.source == "path" else [])
    claim_folder(ctx.run_dir, "run")
    forced = set(STAGES[STAGES.index(from_stage):]) if from_stage else set()
    todo = [s for s in STAGES[: STAGES.index(until) + 1] if s in forced or not (ctx.dir(s) / "_SUCCESS").exists()]
    if set(todo) & {"sft", "generate", "align", "predict"}:
        _ray_init(cfg)  # which cluster, and that every node sees the run folder: before any work
    summaries: dict[str, Any] = {}
    for stage in STAGES[: STAGES.index(until) + 1]:
        out = ctx.dir(stage)
        remote = root.remote_of(out) if root is not None else None  # an object-store root keeps a copy
        with file_lock(ctx.run_dir / stage / f".{ctx.keys[stage]}.lock"):
            done = out / "_SUCCESS"
            if stage in forced and out.exists():
                shutil.rmtree(out)
            if stage in forced and remote and storage.remote_exists(remote):
                storage.delete_remote(remote)
            if stage in forced and root is not None:  # its Ray Train run too, or Train would resume it
                train_runs = root.join("train", f"{stage}-{ctx.keys[stage]}")
                if root.remote and storage.remote_exists(train_runs):
                    storage.delete_remote(train_runs)
                elif not root.remote and Path(train_runs).exists():
                    shutil.rmtree(train_runs)
            if not done.exists() and stage not in forced and remote and storage.remote_exists(f"{remote}/_SUCCESS"):
                n = storage.download_dir(remote, out)
                print(f"[{stage}] downloaded the finished stage from {remote} ({n} files)")
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
                if remote:
                    storage.upload_dir(out, remote)
                print(f"[{stage}] done in {summary['seconds']} s" + (f" (copied to {remote})" if remote else ""))
        ctx.outputs[stage] = out
    dump = cfg.model_dump(mode="json")
    write_json(ctx.run_dir / "last_run.json", {"keys": ctx.keys, "until": until, "config": dump})
    if until == "evaluate":  # what produced this evaluation, for `raydpo report`
        write_json(ctx.run_dir / "chains" / f"{ctx.keys['evaluate']}.json",
                   {**dump, "split": cfg.evaluation.split, "keys": ctx.keys})
    if root is not None and root.remote_of(ctx.run_dir):
        for name in ("last_run.json", "chains"):
            if (ctx.run_dir / name).is_dir():
                storage.upload_dir(ctx.run_dir / name, root.remote_of(ctx.run_dir / name))
            elif (ctx.run_dir / name).exists():
                storage.upload_file(ctx.run_dir / name, root.remote_of(ctx.run_dir / name))
    return summaries
