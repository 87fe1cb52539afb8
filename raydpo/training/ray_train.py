"""Running a :class:`~raydpo.training.config.Plan` on Ray Train (or in this process).

The driver (:func:`run_plan`) checks everything that can be checked without training — the
config, the model and adapter paths, every stage's data (missing fields, empty chosen texts,
rows without negatives, rows longer than ``max_length``), DS-DPO items and embeddings, the
DeepSpeed config against every stage's batch sizes, and the cluster's resources — and writes
each stage's checked data to ``OUTPUT_DIR/data``. Then one ``ray.train.torch.TorchTrainer``
with ``num_workers`` workers (GPU workers, or CPU workers on gloo) runs all stages in order
(:func:`train_loop_per_worker`):

* each stage builds its model from the previous stage's output (base + adapter), its data,
  TrainingArguments (``use_cpu`` without GPUs, the DeepSpeed config of the stage) and its
  trainer (:mod:`.sft`, :mod:`.dpo` or :mod:`.sdpo`), or generates self-play data;
* every epoch (or ``checkpoint_every_steps``) HF writes a checkpoint — the LoRA adapter,
  optimizer, scheduler, RNG and trainer state, DeepSpeed's partitioned optimizer states, never
  the frozen base — and every worker reports it to Ray Train with the epoch's metrics (loss,
  reward accuracy, margins), so Tune can read them; Ray merges the workers' files;
* a finished stage's output is written atomically to ``OUTPUT_DIR/stages/NAME``;
* when a worker dies, Ray Train (``FailureConfig(max_failures)``) restarts the group, every
  worker downloads the latest checkpoint, finished stages are skipped and the current stage
  resumes from the checkpoint's step (``trainer.train(resume_from_checkpoint=...)``).

At the end the last trained stage is copied atomically to ``OUTPUT_DIR/final`` and a
:class:`TrainResult` is returned. Rerunning a plan with the same ``output_dir`` skips the
stages already finished with the same settings and data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import DataError, RaydpoError
from ..io import atomic_path, sha256_file, write_json
from .common import (
    FAIL_MARKER,
    STATE_FILE,
    ModelState,
    WorkerContext,
    load_policy,
    make_report_callback,
    release,
)
from .config import Plan, PreferenceConfig, SelfPlayConfig, SFTConfig, build

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


@dataclass
class TrainResult:
    """What a run produced. ``adapter_path``: the final LoRA adapter (None after a full
    fine-tuning stage), to load on ``base_model``; ``stages``: each stage's output folder;
    ``metrics``: one record per reported checkpoint (stage, epoch, step, loss, reward_accuracy,
    reward_margin, ...)."""

    output_dir: str
    base_model: str
    adapter_path: str | None
    final_path: str
    stages: dict[str, str]
    metrics: list[dict]
    ray_result_path: str | None = None
    checkpoint_path: str | None = None
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def stage_metrics(self, name: str) -> list[dict]:
        return [m for m in self.metrics if m.get("stage") == name]


# --- helpers -------------------------------------------------------------------------------------


def _stage_hash(stage, start: dict, data_sha: str | None, eval_sha: str | None) -> str:
    payload = {"stage": stage.model_dump(mode="json"), "start": start, "data": data_sha, "eval": eval_sha}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def read_stage_output(out_dir: Path) -> dict | None:
    f = out_dir / STAGE_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except ValueError:
        return None


# --- driver side: checks before any worker starts --------------------------------------------------


@dataclass
class _Prepared:
    plan: Plan
    run_dir: Path
    base: str
    start_adapter: str | None
    data: dict[str, dict]  # stage name -> {"path", "sha", "eval_path", "eval_sha"}


def _check_resources(plan: Plan) -> None:
    import ray

    r = plan.ray
    total = ray.cluster_resources()
    need_cpu = r.num_workers * r.cpus_per_worker
    if total.get("CPU", 0) + 1e-9 < need_cpu:
        raise RaydpoError(f"ray: {r.num_workers} workers x {r.cpus_per_worker} CPUs = {need_cpu} CPUs, but the Ray "
                          f"cluster has {total.get('CPU', 0):g} (lower num_workers or cpus_per_worker)")
    if r.use_gpu and total.get("GPU", 0) < r.num_workers:
        raise RaydpoError(f"ray: use_gpu with {r.num_workers} workers, but the Ray cluster has "
                          f"{total.get('GPU', 0):g} GPUs")


def prepare(plan: Plan | dict) -> _Prepared:
    """Every check that needs no training (see the module docstring); writes the checked data
    of each stage to ``OUTPUT_DIR/data``. Raises a RaydpoError (or DataError) on bad input."""
    from ..data import load_dataset
    from ..models import load_tokenizer, resolve_model_path
    from . import deepspeed as ds_mod
    from .data import read_stage_frame, tokenize_frame

    plan = build(Plan, plan)
    run_dir = Path(plan.output_dir).expanduser().resolve()
    dataset = load_dataset(plan.dataset) if plan.dataset else None
    frames: dict[tuple[str, str], Any] = {}
    for st in plan.stages:  # every data file is read and checked before a model or tokenizer is built
        if isinstance(st, SelfPlayConfig):
            continue
        for key, src in (("path", st.data), ("eval_path", st.eval_data)):
            if src is not None and not src.startswith("@"):
                frames[(st.name, key)] = read_stage_frame(
                    src, need_negatives=isinstance(st, PreferenceConfig), dataset=dataset, split=st.split,
                    max_rows=st.max_rows if key == "path" else None)
    base = resolve_model_path(plan.model.name_or_path, catalog=dataset.catalog if dataset else None)
    if Path(base).exists():
        base = str(Path(base).resolve())
    start_adapter = plan.model.adapter
    if start_adapter is not None:
        p = Path(start_adapter).expanduser()
        if not (p / "adapter_config.json").is_file():
            raise RaydpoError(f"model.adapter {start_adapter!r} is not a LoRA adapter folder (no adapter_config.json)")
        start_adapter = str(p.resolve())
    tokenizer = load_tokenizer(base)
    if plan.model.quantization != "none":  # before any worker starts
        from ..models.quantization import require_bitsandbytes

        require_bitsandbytes(plan.model.quantization)

    r = plan.ray
    world = max(1, r.num_workers)
    if r.deepspeed is not None:
        ds_mod.check_available()
    if r.use_gpu and r.num_workers == 0:
        raise RaydpoError("ray.use_gpu needs Ray Train workers (num_workers >= 1)")

    # where each stage's base model comes from: a full fine-tuning SFT stage changes it
    full_ft_before = False
    stage_base: dict[str, str] = {}
    for st in plan.stages:
        stage_base[st.name] = "full" if full_ft_before else "plan"
        if isinstance(st, SFTConfig) and st.lora is None:
            full_ft_before = True
        if isinstance(st, PreferenceConfig):
            refs_other_base = st.reference == "start" and stage_base[st.name] == "full"
            if st.reference.startswith("stage:"):
                ref_st = plan.stage(st.reference[len("stage:"):])
                refs_other_base = stage_base[ref_st.name] != stage_base[st.name] or (
                    isinstance(ref_st, SFTConfig) and ref_st.lora is None)
            if refs_other_base:
                raise RaydpoError(f"stage {st.name!r}: reference {st.reference!r} is on another base model (a full "
                                  "fine-tuning stage lies between them); use 'initial' or 'adapter_disabled'")
            if st.loss == "dsdpo" and st.data and st.data.startswith("@"):
                raise RaydpoError(f"stage {st.name!r}: DS-DPO needs item ids of a preference file, not self-play data")

    data_dir = run_dir / "data"
    data: dict[str, dict] = {}
    for st in plan.stages:
        if isinstance(st, SelfPlayConfig):
            if st.split not in ("train", "valid", "test"):
                raise RaydpoError(f"stage {st.name!r}: unknown split {st.split!r}")
            if not len(dataset.split(st.split)):
                raise DataError(f"split {st.split!r} is empty", path=plan.dataset, field="split")
            continue
        ds_mod.resolve(r.deepspeed, micro_batch=st.batch_size, grad_accum=st.grad_accum, world_size=world,
                       use_gpu=r.use_gpu, offload_optimizer=r.offload_optimizer, where=f"stage {st.name!r}: ray.deepspeed")
        pref = isinstance(st, PreferenceConfig)
        entry: dict[str, Any] = {}
        for key, src in (("path", st.data), ("eval_path", st.eval_data)):
            if src is None or src.startswith("@"):
                entry[key] = src
                continue
            frame = frames[(st.name, key)]
            if "betas" in frame.columns:
                frame = frame.drop(columns=["betas"])  # recomputed below for DS-DPO, ignored otherwise
            if pref and st.loss == "dsdpo":
                from .dsdpo import add_betas

                if dataset is None:
                    raise RaydpoError(f"stage {st.name!r}: DS-DPO needs 'dataset' (catalog and histories)")
                frame = add_betas(frame, dataset, st.dsdpo, path=src, max_negatives=st.max_negatives)
            tokenize_frame(frame, tokenizer, max_length=st.max_length, max_negatives=getattr(st, "max_negatives", None),
                           with_negatives=pref, path=src)
            out = data_dir / f"{st.name}{'-eval' if key == 'eval_path' else ''}.parquet"
            with atomic_path(out) as tmp:
                frame.to_parquet(tmp, index=False)
            entry[key] = str(out)
            entry["sha" if key == "path" else "eval_sha"] = sha256_file(out)
        data[st.name] = entry
    if r.num_workers > 0:
        _ensure_ray()
        _check_resources(plan)
    return _Prepared(plan=plan, run_dir=run_dir, base=base, start_adapter=start_adapter, data=data)


def _ensure_ray() -> None:
    from ..storage import ray_init

    ray_init()  # Ray's convention; prints which cluster it joined


# --- worker side -----------------------------------------------------------------------------------


def _context(cfg: dict, in_ray: bool) -> WorkerContext:
    run_dir = Path(cfg["run_dir"])
    ray_s = cfg["plan"]["ray"]
    if in_ray:
        import ray.train

        tc = ray.train.get_context()
        rank, world, local_rank = tc.get_world_rank(), tc.get_world_size(), tc.get_local_rank()
    else:
        rank, world, local_rank = 0, 1, 0
    ctx = WorkerContext(run_dir=run_dir, rank=rank, world_size=world, local_rank=local_rank, in_ray=in_ray,
                        use_gpu=bool(ray_s["use_gpu"]), fail_at_step=ray_s.get("fail_at_step"),
                        fail_rank=int(ray_s.get("fail_rank", 1)))
    ctx.local_dir = Path(tempfile.mkdtemp(prefix=f"raydpo-r{rank}-"))
    if in_ray:
        import ray.train

        if not run_dir.is_dir():  # e.g. a node that joined after the driver's check
            import socket

            raise RaydpoError(f"node {socket.gethostname()} does not see the run folder {run_dir}: put the storage "
                              "root (or run_dir) on a mount every node shares")
        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            from ..storage import verify_manifests

            local = ctx.local_dir / "resume"
            ckpt.to_directory(str(local))
            verify_manifests(local)  # before anything in it is unpickled
            state_file = local / STATE_FILE
            if state_file.is_file():
                ctx.checkpoint_dir = local
                ctx.checkpoint_state = json.loads(state_file.read_text())
    return ctx


def train_loop_per_worker(cfg: dict) -> dict | None:
    """The function every Ray Train worker runs (also run in-process when ``num_workers: 0``)."""
    t_worker = time.time()
    in_ray = not cfg.get("_local", False)
    if not in_ray:
        ctx = _context(cfg, in_ray=False)
    else:
        import torch

        ncpu = max(1, int(cfg["plan"]["ray"]["cpus_per_worker"]))
        torch.set_num_threads(ncpu)
        ctx = _context(cfg, in_ray=True)
    plan = Plan.model_validate(cfg["plan"])
    run_dir = ctx.run_dir
    plan_start = ModelState(base=cfg["base"], adapter=cfg["start_adapter"])
    current = plan_start
    outputs: dict[str, dict] = {}
    try:
        for i, st in enumerate(plan.stages):
            entry = cfg["data"].get(st.name, {})
            data_sha = entry.get("sha")
            if isinstance(st, (SFTConfig, PreferenceConfig)) and st.data and st.data.startswith("@"):
                src = outputs[st.data[1:]]
                entry = {**entry, "path": src["data"], "sha": src["data_sha"]}
                data_sha = src["data_sha"]
            start = current.to_dict()
            if plan.model.quantization != "none":  # a stage trained on another base is another stage
                start.update(quantization=plan.model.quantization, compute_dtype=plan.model.compute_dtype)
            stage_hash = _stage_hash(st, start, data_sha, entry.get("eval_sha"))
            out_dir = run_dir / "stages" / st.name
            done = read_stage_output(out_dir)
            if done is not None:
                if done.get("hash") != stage_hash:
                    raise RaydpoError(f"{out_dir} holds stage {st.name!r} from other settings or data; use a new "
                                      "output_dir (or remove that folder)")
                outputs[st.name] = done
                if done["kind"] != "selfplay":
                    current = ModelState(base=done["base"], adapter=done["adapter"])
                continue
            if isinstance(st, SelfPlayConfig):
                done = _run_selfplay(st, current, cfg, ctx, out_dir, stage_hash)
            else:
                done = _run_training(st, i, current, plan_start, outputs, entry, cfg, ctx, out_dir, stage_hash)
                current = ModelState(base=done["base"], adapter=done["adapter"])
            outputs[st.name] = done
    finally:
        if ctx.local_dir is not None:
            shutil.rmtree(ctx.local_dir, ignore_errors=True)
    if ctx.is_main:
        return {"stages": outputs, "history": ctx.history, "worker_started_at": t_worker,
                "worker_seconds": time.time() - t_worker}
    return None


def _write_stage(out_dir: Path, info: dict, fill) -> dict:
    """Write a stage's output folder atomically (rank 0): ``fill(tmp)`` adds the files (and
    may return more fields for ``stage.json``, which is written last)."""
    with atomic_path(out_dir, kind="training-stage") as tmp:
        tmp.mkdir(parents=True)
        final = dict(info)
        final.update(fill(tmp) or {})
        for key in ("adapter", "base", "data"):
            rel = final.get(f"_{key}_rel")
            if rel is not None:
                final[key] = str(out_dir / rel)
        final = {k: v for k, v in final.items() if not k.startswith("_")}
        (tmp / STAGE_FILE).write_text(json.dumps(final, indent=2))
    return final


def _run_selfplay(st: SelfPlayConfig, current: ModelState, cfg: dict, ctx: WorkerContext, out_dir: Path,
                  stage_hash: str) -> dict:
    """Self-play generation (:func:`raydpo.training.selfplay.selfplay_rows`): every worker decodes
    its share of the sampled rows with the current model; rank 0 writes ``preferences.parquet``."""
    from ..data import load_dataset
    from ..models import load_model
    from .selfplay import sample_rows, selfplay_rows

    ds = load_dataset(cfg["plan"]["dataset"])
    frame = sample_rows(ds, st.split, st.n_samples, st.seed)
    mine = frame.iloc[ctx.rank :: ctx.world_size]
    m = cfg["plan"]["model"]
    model, tok = load_model(current.base, adapter=current.adapter, device=ctx.device, dtype=m["dtype"],
                            quantization=m.get("quantization", "none"), compute_dtype=m.get("compute_dtype", "auto"))
    rows = selfplay_rows(model, tok, ds, mine, st.decode)
    release(model)
    parts = ctx.all_gather(rows)
    info: dict = {}
    if ctx.is_main:
        all_rows = [r for part in parts for r in part]
        if not all_rows:
            raise RaydpoError(f"stage {st.name!r}: self-play produced no rows")
        prefs = pd.DataFrame(all_rows)

        def fill(tmp: Path) -> dict:
            prefs.to_parquet(tmp / "preferences.parquet", index=False)
            return {"data_sha": sha256_file(tmp / "preferences.parquet")}

        info = _write_stage(out_dir, {"name": st.name, "kind": "selfplay", "hash": stage_hash, "rows": len(prefs),
                                      "model": current.to_dict(), "_data_rel": "preferences.parquet"}, fill)
    ctx.barrier()
    return ctx.broadcast(info)


def _run_training(st, index: int, current: ModelState, plan_start: ModelState, outputs: dict[str, dict],
                  entry: dict, cfg: dict, ctx: WorkerContext, out_dir: Path, stage_hash: str) -> dict:
    from . import deepspeed as ds_mod
    from . import reference as ref_mod
    from .data import BETAS, tokenize_frame

    t_start = time.time()
    plan_d = cfg["plan"]
    ray_s = plan_d["ray"]
    ctx.deepspeed = ds_mod.resolve(ray_s["deepspeed"], micro_batch=st.batch_size, grad_accum=st.grad_accum,
                                   world_size=ctx.world_size, use_gpu=ctx.use_gpu,
                                   offload_optimizer=ray_s["offload_optimizer"])
    pref = isinstance(st, PreferenceConfig)
    full = isinstance(st, SFTConfig) and st.lora is None
    model, tok = load_policy(current, lora=st.lora, dtype=plan_d["model"]["dtype"], ctx=ctx, seed=st.seed,
                             full_finetune=full, quantization=plan_d["model"].get("quantization", "none"),
                             compute_dtype=plan_d["model"].get("compute_dtype", "auto"),
                             gradient_checkpointing=st.gradient_checkpointing)

    def examples(path: str | None):
        if path is None:
            return None
        frame = pd.read_parquet(path)
        if pref and "rejected" in frame.columns:
            frame["rejected"] = [list(r) for r in frame["rejected"]]
        if BETAS in frame.columns and getattr(st, "loss", None) != "dsdpo":
            frame = frame.drop(columns=[BETAS])  # per-negative betas are DS-DPO's only
        return tokenize_frame(frame, tok, max_length=st.max_length, max_negatives=getattr(st, "max_negatives", None),
                              with_negatives=pref, path=path)

    train_ex, eval_ex = examples(entry["path"]), examples(entry.get("eval_path"))
    hf_dir = ctx.local_dir / f"{index:02d}-{st.name}"
    resume = None
    state = ctx.checkpoint_state
    if state is not None and state.get("stage") == st.name and state.get("stage_hash") == stage_hash:
        resume = str(ctx.checkpoint_dir)
    callbacks = [make_report_callback(ctx, st.name, index, {"stage_hash": stage_hash})]
    if pref:
        stage_adapters = {k: v.get("adapter") for k, v in outputs.items() if v.get("kind") != "selfplay"}
        spec = ref_mod.resolve(st.reference, start_adapter=current.adapter, plan_start_adapter=plan_start.adapter,
                               stage_adapters=stage_adapters, precompute=st.precompute_reference,
                               data_has_ref="ref_logps" in train_ex[0])
        if spec.from_data and eval_ex and "ref_logps" not in eval_ex[0]:
            raise DataError("the training data has reference log-probs but the eval data has none",
                            path=entry.get("eval_path"), field="ref_chosen_logps")
        if spec.precompute:  # (again after a restart: deterministic, and cheaper than storing it)
            ref_mod.attach(model, spec)
            for exs in (train_ex, eval_ex):
                if exs:
                    lps = ref_mod.precompute_logps(model, exs, pad_token_id=tok.pad_token_id,
                                                   batch_size=max(8, st.batch_size * 4), rank=ctx.rank,
                                                   world_size=ctx.world_size, all_gather=ctx.all_gather,
                                                   device=ctx.device if ctx.use_gpu else None)
                    for ex, lp in zip(exs, lps):
                        ex["ref_logps"] = lp
            ref_mod.detach(model)
        if st.loss in ("sdpo", "dsdpo"):
            from .sdpo import build_trainer
        else:
            from .dpo import build_trainer
        trainer = build_trainer(st, model, tok, train_ex, eval_ex, ctx, hf_dir, callbacks, spec)
    else:
        from .sft import build_trainer

        trainer = build_trainer(st, model, tok, train_ex, eval_ex, ctx, hf_dir, callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # metrics go to Ray Train and metrics.jsonl, not stdout
    if ctx.is_main:  # one progress line per log step in the job log, and TensorBoard event files
        trainer.add_callback(ProgressCallback(st.name))
        tb = _tensorboard_callback(Path(ctx.run_dir) / "tensorboard" / f"{index:02d}-{st.name}")
        if tb is not None:
            trainer.add_callback(tb)
    t_train = time.time()
    trainer.train(resume_from_checkpoint=resume)
    t_save = time.time()
    probe = _probe_logps(trainer, train_ex[:PROBE_ROWS], tok.pad_token_id)
    final_local = ctx.local_dir / f"{index:02d}-{st.name}-final"
    trainer.save_model(str(final_local))  # every rank: ZeRO-3 gathers the weights
    ctx.barrier()
    seconds = {"setup": round(t_train - t_start, 3), "train": round(t_save - t_train, 3),
               "save": round(time.time() - t_save, 3), "started_at": round(t_start, 3)}
    info: dict = {}
    if ctx.is_main:
        rel = "model" if full else "adapter"

        def fill(tmp: Path) -> None:
            shutil.copytree(final_local, tmp / rel)
            if full:
                tok.save_pretrained(tmp / rel)

        info = _write_stage(out_dir, {"name": st.name, "kind": st.kind, "hash": stage_hash,
                                      "base": current.base, "adapter": None, "start": current.to_dict(),
                                      "seconds": seconds, "resumed_from": resume is not None,
                                      "probe_logps": probe,
                                      f"_{'base' if full else 'adapter'}_rel": rel}, fill)
    ctx.barrier()
    info = ctx.broadcast(info)
    release(trainer, model)
    return info


PROBE_ROWS = 4


def _say(line: str) -> None:
    """One line on stdout (not through ``print``, which Ray Train V2 patches to log every
    message a second time on stderr)."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _progress_callback_class():
    from transformers import TrainerCallback

    class _ProgressCallback(TrainerCallback):
        """Rank 0 prints ``[train NAME] epoch E/N step S/M loss L ... X steps/s`` about 20 times a
        run (with ``log_to_driver`` these lines reach the driver's output, i.e. the job log)."""

        def __init__(self, name: str) -> None:
            self.name = name
            self.t0 = self.step0 = None
            self.last = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0 = time.time(), int(state.global_step)
            _say(f"[train {self.name}] start: {state.max_steps} steps, {args.num_train_epochs:g} epoch(s)"
                 + (f", resuming at step {state.global_step}" if state.global_step else ""))

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if self.t0 is None or not any(k in logs for k in ("loss", "train_loss", "eval_loss")):
                return
            every = max(1, state.max_steps // 20)  # about 20 lines a run, and at least one each 10 s
            now = time.time()
            if not (state.global_step % every == 0 or state.global_step >= state.max_steps
                    or "eval_loss" in logs or now - self.last >= 10):
                return
            self.last = now
            rate = (state.global_step - self.step0) / max(time.time() - self.t0, 1e-9)
            parts = [f"epoch {state.epoch or 0:.2f}/{args.num_train_epochs:g}", f"step {state.global_step}/{state.max_steps}"]
            for key in ("loss", "eval_loss", "rewards/accuracies", "rewards/margins", "learning_rate", "train_loss"):
                if isinstance(logs.get(key), (int, float)):
                    parts.append(f"{key} {logs[key]:.4g}")
            parts.append(f"{rate:.2f} steps/s")
            _say(f"[train {self.name}] " + " ".join(parts))

    return _ProgressCallback


def ProgressCallback(name: str):  # noqa: N802 - a class built lazily (transformers is imported late)
    return _progress_callback_class()(name)


def _tensorboard_callback(logdir: Path):
    """transformers' TensorBoard callback writing to ``logdir`` (tensorboardX, installed with
    Ray Tune), or None when no TensorBoard writer is installed."""
    try:
        from tensorboardX import SummaryWriter
        from transformers.integrations import TensorBoardCallback
    except ImportError:  # pragma: no cover
        return None
    logdir.mkdir(parents=True, exist_ok=True)
    return TensorBoardCallback(tb_writer=SummaryWriter(str(logdir)))


def _probe_logps(trainer, examples: list[dict], pad_token_id: int) -> list[list[float]]:
    """Response log-probs of the first training rows under the trained in-memory model, on
    every rank (ZeRO-3 gathers weights collectively), in one batch without prompt sharing.
    Stored in ``stage.json``: a reloaded adapter must give the same numbers."""
    from .common import response_logps

    return response_logps(trainer.model_wrapped, examples, pad_token_id=pad_token_id, share_prompt=False,
                          device=trainer.args.device)


# --- driver: run and collect -----------------------------------------------------------------------


def _env_vars(plan: Plan) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false"}
    ext = plan.ray.torch_extensions_dir or os.environ.get("TORCH_EXTENSIONS_DIR") or \
        str(Path("~/.cache/torch_extensions").expanduser())
    env["TORCH_EXTENSIONS_DIR"] = ext  # DeepSpeed's shm_comm is JIT-compiled once per machine, not per run
    if not plan.ray.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("RAYDPO_CACHE_DIR", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAYDPO_STORAGE",
                "RAYDPO_CPU_BF16",  # dtype "auto" on CPU workers (raydpo.models.device)
                # an S3-compatible store's endpoint and region (credentials come from the nodes)
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _history(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    recs: dict[tuple, dict] = {}
    for line in f.read_text().splitlines():
        try:
            m = json.loads(line)
        except ValueError:
            continue
        recs[(m.get("stage_index"), m.get("step"))] = m  # a resumed run re-reports: keep the last
    return [recs[k] for k in sorted(recs, key=lambda k: (k[0] if k[0] is not None else -1, k[1] or 0))]


def run_plan(plan: Plan | dict) -> TrainResult:
    """Check, then run every stage of ``plan``; see the module docstring."""
    t0 = time.time()
    prep = prepare(plan)
    plan = prep.plan
    run_dir = prep.run_dir
    from ..outputs import claim_folder

    claim_folder(run_dir, "training")
    (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    marker = run_dir / FAIL_MARKER
    if plan.ray.fail_at_step is not None and marker.exists():
        marker.unlink()  # a new run injects its failure again
    write_json(run_dir / "plan.json", plan.model_dump(mode="json"))
    cfg = {"plan": plan.model_dump(mode="json"), "run_dir": str(run_dir), "base": prep.base,
           "start_adapter": prep.start_adapter, "data": prep.data}
    ray_result_path = checkpoint_path = None
    t_fit = time.time()
    if plan.ray.num_workers == 0:
        ret = train_loop_per_worker({**cfg, "_local": True})
    else:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        r = plan.ray
        resources = {"CPU": r.cpus_per_worker}
        if r.use_gpu:
            resources["GPU"] = 1
        # one Ray Train run per output folder: a rerun after a killed driver (or job) finds the
        # run's checkpoints under the same name and resumes from the latest (checked first)
        name = r.name or f"raydpo-{hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]}"
        if r.storage_path and "://" in r.storage_path:
            storage = r.storage_path  # s3://, gs://, ...: shared storage for a multi-node cluster
        else:
            storage = Path(r.storage_path).expanduser().resolve() if r.storage_path else run_dir / "ray"
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=cfg,
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=r.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=r.checkpoint_keep),
                                 worker_runtime_env={"env_vars": _env_vars(plan)}),
        )
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError wraps the worker's exception
            cause = e
            while getattr(cause, "__cause__", None) is not None:
                cause = cause.__cause__
            if isinstance(cause, RaydpoError):
                raise cause from None
            raise RaydpoError(f"training failed: {e}") from e
        if result.error is not None:
            raise RaydpoError(f"training failed: {result.error}")
        ret = result.return_value
        ray_result_path = result.path
        checkpoint_path = result.checkpoint.path if result.checkpoint is not None else None
    if not ret:
        raise RaydpoError("training finished without a result from rank 0")
    stages = ret["stages"]
    last = next((stages[s.name] for s in reversed(plan.stages) if s.kind != "selfplay"), None)
    final = run_dir / "final"
    adapter_path = None
    base_model = prep.base
    if last is not None:
        src = Path(last["adapter"] or last["base"])
        with atomic_path(final, kind="model") as tmp:
            shutil.copytree(src, tmp)
            (tmp / "raydpo_final.json").write_text(json.dumps({"stage": last["name"], "base": last["base"],
                                                               "adapter": last["adapter"] is not None}, indent=2))
        base_model = last["base"]
        adapter_path = str(final) if last["adapter"] else None
    history = _history(run_dir) if plan.ray.num_workers else ret["history"]
    return TrainResult(output_dir=str(run_dir), base_model=base_model, adapter_path=adapter_path,
                       final_path=str(final), stages={k: str(run_dir / "stages" / k) for k in stages},
                       metrics=history, ray_result_path=ray_result_path, checkpoint_path=checkpoint_path,
                       elapsed_s=time.time() - t0,
                       extra={"worker_seconds": ret.get("worker_seconds"),
                              "startup_seconds": ret.get("worker_started_at", t_fit) - t_fit})


__all__ = ["TrainResult", "prepare", "read_stage_output", "run_plan", "train_loop_per_worker"]
