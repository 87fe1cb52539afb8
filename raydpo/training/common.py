"""What every trainer shares: the worker context, loading the policy of a stage, the
TrainingArguments, saving adapters only, and the callback that reports each epoch to Ray Train.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "raydpo_state.json"
FAIL_MARKER = ".raydpo_failure_injected"
FAIL_DELAY_S = 5.0

# names of the metrics reported each epoch (TRL's log keys -> ours)
_METRIC_NAMES = {
    "loss": "loss",
    "rewards/accuracies": "reward_accuracy",  # chosen beats every negative (the research code's metric)
    "rewards/pair_accuracy": "reward_pair_accuracy",  # share of (example, negative) pairs won
    "rewards/margins": "reward_margin",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "logps/chosen": "logps_chosen",
    "logps/rejected": "logps_rejected",
    "grad_norm": "grad_norm",
    "learning_rate": "learning_rate",
    "mean_token_accuracy": "token_accuracy",
}


@dataclass
class WorkerContext:
    """Where a worker runs: rank, world size, device, the run folder (shared by all workers),
    and how it reports (Ray Train, or an in-process list)."""

    run_dir: Path
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    in_ray: bool = False
    use_gpu: bool = False
    deepspeed: dict | None = None
    fail_at_step: int | None = None
    fail_rank: int = 1
    history: list[dict] = field(default_factory=list)
    checkpoint_dir: Path | None = None  # the latest Ray checkpoint, downloaded
    checkpoint_state: dict | None = None
    local_dir: Path | None = None  # this worker's scratch folder (HF output dirs)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str:
        if self.use_gpu:
            import torch

            return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cuda"
        return "cpu"

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def record(self, metrics: dict) -> None:
        """Keep a metrics record (rank 0 also appends it to ``RUN_DIR/metrics.jsonl``)."""
        self.history.append(dict(metrics))
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")

    def report(self, metrics: dict, checkpoint_dir: Path | None, name: str) -> None:
        if not self.in_ray:
            return
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) \
            if checkpoint_dir is not None and checkpoint_dir.is_dir() else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name,
                         delete_local_checkpoint_after_upload=self.rank != 0)


# --- the policy of a stage ---------------------------------------------------------------------------


@dataclass
class ModelState:
    """A model between stages: a base folder and, for LoRA, an adapter folder."""

    base: str
    adapter: str | None = None

    def to_dict(self) -> dict:
        return {"base": self.base, "adapter": self.adapter}


def load_policy(start: ModelState, *, lora, dtype: str, ctx: WorkerContext, seed: int,
                full_finetune: bool = False, quantization: str = "none", compute_dtype: str = "auto",
                gradient_checkpointing: bool = False):
    """The trainable model of a stage and its tokenizer.

    Continues ``start.adapter`` when there is one (the stage's LoRA settings are then unused),
    else wraps the base in a new LoRA (``lora``); ``full_finetune`` trains every weight (an
    adapter to start from is merged first). ``quantization`` (``nf4``, ``int8``): QLoRA on a
    quantised base prepared with ``prepare_model_for_kbit_training``.
    """
    import torch
    from transformers import set_seed

    from ..models import load_model
    from ..models.quantization import combination_error

    set_seed(seed)  # the new adapter's initial weights are the same on every worker
    device = ctx.device
    quant = dict(quantization=quantization, compute_dtype=compute_dtype)
    err = combination_error(quantization, full_finetune=full_finetune, full_key="stage")
    if err is not None:
        from ..errors import RaydpoError

        raise RaydpoError(err)
    if quantization != "none":
        quant["gradient_checkpointing"] = gradient_checkpointing
    if full_finetune:
        model, tok = load_model(start.base, adapter=start.adapter, trainable=False, dtype=dtype, device=device)
        if start.adapter is not None:
            model = model.merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        return model, tok
    if start.adapter is not None:
        model, tok = load_model(start.base, adapter=start.adapter, trainable=True, dtype=dtype, device=device,
                                **quant)
        return model, tok
    from peft import get_peft_model

    model, tok = load_model(start.base, trainable=True, dtype=dtype, device=device, **quant)
    kwargs = {}
    if ctx.deepspeed and ctx.deepspeed.get("zero_optimization", {}).get("stage") == 3 \
            and next(model.parameters()).dtype != torch.float32:
        kwargs["autocast_adapter_dtype"] = False  # ZeRO-3 needs one dtype (TRL #6089)
    model = get_peft_model(model, lora.peft_config(), **kwargs)
    model.train()
    return model, tok


def disable_dropout(model) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def release(*objs) -> None:
    """Forget a stage's trainer and model: HF's global DeepSpeed config too, so that the next
    ``from_pretrained`` loads an ordinary (not ZeRO-3-partitioned) model."""
    import gc

    try:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    except ImportError:  # pragma: no cover
        pass
    del objs
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


# --- log-probabilities of a model's responses -----------------------------------------------------


def response_logps(model, examples: list[dict[str, Any]], *, pad_token_id: int, batch_size: int | None = None,
                   share_prompt: bool = True, device=None) -> list[list[float]]:
    """The summed log-probability of every response of every example (``[chosen, neg...]`` of
    :func:`~raydpo.training.data.tokenize_frame` rows) under ``model`` as it is (a quantised base,
    an adapter, the reference mode the caller entered): batches of ``batch_size`` examples
    (None: one batch) packed by :class:`~raydpo.training.data.PackedCollator` (``share_prompt``:
    each prompt once), moved to ``device`` (None: left where the collator puts them), without
    gradients and in eval mode (the model's mode is restored). The one loop behind reference
    pre-computation, ``add_reference_columns`` and the trained model's probe."""
    import torch

    from .data import PackedCollator, packed_logps

    collate = PackedCollator(pad_token_id, share_prompt=share_prompt)
    step = batch_size if batch_size is not None else max(1, len(examples))
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(examples), step):
                part = examples[s : s + step]
                batch = collate([{"prompt_ids": ex["prompt_ids"], "responses": ex["responses"]} for ex in part])
                if device is not None:
                    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                lp = packed_logps(model, batch).cpu()
                out.extend(lp[i, : len(ex["responses"])].tolist() for i, ex in enumerate(part))
    finally:
        model.train(was_training)
    return out


# --- TrainingArguments ---------------------------------------------------------------------------


def training_kwargs(stage, ctx: WorkerContext, output_dir: Path, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments fields common to every trainer, with the CPU quirks handled: on CPU
    ``use_cpu=True`` (HF + DeepSpeed need it) and fp32; on GPU bf16 when the card supports it."""
    import torch

    bf16 = bool(ctx.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    steps = stage.checkpoint_every_steps
    kw: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=stage.batch_size,
        per_device_eval_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        num_train_epochs=float(stage.epochs),
        learning_rate=stage.learning_rate,
        lr_scheduler_type=stage.lr_scheduler,
        warmup_steps=stage.warmup_steps,
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        activation_checkpointing=stage.gradient_checkpointing,
        seed=stage.seed,
        data_seed=stage.seed,
        logging_strategy="steps",
        logging_steps=stage.logging_steps,
        save_strategy="steps" if steps else "epoch",
        save_total_limit=1,
        eval_strategy="epoch" if has_eval else "no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not ctx.use_gpu,
        bf16=bf16,
        fp16=False,
        deepspeed=ctx.deepspeed,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        optim="adamw_torch",
        save_only_model=False,
    )
    if steps:
        kw["save_steps"] = steps
    return kw


# --- saving adapters only ------------------------------------------------------------------------


def _exclude_tied_frozen_weights(engine) -> None:
    """DeepSpeed's ``exclude_frozen_parameters`` walks ``named_parameters()``, which lists a
    tied weight once (``embed_tokens``), so the frozen tied ``lm_head.weight`` - the whole
    embedding matrix - still went into every checkpoint. Drop every frozen name."""
    if getattr(engine, "_raydpo_excludes_tied", False):
        return
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters:
            prefix = kwargs.get("prefix", "")
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(prefix + name, None)
        return sd

    engine.module_state_dict = module_state_dict
    engine._raydpo_excludes_tied = True


class AdapterSaveMixin:
    """Save only the trainable ``"default"`` adapter of a PEFT policy (never the frozen base,
    never the frozen ``"ref"`` adapter) in checkpoints and at the end."""

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if getattr(self, "is_deepspeed_enabled", False):
            _exclude_tied_frozen_weights(self.model_wrapped)
        return super()._save_optimizer_and_scheduler(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from peft import PeftModel

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is not None:
            state_dict = {k: v for k, v in state_dict.items() if ".ref." not in k}
        model.save_pretrained(output_dir, state_dict=state_dict, selected_adapters=["default"])


# --- per-epoch reports ---------------------------------------------------------------------------


def summarize_logs(logs: list[dict]) -> dict[str, float]:
    """Mean of each logged metric over the log records since the last report."""
    sums: dict[str, list[float]] = {}
    for rec in logs:
        for k, v in rec.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                sums.setdefault(k, []).append(float(v))
    out = {}
    for k, vs in sums.items():
        if k in ("epoch", "step") or k.startswith("train_"):
            continue
        if k.startswith("eval_"):
            base = k[len("eval_"):]
            name = "eval_" + _METRIC_NAMES.get(base, base.replace("/", "_"))
            out[name] = vs[-1]
        else:
            out[_METRIC_NAMES.get(k, k.replace("/", "_"))] = sum(vs) / len(vs)
    return out


def make_report_callback(ctx: WorkerContext, stage_name: str, stage_index: int, extra_state: dict):
    from transformers import TrainerCallback

    class ReportCallback(TrainerCallback):
        """Reports metrics (mean over the epoch's logs) with the checkpoint HF just wrote: the
        adapter, optimizer, scheduler, RNG and trainer state; rank 0 adds ``raydpo_state.json``.
        Also the failure injection of the tests (``fail_at_step``, first attempt only)."""

        def __init__(self) -> None:
            self.logs: list[dict] = []
            self.start_step = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = int(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append(dict(logs))

        def on_step_end(self, args, state, control, **kwargs):
            if ctx.fail_at_step is not None and state.global_step == ctx.fail_at_step and ctx.rank == ctx.fail_rank:
                marker = ctx.run_dir / FAIL_MARKER
                if not marker.exists():
                    marker.write_text(f"{stage_name} step {state.global_step}\n")
                    # Ray Train's controller collects reports when it polls the workers (every 2 s):
                    # a report made less than a poll before a crash is lost, and the run resumes
                    # from the checkpoint before it. Wait, so the test kills a worker whose last
                    # checkpoint Ray knows about.
                    time.sleep(FAIL_DELAY_S)
                    os._exit(17)  # a worker dies without any cleanup, as a killed process would

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            metrics = summarize_logs(self.logs)
            metrics.update({"stage": stage_name, "stage_index": stage_index, "epoch": float(state.epoch or 0.0),
                            "step": int(state.global_step), "max_steps": int(state.max_steps),
                            "resumed_from_step": self.start_step})
            if ctx.is_main and ckpt.is_dir():
                (ckpt / STATE_FILE).write_text(json.dumps({**extra_state, "stage": stage_name,
                                                            "stage_index": stage_index,
                                                            "step": int(state.global_step)}, indent=2))
            ctx.record(metrics)
            if ckpt.is_dir():  # a SHA-256 of every file, checked before anyone resumes from it
                from ..storage import write_manifest

                write_manifest(ckpt, ctx.rank)
            ctx.report(metrics, ckpt, name=f"{stage_index:02d}-{stage_name}-step{state.global_step:07d}")
            self.logs.clear()

    return ReportCallback()


__all__ = [
    "STATE_FILE",
    "AdapterSaveMixin",
    "ModelState",
    "WorkerContext",
    "disable_dropout",
    "load_policy",
    "make_report_callback",
    "release",
    "response_logps",
    "summarize_logs",
    "training_kwargs",
]
