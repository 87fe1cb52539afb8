"""Training data: reading and checking stage data, tokenising it the one raydpo way, collating.

Every row is tokenised as in :mod:`raydpo.prompt`: the prompt is the user message rendered with
the model's chat template (:func:`~raydpo.prompt.render_user_message`) and encoded without
special tokens; each response (``'"Title"'``) is encoded on its own and ends with the real EOS
id; prompt and response ids are concatenated. So a title has the same tokens in SFT, in the
candidate trie, in DPO, in S-DPO and at prediction time.

Collators:

* :class:`SFTCollator`: ``prompt + response`` rows, labels on the response only.
* :class:`PackedCollator`: preference rows for S-DPO / DS-DPO (and reference pre-computation):
  with ``share_prompt`` each example is **one** row ``[prompt | chosen | neg_1 | ... | neg_K]``
  whose responses all attend to the prompt and to themselves only (a 4D attention mask), so the
  shared prompt is encoded once; missing negatives are simply absent (``slot_mask``), never
  padded with empty strings. Without ``share_prompt`` every (prompt, response) is its own row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError, RaydpoError
from ..prompt import encode_prompt, encode_response_text, render_user_message, response_text, user_message

REF_CHOSEN = "ref_chosen_logps"
REF_REJECTED = "ref_rejected_logps"
BETAS = "betas"


# --- reading -------------------------------------------------------------------------------------


def sft_frame_from_dataset(dataset, split: str = "train") -> pd.DataFrame:
    """(prompt, chosen) rows of a raydpo dataset split: the user message and the quoted target."""
    frame = dataset.split(split).frame
    if not len(frame):
        raise DataError(f"split {split!r} is empty", path=getattr(dataset.samples, "path", None), field="split")
    return pd.DataFrame({
        "sample_id": frame["sample_id"].astype(str).tolist(),
        "prompt": [user_message(list(h), dataset.instruction) for h in frame["history_titles"]],
        "chosen": [response_text(t) for t in frame["target_title"]],
        "chosen_item_id": frame["target_item_id"].astype("int64").tolist(),
    })


def _check_ref_columns(frame: pd.DataFrame, path: str | None) -> None:
    has_c, has_r = REF_CHOSEN in frame.columns, REF_REJECTED in frame.columns
    if has_c != has_r:
        raise DataError(f"both {REF_CHOSEN} and {REF_REJECTED} are needed for precomputed reference log-probs",
                        path=path, field=REF_REJECTED if has_c else REF_CHOSEN)
    if not has_c:
        return
    ids = frame["sample_id"] if "sample_id" in frame.columns else range(len(frame))
    for sid, c, r, neg in zip(ids, frame[REF_CHOSEN], frame[REF_REJECTED], frame["rejected"]):
        if c is None or not math.isfinite(float(c)):
            raise DataError("reference log-prob is missing or not finite", path=path, record=sid, field=REF_CHOSEN)
        r = [r] if isinstance(r, (int, float)) else list(r if r is not None else [])
        if len(r) != len(neg):
            raise DataError(f"{len(r)} reference log-probs for {len(neg)} negatives", path=path, record=sid,
                            field=REF_REJECTED)
        if not all(math.isfinite(float(x)) for x in r):
            raise DataError("reference log-prob is not finite", path=path, record=sid, field=REF_REJECTED)


def read_stage_frame(source: str | Path, *, need_negatives: bool, dataset=None, split: str = "train",
                     max_rows: int | None = None) -> pd.DataFrame:
    """The rows of a stage: a preference file (``.parquet`` / ``.jsonl``, see
    :mod:`raydpo.data.preference`) or, for SFT, a raydpo dataset folder (``split``). Raises a
    DataError naming the file, record and field of the first bad row."""
    from ..data import load_dataset
    from ..data.preference import read_preferences

    path = Path(source)
    if path.is_dir():
        if need_negatives:
            raise DataError("preference stages need a preference file (.parquet/.jsonl), not a dataset folder",
                            path=path)
        frame = sft_frame_from_dataset(load_dataset(path), split)
    elif not path.exists():
        raise DataError("file not found", path=path)
    elif path.suffix not in (".parquet", ".jsonl"):
        raise DataError("expected a .parquet or .jsonl preference file", path=path)
    else:
        frame = read_preferences(path, min_negatives=int(need_negatives))
    if not len(frame):
        raise DataError("no rows", path=path)
    if max_rows is not None:
        frame = frame.iloc[:max_rows].reset_index(drop=True)
    if "sample_id" not in frame.columns:
        frame["sample_id"] = [str(i) for i in range(len(frame))]
    if need_negatives:
        _check_ref_columns(frame, str(path))
    return frame.reset_index(drop=True)


# --- tokenising ----------------------------------------------------------------------------------


def prompt_token_ids(tokenizer, message: str) -> list[int]:
    """A user message as prompt ids: chat template with the assistant turn opened, no extra
    special tokens (:func:`raydpo.prompt.render_user_message` + :func:`~raydpo.prompt.encode_prompt`)."""
    return encode_prompt(tokenizer, render_user_message(tokenizer, message))


def _encode_many(tokenizer, texts: Sequence[str], fn) -> dict[str, list[int]]:
    uniq = list(dict.fromkeys(texts))
    return {t: fn(tokenizer, t) for t in uniq}


def tokenize_frame(frame: pd.DataFrame, tokenizer, *, max_length: int, max_negatives: int | None = None,
                   with_negatives: bool = True, path: str | None = None) -> list[dict[str, Any]]:
    """One dict per row: ``prompt_ids``, ``responses`` (chosen first, then the negatives in
    order, at most ``max_negatives``), and when present ``ref_logps`` (aligned with
    ``responses``) and ``betas`` (one per negative). A row whose prompt plus longest response
    exceeds ``max_length`` tokens raises a DataError (nothing is truncated silently)."""
    prompts = _encode_many(tokenizer, list(frame["prompt"]), prompt_token_ids)
    texts = list(frame["chosen"])
    if with_negatives:
        for negs in frame["rejected"]:
            texts.extend(negs[:max_negatives] if max_negatives else negs)
    responses = _encode_many(tokenizer, texts, encode_response_text)
    has_ref = REF_CHOSEN in frame.columns and with_negatives
    has_betas = BETAS in frame.columns and with_negatives
    out = []
    for i, row in enumerate(frame.itertuples(index=False)):
        row = row._asdict()
        negs = list(row["rejected"]) if with_negatives else []
        if max_negatives:
            negs = negs[:max_negatives]
        resp = [responses[row["chosen"]]] + [responses[n] for n in negs]
        p = prompts[row["prompt"]]
        longest = len(p) + max(len(r) for r in resp)
        if longest > max_length:
            raise DataError(f"prompt + response is {longest} tokens, more than max_length={max_length} "
                            "(raise max_length or shorten the history)", path=path, record=row.get("sample_id", i),
                            field="prompt")
        ex: dict[str, Any] = {"prompt_ids": p, "responses": resp}
        if has_ref:
            ref_r = row[REF_REJECTED]
            ref_r = [ref_r] if isinstance(ref_r, (int, float)) else list(ref_r)
            ex["ref_logps"] = [float(row[REF_CHOSEN])] + [float(x) for x in ref_r[: len(negs)]]
        if has_betas:
            ex["betas"] = [float(b) for b in list(row[BETAS])[: len(negs)]]
        out.append(ex)
    return out


def to_pairs(examples: Iterable[dict[str, Any]], mode: str = "first") -> list[dict[str, Any]]:
    """TRL's tokenised pair format ``{prompt_ids, chosen_ids, rejected_ids}`` (+ reference
    columns): the first negative of each row, or one pair per negative (``all``)."""
    out = []
    for ex in examples:
        negs = range(1, len(ex["responses"])) if mode == "all" else range(1, 2)
        for j in negs:
            pair = {"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["responses"][0],
                    "rejected_ids": ex["responses"][j]}
            if "ref_logps" in ex:
                pair["ref_chosen_logps"] = ex["ref_logps"][0]
                pair["ref_rejected_logps"] = ex["ref_logps"][j]
            out.append(pair)
    return out


# --- collators -----------------------------------------------------------------------------------


@dataclass
class SFTCollator:
    """Right-padded ``prompt + response`` rows; labels are -100 on the prompt and the padding,
    so the loss covers the response (the quoted title and EOS) only."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        seqs = [ex["prompt_ids"] + ex["responses"][0] for ex in examples]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (ex, s) in enumerate(zip(examples, seqs)):
            n, p = len(s), len(ex["prompt_ids"])
            ids[i, :n] = torch.tensor(s)
            mask[i, :n] = 1
            labels[i, p:n] = torch.tensor(s[p:])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class PackedCollator:
    """Preference examples as packed rows (see the module docstring).

    Output: ``input_ids``, ``position_ids``, ``segment_ids`` ``[R, L]`` (-1 padding, 0 prompt,
    k >= 1 the k-th response of the row); the response tokens flattened as ``tok_row``,
    ``tok_pred`` (the position whose logits predict the token: the previous token, or the last
    prompt token for a response's first token), ``tok_target`` and ``tok_out``
    (``example * S + slot``); ``slot_mask`` ``[B, S]`` with ``S = 1 + max negatives`` (slot 0 is
    the chosen response); ``ref_logps`` ``[B, S]`` and ``betas`` ``[B, S - 1]`` when the examples
    carry them.
    """

    pad_token_id: int
    share_prompt: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        B = len(examples)
        S = max(len(ex["responses"]) for ex in examples)
        rows: list[tuple[list[int], list[list[int]], list[int]]] = []  # prompt, responses, out index per response
        for b, ex in enumerate(examples):
            outs = [b * S + s for s in range(len(ex["responses"]))]
            if self.share_prompt:
                rows.append((ex["prompt_ids"], ex["responses"], outs))
            else:
                rows.extend((ex["prompt_ids"], [r], [o]) for r, o in zip(ex["responses"], outs))
        L = max(len(p) + sum(len(r) for r in rs) for p, rs, _ in rows)
        R = len(rows)
        ids = torch.full((R, L), self.pad_token_id, dtype=torch.long)
        pos = torch.zeros((R, L), dtype=torch.long)
        seg = torch.full((R, L), -1, dtype=torch.long)
        t_row, t_pred, t_tgt, t_out = [], [], [], []
        for i, (p, rs, outs) in enumerate(rows):
            P = len(p)
            ids[i, :P] = torch.tensor(p)
            pos[i, :P] = torch.arange(P)
            seg[i, :P] = 0
            at = P
            for k, (r, o) in enumerate(zip(rs, outs), start=1):
                n = len(r)
                ids[i, at : at + n] = torch.tensor(r)
                pos[i, at : at + n] = torch.arange(P, P + n)
                seg[i, at : at + n] = k
                t_row += [i] * n
                t_pred += [P - 1] + list(range(at, at + n - 1))
                t_tgt += r
                t_out += [o] * n
                at += n
        slot_mask = torch.zeros((B, S), dtype=torch.bool)
        for b, ex in enumerate(examples):
            slot_mask[b, : len(ex["responses"])] = True
        out: dict[str, Any] = {
            "input_ids": ids, "position_ids": pos, "segment_ids": seg,
            "tok_row": torch.tensor(t_row), "tok_pred": torch.tensor(t_pred),
            "tok_target": torch.tensor(t_tgt), "tok_out": torch.tensor(t_out), "slot_mask": slot_mask,
        }
        if all("ref_logps" in ex for ex in examples):
            ref = torch.zeros((B, S), dtype=torch.float32)
            for b, ex in enumerate(examples):
                ref[b, : len(ex["ref_logps"])] = torch.tensor(ex["ref_logps"], dtype=torch.float32)
            out["ref_logps"] = ref
        if all("betas" in ex for ex in examples) and S > 1:
            betas = torch.ones((B, S - 1), dtype=torch.float32)
            for b, ex in enumerate(examples):
                if ex["betas"]:
                    betas[b, : len(ex["betas"])] = torch.tensor(ex["betas"], dtype=torch.float32)
            out["betas"] = betas
        return out


