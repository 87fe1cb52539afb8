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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
    computed in :func:`reference_mode` with the shared-prompt packing
    (:func:`~raydpo.training.common.response_logps`); examples are split over the ranks and
    gathered, so every rank gets all of them."""
    from .common import response_logps

    mine = list(range(rank, len(examples), world_size))
    with reference_mode(model):
        lps = response_logps(model, [examples[i] for i in mine], pad_token_id=pad_token_id, batch_size=batch_size,
                             share_prompt=True, device=device)
    out: dict[int, list[float]] = dict(zip(mine, lps))
    if world_size > 1:
        parts = all_gather(out)
        for part in parts:
            out.update(part)
    if len(out) != len(examples):  # pragma: no cover - a gather bug
        raise RaydpoError(f"reference pre-computation returned {len(out)} of {len(examples)} rows")
    return [out[i] for i in range(len(examples))]


def add_reference_columns(frame, model_name_or_path: str, *, adapter: str | None = None, batch_size: int = 16,
                          device: str = "auto", max_length: int = 4096, quantization: str = "none",
                          compute_dtype: str = "auto"):
    """``frame`` (preference rows) with ``ref_chosen_logps`` and ``ref_rejected_logps`` computed
    by ``model_name_or_path`` (+ ``adapter``), e.g. the SFT model, once and offline: a stage with
    ``reference: precomputed`` then runs no reference pass. The numbers are raydpo's
    tokenisation (the same as :func:`raydpo.models.sequence_logprobs`). ``quantization``: load
    the base as the training stage will (``nf4`` for QLoRA), so the numbers are its reference's."""
    from ..models import load_model
    from .common import response_logps
    from .data import tokenize_frame

    model, tok = load_model(model_name_or_path, adapter=adapter, device=device, quantization=quantization,
                            compute_dtype=compute_dtype)
    frame = frame.copy()
    frame["rejected"] = [[r] if isinstance(r, str) else list(r) for r in frame["rejected"]]
    examples = tokenize_frame(frame.drop(columns=[c for c in ("ref_chosen_logps", "ref_rejected_logps", "betas")
                                                  if c in frame.columns]), tok, max_length=max_length)
    out = response_logps(model, examples, pad_token_id=tok.pad_token_id, batch_size=batch_size, share_prompt=True,
                         device=next(model.parameters()).device)
    frame["ref_chosen_logps"] = [o[0] for o in out]
    frame["ref_rejected_logps"] = [o[1:] for o in out]
    return frame


__all__ = ["REF_ADAPTER", "ReferenceSpec", "add_reference_columns", "attach", "detach", "precompute_logps",
           "reference_mode", "resolve"]
