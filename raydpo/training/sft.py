"""Supervised fine-tuning: the model learns to write the target's quoted title and EOS after the
prompt. The loss covers the response tokens only (the prompt is labelled -100), averaged over
all response tokens of the (accumulated) batch. LoRA by default; ``lora: null`` trains every
weight.

The published SFT appended a literal ``</s>`` (not SmolLM2's EOS) and, in SPRec, computed the
loss over the whole sequence; here the response ends with the tokenizer's real EOS id and the
prompt is masked (method.md 2, 11).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import AdapterSaveMixin, WorkerContext, training_kwargs
from .data import SFTCollator


def build_trainer(stage, model, tokenizer, train_examples: list[dict[str, Any]],
                  eval_examples: list[dict[str, Any]] | None, ctx: WorkerContext, output_dir: Path,
                  callbacks: list):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    class SFTTrainer(AdapterSaveMixin, Trainer):
        pass

    args = TrainingArguments(**training_kwargs(stage, ctx, output_dir, has_eval=bool(eval_examples)))
    keep = ("prompt_ids", "responses")
    train = Dataset.from_list([{k: ex[k] for k in keep} for ex in train_examples])
    evald = Dataset.from_list([{k: ex[k] for k in keep} for ex in eval_examples]) if eval_examples else None
    return SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evald,
                      data_collator=SFTCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                      callbacks=callbacks)


__all__ = ["build_trainer"]
