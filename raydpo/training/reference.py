"""The reference model of a preference stage, without a second copy of the base model.

The policy is always ``base + LoRA adapter "default"``. The reference is one of

* the base with every adapter disabled (``adapter_disabled``, and ``initial`` for a stage that
  starts a new LoRA: a fresh LoRA is the identity, so the two are the same model);
* a frozen adapter named ``"ref"`` on the same base (``initial`` for a stage that continues an
  adapter: a frozen copy of it; ``start``, ``stage:NAME`` or a path: that adapter);
* numbers: reference log-probabilities given with the data or computed once before training
  (:func:`precompute_logps`), so training runs no reference forward pass at all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import RaydpoError

REF_ADAPTER = "ref"


@dataclass(frozen=True)
class ReferenceSpec:
    """``adapter``: the folder of the frozen reference adapter, or None for the base model with
    adapters disabled. ``precompute``: compute log-probs once before training. ``from_data``:
    the data carries them."""

    adapter: str | None = None
    precompute: bool = False
    from_data: bool = False


def resolve(reference: str, *, start_adapter: str | None, plan_start_adapter: str | None,
            stage_adapters: dict[str, str | None], precompute: bool, data_has_ref: bool) -> ReferenceSpec:
    """Turn a stage's ``reference`` setting into a :class:`ReferenceSpec`.

    ``start_adapter``: the adapter this stage starts from (None: a new LoRA);
    ``plan_start_adapter``: the adapter the plan starts from; ``stage_adapters``: the output
    adapters of the earlier stages.
    """
    if reference == "precomputed":
        if data_has_ref:
            return ReferenceSpec(from_data=True)
        return ReferenceSpec(adapter=start_adapter, precompute=True)
    if reference == "initial":
        adapter = start_adapter
    elif reference == "start":
        adapter = plan_start_adapter
    elif reference == "adapter_disabled":
        adapter = None
    elif reference.startswith("stage:"):
        name = reference[len("stage:"):]
        if name not in stage_adapters:
            raise RaydpoError(f"reference {reference!r}: no such earlier stage output")
        adapter = stage_adapters[name]
    else:
        adapter = reference
    return ReferenceSpec(adapter=adapter, precompute=precompute)


def attach(model, spec: ReferenceSpec) -> None:
    """Load the reference adapter of ``spec`` (if any) frozen, as adapter ``"ref"``, and keep
    ``"default"`` active and trainable. Any earlier ``"ref"`` adapter is replaced."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)
    if spec.adapter is None or spec.from_data:
        return
    try:
        model.load_adapter(spec.adapter, adapter_name=REF_ADAPTER, is_trainable=False)
    except (OSError, ValueError, KeyError) as e:
        raise RaydpoError(f"cannot load reference adapter {spec.adapter!r}: {e}") from None
    model.set_adapter("default")
    for name, p in model.named_parameters():
        if f".{REF_ADAPTER}." in name:
            p.requires_grad_(False)


def detach(model) -> None:
    """Drop the ``"ref"`` adapter (after pre-computing, it is not needed any more)."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REF_ADAPTER)


@contextlib.contextmanager
def reference_mode(model) -> Iterator[None]:
    """Run the (unwrapped PEFT) model as the reference: adapter ``"ref"`` when attached, else
    with every adapter disabled. Trainability is restored on exit."""
    if REF_ADAPTER in getattr(model, "peft_config", {}):
        from trl.trainer.utils import use_adapter

        with use_adapter(model, adapter_name=REF_ADAPTER):
            yield
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:  # pragma: no cover - a full model has no adapter to disable
        raise RaydpoError("an on-the-fly reference needs a LoRA policy (adapter disabled or a 'ref' adapter)")


def precompute_logps(model, examples: list[dict[str, Any]], *, pad_token_id: int, batch_size: int,
                     rank: int = 0, world_size: int = 1, all_gather=None, device=None) -> list[list[float]]:
    """Reference log-probabilities of every response of every example (``[chosen, neg...]``),
    computed in :func:`reference_mode` with the shared-prompt packing; examples are split over
    the ranks and gathered, so every rank gets all of them."""
    import torch

    from .data import PackedCollator, packed_logps

    collate = PackedCollator(pad_token_id, share_prompt=True)
    mine = list(range(rank, len(examples), world_size))
    out: dict[int, list[float]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference_mode(model):
            for s in range(0, len(mine), batch_size):
                idx = mine[s : s + batch_size]
                batch = collate([examples[i] for i in idx])
                if device is not None:
                    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                lp = packed_logps(model, batch).cpu()
                for row, i in enumerate(idx):
                    out[i] = lp[row, : len(examples[i]["responses"])].tolist()
    finally:
        model.train(was_training)
    if world_size > 1:
        parts = all_gather(out)
        for part in parts:
            out.update(part)
    if len(out) != len(examples):  # pragma: no cover - a gather bug
        raise RaydpoError(f"reference pre-computation returned {len(out)} of {len(examples)} rows")
    return [out[i] for i in range(len(examples))]


__all__ = ["REF_ADAPTER", "ReferenceSpec", "attach", "detach", "precompute_logps", "reference_mode", "resolve"]
