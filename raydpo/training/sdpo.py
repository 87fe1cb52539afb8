"""S-DPO and DS-DPO: a softmax DPO loss over a variable number of negatives per example.

TRL has no multi-negative loss, so this is an HF ``Trainer`` with raydpo's collator and loss:

* :class:`~raydpo.training.data.PackedCollator` puts an example's prompt, chosen response and
  its K_i negatives in **one** row with a 4D attention mask, so the shared prompt is encoded
  once per step (the reference forwarded ``[chosen; rejected_1..5]`` each with its own copy of
  the prompt, at batch 1, through policy and reference). Missing negatives are absent and
  masked out of the loss; the reference padded to 5 with ``""`` (EOS-only responses) that still
  entered the softmax (method.md 6.2, 11.7).
* :func:`raydpo.training.losses.sdpo`: ``-log sigmoid(-log sum_i exp(beta_i (d_i - d_w)))``,
  ``beta_i = beta`` for S-DPO, the per-negative betas of the data (``betas`` column, computed
  by :func:`raydpo.training.dsdpo.add_betas`) for DS-DPO.
* The reference: adapter disabled / frozen ``"ref"`` adapter in the same forward pass under
  ``no_grad``, or precomputed numbers (``ref_logps``) and no reference pass.

With one negative per example the loss, its gradient and the reward metrics are TRL's sigmoid
DPO (``tests/test_training.py`` checks it numerically).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from . import reference as ref_mod
from .common import AdapterSaveMixin, WorkerContext, disable_dropout, training_kwargs
from .data import PackedCollator, packed_logps
from .losses import preference_stats, sdpo


def _trainer_class():
    from transformers import Trainer

    class SDPOTrainer(AdapterSaveMixin, Trainer):
        """HF Trainer computing :func:`~raydpo.training.losses.sdpo` on packed batches."""

        loss_is_scaled_for_ga = False  # compute_loss returns a batch mean: the Trainer divides by GA

        def __init__(self, *args, beta: float = 0.1, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.beta = beta
            self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list),
                                                                "eval": defaultdict(list)}

        def sequence_logps(self, model, inputs: dict[str, Any]) -> torch.Tensor:
            return packed_logps(model, inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            policy = self.sequence_logps(model, inputs)  # [B, S]
            if "ref_logps" in inputs:
                ref = inputs["ref_logps"].to(policy.dtype)
            else:
                with torch.no_grad(), ref_mod.reference_mode(self.accelerator.unwrap_model(self.model)):
                    ref = self.sequence_logps(model, inputs)
            mask = inputs["slot_mask"][:, 1:]
            beta = inputs["betas"] if "betas" in inputs else self.beta
            losses = sdpo(policy[:, 0], policy[:, 1:], ref[:, 0], ref[:, 1:], mask, beta)
            loss = losses.mean()
            stats = preference_stats(policy[:, 0], policy[:, 1:], ref[:, 0], ref[:, 1:], mask, self.beta)
            stats["logps/chosen"] = policy[:, 0].detach().mean()
            stats["logps/rejected"] = policy[:, 1:].detach()[mask].mean()
            stats["negatives"] = mask.sum(dim=1).float().mean()
            for k, v in stats.items():
                self._metrics[mode][k].append(self.accelerator.gather_for_metrics(v.detach().reshape(1)).mean().item())
            return (loss, {"policy_logps": policy}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            mode = "train" if self.model.training else "eval"
            metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
            if mode == "eval":
                metrics = {f"eval_{k}": v for k, v in metrics.items()}
            logs.update(metrics)
            super().log(logs, start_time)
            self._metrics[mode].clear()

    return SDPOTrainer


def build_trainer(stage, model, tokenizer, train_examples: list[dict[str, Any]],
                  eval_examples: list[dict[str, Any]] | None, ctx: WorkerContext, output_dir: Path,
                  callbacks: list, spec: ref_mod.ReferenceSpec):
    """``train_examples``: :func:`~raydpo.training.data.tokenize_frame` rows (``betas`` for
    DS-DPO, ``ref_logps`` when the reference is precomputed)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    args = TrainingArguments(**training_kwargs(stage, ctx, output_dir, has_eval=bool(eval_examples)))
    if stage.disable_dropout:
        disable_dropout(model)
    ref_mod.attach(model, spec if not (spec.precompute or spec.from_data) else ref_mod.ReferenceSpec())
    train = Dataset.from_list(train_examples)
    evald = Dataset.from_list(eval_examples) if eval_examples else None
    return _trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=evald,
                            data_collator=PackedCollator(tokenizer.pad_token_id, share_prompt=stage.share_prompt),
                            processing_class=tokenizer, callbacks=callbacks, beta=stage.beta)


__all__ = ["build_trainer"]