def packed_attention_mask(segment_ids, dtype, attn_implementation: str | None):
    """The 4D mask of packed rows: a token attends to earlier prompt tokens and to earlier
    tokens of its own response; padding attends to itself only. Boolean for SDPA (True =
    attend), additive float for eager attention."""
    import torch

    seg = segment_ids
    L = seg.shape[1]
    causal = torch.ones((L, L), dtype=torch.bool, device=seg.device).tril()
    q = seg.unsqueeze(2)  # [R, L, 1]
    k = seg.unsqueeze(1)  # [R, 1, L]
    allowed = causal.unsqueeze(0) & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))
    allowed = allowed | (torch.eye(L, dtype=torch.bool, device=seg.device).unsqueeze(0) & (q < 0))
    allowed = allowed.unsqueeze(1)  # [R, 1, L, L]
    if attn_implementation in (None, "sdpa", "flex_attention"):
        return allowed
    zero = torch.zeros((), dtype=dtype, device=seg.device)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=seg.device))


def _attn_implementation(model) -> str | None:
    """The HF attention implementation of a model, looking through DDP / DeepSpeed / PEFT wrappers."""
    seen = 0
    while model is not None and seen < 8:
        cfg = getattr(model, "config", None)
        impl = getattr(cfg, "_attn_implementation", None)
        if impl is not None:
            return impl
        model = getattr(model, "module", None) or getattr(model, "base_model", None)
        seen += 1
    return None


