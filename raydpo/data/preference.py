"""Preference datasets: what negative sampling writes and every trainer reads.

One record per sample::

    sample_id        str
    prompt           str        the user message, model-agnostic (raydpo.prompt.user_message)
    chosen           str        the response text of the target, '"Title"' (raydpo.prompt.response_text)
    rejected         list[str]  one or more negative responses, variable length, never padded
    chosen_item_id   int
    rejected_item_ids list[int]
    strategy         str

Trainers render ``prompt`` with the model's chat template and append the tokenizer's EOS to each
response (``raydpo.prompt``), so the same file trains any model. ``to_pairs`` gives TRL's
``{prompt, chosen, rejected: str}`` (first negative, or one row per negative).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from ..io import atomic_path

PREFERENCE_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("prompt", pa.string()),
    ("chosen", pa.string()),
    ("rejected", pa.list_(pa.string())),
    ("chosen_item_id", pa.int64()),
    ("rejected_item_ids", pa.list_(pa.int64())),
    ("strategy", pa.string()),
])
REQUIRED = ("prompt", "chosen", "rejected")


def validate_preferences(frame: pd.DataFrame, path: str | None = None, min_negatives: int = 1) -> None:
    """Raise a DataError naming the record and field of the first bad record."""
    for f in REQUIRED:
        if f not in frame.columns:
            raise DataError("missing column", path=path, field=f)
    ids = frame["sample_id"] if "sample_id" in frame.columns else pd.Series(range(len(frame)))
    for i, (sid, prompt, chosen, rejected) in enumerate(zip(ids, frame["prompt"], frame["chosen"], frame["rejected"])):
        rec = sid if "sample_id" in frame.columns else i
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError("empty prompt", path=path, record=rec, field="prompt")
        if not isinstance(chosen, str) or not chosen.strip():
            raise DataError("empty chosen response", path=path, record=rec, field="chosen")
        negs = [rejected] if isinstance(rejected, str) else list(rejected) if rejected is not None else []
        if len(negs) < min_negatives:
            raise DataError(f"{len(negs)} negatives (need at least {min_negatives})", path=path, record=rec,
                            field="rejected")
        for j, r in enumerate(negs):
            if not isinstance(r, str) or not r.strip():
                raise DataError(f"negative {j} is empty", path=path, record=rec, field="rejected")


def write_preferences(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write Parquet (``.parquet``) or JSONL (``.jsonl``) atomically."""
    path = Path(path)
    validate_preferences(frame, str(path))
    with atomic_path(path) as tmp:
        if path.suffix == ".jsonl":
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        else:
            cols = [c for c in PREFERENCE_SCHEMA.names if c in frame.columns]
            pq.write_table(pa.Table.from_pandas(frame[cols], preserve_index=False), tmp)
    return path


def read_preferences(path: str | Path, min_negatives: int = 1) -> pd.DataFrame:
    from ..readers import check_file, decode_utf8, one_line, read_bytes

    path = check_file(path, "preference file")
    try:
        if path.suffix == ".jsonl":
            import io

            frame = pd.read_json(io.StringIO(decode_utf8(read_bytes(path), path)), lines=True)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, pa.ArrowException, RecursionError) as e:
        raise DataError(f"unreadable preference file: {one_line(e)}", path=path) from None
    if "rejected" in frame.columns:
        frame["rejected"] = [[r] if isinstance(r, str) else [] if r is None else list(r) for r in frame["rejected"]]
    else:  # an SFT-only file (min_negatives=0) has no negatives; otherwise validation names the field
        frame["rejected"] = [[] for _ in range(len(frame))] if min_negatives == 0 else None
    validate_preferences(frame, str(path), min_negatives)
    return frame


def to_pairs(frame: pd.DataFrame, mode: Literal["first", "explode"] = "first") -> pd.DataFrame:
    """TRL's pair format: ``rejected`` a string (the first negative, or one row per negative)."""
    f = frame.copy()
    if mode == "explode":
        f = f.explode("rejected", ignore_index=True)
    else:
        f["rejected"] = [r[0] if len(r) else None for r in f["rejected"]]
    return f
