"""DPO (and every other TRL pairwise loss) through TRL's ``DPOTrainer``.

TRL 1.16 tokenises raw text itself (``prompt + chosen`` as one string, with the EOS *text*
appended), and its ``_prepare_dataset`` has no pass-through for tokenised data. raydpo feeds
pairs already tokenised the raydpo way (:mod:`raydpo.training.data`: chat-template prompt ids,
then each response's ids + EOS id) and skips that step, so DPO sees exactly the tokens of SFT,
of the candidate trie and of prediction. TRL's collator concatenates ``prompt_ids + chosen_ids``
and ``prompt_ids + rejected_ids`` and masks the prompt.

Reference (see :mod:`raydpo.training.reference`): TRL computes the reference on the fly with the
adapter disabled or with a frozen ``"ref"`` adapter (raydpo attaches the one the stage asks
for), or reads ``ref_chosen_logps`` / ``ref_rejected_logps`` columns: raydpo fills them from the
data or computes them once before training, and TRL then runs no reference pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import reference as ref_mod
from .common import AdapterSaveMixin, WorkerContext, training_kwargs
from .data import to_pairs


def _trainer_class():
    from trl import DPOTrainer

    class RaydpoDPOTrainer(AdapterSaveMixin, DPOTrainer):
        """TRL's DPOTrainer on pre-tokenised pairs, saving the policy adapter only."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset  # tokenised by raydpo (lengths already checked against max_length)
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        one_pair_per_example = True  # False when a row's several negatives became several pairs

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # TRL's rewards/accuracies is per pair: log it as rewards/pair_accuracy, and as
            # rewards/accuracies (chosen beats every negative) only where the two are the same
            for metrics in self._metrics.values():
                if "rewards/accuracies" in metrics:
                    metrics["rewards/pair_accuracy"] = metrics.pop("rewards/accuracies")
                    if self.one_pair_per_example:
                        metrics["rewards/accuracies"] = list(metrics["rewards/pair_accuracy"])
            super().log(logs, start_time)

    return RaydpoDPOTrainer


def _keep_fp32_adapter(model) -> None:
    """TRL 1.16 casts the trainable LoRA weights of a quantised (QLoRA) model to bf16. Undo it:
    raydpo's SFT and S-DPO trainers, and the published runs (which passed a ready PeftModel to
    TRL 0.16), train fp32 adapters; in bf16, steps of lr 1e-5 are mostly lost to rounding, and a
    saved adapter would no longer reproduce the trained model's numbers when reloaded."""
    import torch

    from ..models.quantization import model_is_quantized

    if not model_is_quantized(model):
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def dpo_config(stage, ctx: WorkerContext, output_dir: Path, has_eval: bool):
    """A DPOConfig with TRL's GPU-minded defaults replaced (bf16, gradient checkpointing and
    lr 1e-6 are TRL defaults; raydpo sets them from the stage)."""
    from trl import DPOConfig

    kw = training_kwargs(stage, ctx, output_dir, has_eval)
    kw["gradient_checkpointing"] = kw.pop("activation_checkpointing")  # TRL's field (default True)
    kw.update(beta=stage.beta, loss_type=[stage.loss], max_length=None, precompute_ref_log_probs=False,
              disable_dropout=stage.disable_dropout, **stage.trl_args)
    return DPOConfig(**kw)


def build_trainer(stage, model, tokenizer, train_examples: list[dict[str, Any]],
                  eval_examples: list[dict[str, Any]] | None, ctx: WorkerContext, output_dir: Path,
                  callbacks: list, spec: ref_mod.ReferenceSpec):
    """``train_examples``: :func:`~raydpo.training.data.tokenize_frame` rows (with ``ref_logps``
    when the reference is precomputed)."""
    from datasets import Dataset

    args = dpo_config(stage, ctx, output_dir, has_eval=bool(eval_examples))
    train = Dataset.from_list(to_pairs(train_examples, stage.pairs))
    evald = Dataset.from_list(to_pairs(eval_examples, stage.pairs)) if eval_examples else None
    trainer = _trainer_class()(model=model, ref_model=None, args=args, train_dataset=train, eval_dataset=evald,
                               processing_class=tokenizer, callbacks=callbacks)
    _keep_fp32_adapter(trainer.model)
    trainer.one_pair_per_example = len(train) == len(train_examples) and (
        evald is None or len(evald) == len(eval_examples))
    # TRL copies a continued adapter as "ref" (or uses the adapter-disabled base); attach the
    # reference this stage asks for instead, or none when the numbers are given
    ref_mod.attach(trainer.model, spec if not (spec.precompute or spec.from_data) else ref_mod.ReferenceSpec())
    if "ref_chosen_logps" in train.column_names:
        trainer.precompute_ref_logps = True
    return trainer


__all__ = ["build_trainer", "dpo_config"]