def packed_logps(model, batch: dict[str, Any], n_examples: int | None = None):
    """Summed response log-probabilities ``[B, S]`` of a :class:`PackedCollator` batch (0 where
    ``slot_mask`` is False)."""
    import torch

    seg = batch["segment_ids"]
    shared = bool((seg.max(dim=1).values > 1).any())
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                              "use_cache": False}
    if shared:
        impl = _attn_implementation(model)
        if impl not in (None, "sdpa", "eager", "flex_attention"):
            raise RaydpoError(f"share_prompt needs sdpa or eager attention, not {impl!r}; set share_prompt: false")
        dtype = next(p for p in model.parameters()).dtype
        kwargs["attention_mask"] = packed_attention_mask(seg, dtype if dtype.is_floating_point else torch.float32,
                                                         impl)
    else:
        kwargs["attention_mask"] = (seg >= 0).long()
    logits = model(**kwargs).logits
    sel = logits[batch["tok_row"], batch["tok_pred"]].float()
    tok_lp = torch.log_softmax(sel, dim=-1).gather(-1, batch["tok_target"].unsqueeze(-1)).squeeze(-1)
    B, S = batch["slot_mask"].shape
    sums = torch.zeros(B * S, dtype=tok_lp.dtype, device=tok_lp.device).index_add(0, batch["tok_out"], tok_lp)
    return sums.view(B, S)


# --- a small negative sampler (tests, smoke runs, benchmarks) --------------------------------------


def random_preferences(dataset, split: str = "train", n_negatives: int = 1, seed: int = 0,
                       variable: bool = False, limit: int | None = None) -> pd.DataFrame:
    """Preference rows with random catalog negatives, in the :mod:`raydpo.data.preference` format:
    the ``random`` sampling strategy (:func:`raydpo.sampling.strategies.random`: never the target
    or a history item, no repeats, seeded by (seed, sample id)), i.e. what ``raydpo sample
    --strategy random`` gives for the same rows and seed. ``variable``: each row keeps its first
    1..n_negatives of them (the number drawn with ``seed``)."""
    from ..sampling.run import sample_negatives

    frame = dataset.split(split).frame
    if limit is not None:
        frame = frame.iloc[:limit]
    no_candidates = pd.DataFrame({"sample_id": frame["sample_id"].astype(str).tolist(),
                                  "candidate_item_ids": [[] for _ in range(len(frame))]})
    prefs, _ = sample_negatives(dataset, no_candidates, "random", seed=seed, n_negatives=n_negatives)
    if variable:
        keep = np.random.default_rng(seed).integers(1, n_negatives + 1, size=len(prefs))
        prefs["rejected"] = [list(r[:k]) for r, k in zip(prefs["rejected"], keep)]
        prefs["rejected_item_ids"] = [list(r[:k]) for r, k in zip(prefs["rejected_item_ids"], keep)]
    return prefs


__all__ = [
    "PackedCollator", "SFTCollator", "packed_attention_mask", "packed_logps", "prompt_token_ids",
    "random_preferences", "read_stage_frame", "sft_frame_from_dataset", "to_pairs",
    "tokenize_frame",
]
