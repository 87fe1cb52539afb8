"""Import the research code's candidate and preference files (ClusterExposure-DPO / SPRec) into
raydpo's tables, so a researcher can continue with raydpo from the files they already have.

Research files (one per split, a JSON list, or JSONL with one object per line)::

    candidates   {instruction, input, output | chosen, rejected: ["\\"Title\\"", ...], ...}
                 or the beam-candidate form {prompt, chosen, rejected: [...]}
    preferences  {prompt, chosen, rejected: "\\"Title\\"\\n" | ["\\"Title\\"", ...]}

Every record is matched to a row of the dataset split it belongs to, by its history and its
target, never by raydpo's ids:

* the history text is ``input`` (else ``prompt``); the quoted list in it (from its first to its
  last double quote) must equal the row's history ``"A", "B", ...`` (the research code's
  ``", ".join('"' + t + '"' ...)``), or at least contain it;
* the target is ``chosen`` (else ``output``), compared with the row's target after
  :func:`strip_title` (the evaluator's rule: surrounding quotes, spaces and newlines removed).

Rows that several records match exactly (the same history and target twice in a split) are
taken in file order; a record finding no free row is *unmatched* (an error naming the file, the
record and the field, or skipped and counted with ``unmatched="skip"``).

Candidate / rejected titles go through :func:`strip_title` and are looked up in the catalog
(exact text: inner spaces are significant). Titles outside the catalog are kept with item id -1
and their text (``unknown="keep"``) or dropped (``"drop"``), and counted; empty titles (``""``)
are always dropped and counted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import pandas as pd
import pyarrow as pa

from ..errors import DataError
from ..prompt import format_history, response_text, user_message
from ..readers import decode_utf8, json_kind, loads_json, read_bytes
from .schema import UNKNOWN_ITEM, Dataset

Unknown = Literal["keep", "drop"]
Unmatched = Literal["error", "skip"]

HISTORY_FIELDS = ("input", "prompt")
TARGET_FIELDS = ("chosen", "output")

#: the candidates table written by ``raydpo data import-candidates`` (``raydpo sample`` reads it)
IMPORTED_CANDIDATES_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("candidate_item_ids", pa.list_(pa.int64())),
    ("candidate_titles", pa.list_(pa.string())),
    ("source_file", pa.string()),
    ("source_record", pa.int64()),
])


def strip_title(text: str) -> str:
    """The evaluator's rule (``raydpo.evaluation.evaluate.strip_title``): surrounding double
    quotes, spaces and newlines removed, nothing else changed."""
    return text.strip('" \n')


# --- reading -------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list:
    """The records of a research file: a JSON list, or JSONL (``.jsonl``: one JSON value per
    non-empty line). Every failure is one DataError naming the file (and the line of JSONL)."""
    path = Path(path)
    text = decode_utf8(read_bytes(path), path)
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    rows.append(loads_json(line, path))
                except DataError as e:
                    raise DataError(f"line {i + 1}: {e.reason}", path=path, field=e.field) from None
        return rows
    rows = loads_json(text, path)
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON list of records, got a JSON {json_kind(rows)}", path=path)
    return rows


def _string_field(row: dict, names: Sequence[str], path: Path, i: int, what: str) -> tuple[str, str]:
    """``(field name, value)`` of the first of ``names`` present; a DataError otherwise."""
    for name in names:
        if name in row:
            v = row[name]
            if not isinstance(v, str):
                raise DataError(f"expected a string, got {_kind(v)}", path=path, record=i, field=name)
            return name, v
    raise DataError(f"missing field (the {what}: {' or '.join(repr(n) for n in names)})", path=path, record=i,
                    field=names[0])


def _kind(v: Any) -> str:
    return f"a JSON {json_kind(v)}"


def _rejected(row: dict, path: Path, i: int, allow_string: bool) -> list[str]:
    if "rejected" not in row:
        raise DataError("missing field", path=path, record=i, field="rejected")
    v = row["rejected"]
    if isinstance(v, str) and allow_string:
        return [v]
    if not isinstance(v, list):
        want = "a string or a list of strings" if allow_string else "a list of candidate strings"
        raise DataError(f"expected {want}, got {_kind(v)}", path=path, record=i, field="rejected")
    for j, x in enumerate(v):
        if not isinstance(x, str):
            raise DataError(f"element {j} is {_kind(x)}, expected a string", path=path, record=i, field="rejected")
    return list(v)


# --- matching records to split rows ---------------------------------------------------------------


def quoted_span(text: str) -> str:
    """The text from the first to the last double quote (the history list of an ``input``)."""
    a, b = text.find('"'), text.rfind('"')
    return text[a : b + 1] if 0 <= a < b else ""


class SplitMatcher:
    """Finds the dataset row of a split that a record describes (see the module docstring)."""

    def __init__(self, dataset: Dataset, split: str) -> None:
        frame = dataset.split(split).frame
        self.split = split
        self.frame = frame
        self.exact: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.by_target: dict[str, list[int]] = defaultdict(list)
        self.quoted: list[str] = []
        for r, (hist, target) in enumerate(zip(frame["history_titles"], frame["target_title"])):
            q = format_history(list(hist))
            t = strip_title(target)
            self.quoted.append(q)
            self.exact[(q, t)].append(r)
            self.by_target[t].append(r)
        self.used: dict[int, int] = {}  # row -> record that took it

    def match(self, history_text: str, target: str) -> tuple[int | None, str | None]:
        """``(row, None)``, or ``(None, reason)`` with reason ``target``, ``history`` or ``duplicate``."""
        rows = self.exact.get((quoted_span(history_text), target))
        if not rows:
            rows = [r for r in self.by_target.get(target, ()) if self.quoted[r] in history_text]
        if not rows:
            return None, "history" if target in self.by_target else "target"
        for r in rows:
            if r not in self.used:
                return r, None
        return None, "duplicate"


@dataclass
class SplitImport:
    """One research file matched against one split: per record its row and titles."""

    split: str
    path: Path
    rows: list[int] = field(default_factory=list)  # dataset row (within the split) per kept record
    records: list[int] = field(default_factory=list)  # record index in the file per kept record
    prompts: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    negatives: list[list[tuple[str, int, str]]] = field(default_factory=list)  # (title, item id, raw text)
    counts: dict = field(default_factory=dict)


def _unmatched_error(path: Path, i: int, reason: str, split: str, hist_field: str, tgt_field: str,
                     target: str) -> DataError:
    if reason == "target":
        return DataError(f"no {split} row of the dataset has the target {target!r} (is the file for another "
                         "split or dataset?)", path=path, record=i, field=tgt_field)
    if reason == "history":
        return DataError(f"no {split} row with the target {target!r} has this history (is the file for another "
                         "split or dataset?)", path=path, record=i, field=hist_field)
    return DataError(f"matches {split} rows already taken by earlier records (every split row takes one record; "
                     "a duplicate record?)", path=path, record=i, field=hist_field)


def match_file(dataset: Dataset, split: str, path: str | Path, *, kind: Literal["candidates", "preferences"],
               unknown: Unknown = "keep", unmatched: Unmatched = "error") -> SplitImport:
    """Read one research file and match its records to ``split`` (see the module docstring)."""
    if unknown not in ("keep", "drop"):
        raise DataError(f"unknown must be 'keep' or 'drop', got {unknown!r}", field="unknown")
    if unmatched not in ("error", "skip"):
        raise DataError(f"unmatched must be 'error' or 'skip', got {unmatched!r}", field="unmatched")
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DataError("no records (an empty list)", path=path)
    catalog = dataset.catalog
    matcher = SplitMatcher(dataset, split)
    if not len(matcher.frame):
        raise DataError(f"the dataset has no {split} rows to match the file against", path=path)
    out = SplitImport(split=split, path=path)
    c = {"records": len(records), "matched": 0, "unmatched": 0, "unmatched_by_reason": {},
         "titles": 0, "unknown_titles": 0, "unknown_titles_kept": 0, "unknown_titles_dropped": 0,
         "empty_titles_dropped": 0, "unknown_targets": 0, "unknown_examples": []}
    unknown_examples: dict[str, None] = {}
    for i, row in enumerate(records):
        if not isinstance(row, dict):
            raise DataError(f"record is {_kind(row)}, expected a JSON object", path=path, record=i)
        hist_field, hist = _string_field(row, HISTORY_FIELDS, path, i, "history")
        tgt_field, tgt_text = _string_field(row, TARGET_FIELDS, path, i, "target")
        target = strip_title(tgt_text)
        if not target:
            raise DataError("empty target", path=path, record=i, field=tgt_field)
        negs = _rejected(row, path, i, allow_string=kind == "preferences")
        r, reason = matcher.match(hist, target)
        if r is None:
            if unmatched == "error":
                raise _unmatched_error(path, i, reason, split, hist_field, tgt_field, target)
            c["unmatched"] += 1
            c["unmatched_by_reason"][reason] = c["unmatched_by_reason"].get(reason, 0) + 1
            continue
        matcher.used[r] = i
        items: list[tuple[str, int, str]] = []
        for raw in negs:
            title = strip_title(raw)
            c["titles"] += 1
            if not title:
                c["empty_titles_dropped"] += 1
                continue
            item = catalog.id_of(title)
            if item == UNKNOWN_ITEM:
                c["unknown_titles"] += 1
                if len(unknown_examples) < 5:
                    unknown_examples.setdefault(title, None)
                if unknown == "drop":
                    c["unknown_titles_dropped"] += 1
                    continue
                c["unknown_titles_kept"] += 1
            items.append((title, item, raw))
        if catalog.id_of(target) == UNKNOWN_ITEM:
            c["unknown_targets"] += 1
        c["matched"] += 1
        out.rows.append(r)
        out.records.append(i)
        out.prompts.append(row["prompt"] if isinstance(row.get("prompt"), str) else hist)
        out.chosen.append(tgt_text)
        out.negatives.append(items)
    c["unknown_examples"] = list(unknown_examples)
    out.counts = c
    return out


# --- candidates -------------------------------------------------------------------------------------


def import_candidates(dataset: Dataset, files: dict[str, str | Path], *, unknown: Unknown = "drop",
                      unmatched: Unmatched = "error") -> tuple[pa.Table, dict]:
    """raydpo's candidates table from research candidate files (``{split: path}``), and the counts.

    One row per matched record, in file order (the files in the order given): ``sample_id`` (the
    dataset's), ``candidate_item_ids`` and ``candidate_titles`` in the file's order (-1 and the
    text for unknown titles kept), ``source_file`` and ``source_record`` (the record's index)."""
    parts = _match_all(dataset, files, "candidates", unknown, unmatched)
    sids, ids, titles, src, rec = [], [], [], [], []
    for imp in parts:
        frame_ids = _sample_ids(dataset, imp.split)
        for r, i, negs in zip(imp.rows, imp.records, imp.negatives):
            sids.append(str(frame_ids[r]))
            ids.append([n[1] for n in negs])
            titles.append([n[0] for n in negs])
            src.append(str(imp.path))
            rec.append(i)
    table = pa.table({"sample_id": pa.array(sids, pa.string()),
                      "candidate_item_ids": pa.array(ids, pa.list_(pa.int64())),
                      "candidate_titles": pa.array(titles, pa.list_(pa.string())),
                      "source_file": pa.array(src, pa.string()),
                      "source_record": pa.array(rec, pa.int64())}, schema=IMPORTED_CANDIDATES_SCHEMA)
    return table, _summary(parts, "candidates", unknown, unmatched, rows=table.num_rows,
                           candidates=sum(len(x) for x in ids))


def _sample_ids(dataset: Dataset, split: str) -> list:
    return dataset.split(split).frame["sample_id"].astype(str).tolist()


def _match_all(dataset: Dataset, files: dict[str, str | Path], kind, unknown, unmatched) -> list[SplitImport]:
    if not files:
        raise DataError("no research files given (one per split: train, valid or test)", field="split")
    return [match_file(dataset, split, path, kind=kind, unknown=unknown, unmatched=unmatched)
            for split, path in files.items()]


def _summary(parts: list[SplitImport], kind: str, unknown: str, unmatched: str, options: dict | None = None,
             **extra) -> dict:
    options = options or {}
    keys = ("records", "matched", "unmatched", "titles", "unknown_titles", "unknown_titles_kept",
            "unknown_titles_dropped", "empty_titles_dropped", "unknown_targets")
    total = {k: sum(p.counts[k] for p in parts) for k in keys}
    return {"kind": kind, "options": {"unknown": unknown, "unmatched": unmatched, **options}, **extra, **total,
            "files": {p.split: {"path": str(p.path), **p.counts} for p in parts}}


def format_counts(summary: dict) -> str:
    """Lines for the terminal: per file and in total."""
    lines = []
    for split, c in summary["files"].items():
        lines.append(f"  {split}: {c['path']}: {c['records']} records, {c['matched']} matched, "
                     f"{c['unmatched']} unmatched{_reasons(c)}, {c['titles']} titles, "
                     f"{c['unknown_titles']} unknown ({c['unknown_titles_kept']} kept, "
                     f"{c['unknown_titles_dropped']} dropped){_examples(c)}, {c['empty_titles_dropped']} empty dropped")
    s = summary
    lines.append(f"  total: {s['records']} records, {s['matched']} matched, {s['unmatched']} unmatched, "
                 f"{s['unknown_titles']} unknown titles ({s['unknown_titles_kept']} kept, "
                 f"{s['unknown_titles_dropped']} dropped), {s['unknown_targets']} targets outside the catalog")
    return "\n".join(lines)


def _reasons(c: dict) -> str:
    r = c.get("unmatched_by_reason") or {}
    return f" ({', '.join(f'{k} {v}' for k, v in sorted(r.items()))})" if r else ""


def _examples(c: dict) -> str:
    ex = c.get("unknown_examples") or []
    return f", e.g. {ex[:3]}" if ex else ""


# --- preferences ------------------------------------------------------------------------------------


def import_preferences(dataset: Dataset, files: dict[str, str | Path], *, unknown: Unknown = "keep",
                       unmatched: Unmatched = "error", keep_text: bool = False,
                       strategy: str = "imported") -> tuple[dict[str, pd.DataFrame], dict]:
    """raydpo preference frames (``raydpo.data.preference``), one per split, and the counts.

    By default the texts are raydpo's: ``prompt`` is ``user_message`` of the matched row's history
    (the prompt raydpo's SFT and prediction use), ``chosen`` the row's target and every negative
    ``'"Title"'`` (the research self-play files end rejected with a newline and chosen without:
    a shortcut DPO learns, method.md section 11). ``keep_text`` keeps the file's ``prompt``,
    ``chosen`` and ``rejected`` texts verbatim (the published training data, byte for byte).
    A record left without negatives (all dropped) is skipped and counted."""
    parts = _match_all(dataset, files, "preferences", unknown, unmatched)
    frames: dict[str, pd.DataFrame] = {}
    no_negs_total = 0
    for imp in parts:
        f = dataset.split(imp.split).frame
        rows = []
        no_negs = 0
        for r, prompt, chosen, negs in zip(imp.rows, imp.prompts, imp.chosen, imp.negatives):
            if not negs:
                no_negs += 1
                continue
            hist, target = list(f["history_titles"].iat[r]), f["target_title"].iat[r]
            rows.append({
                "sample_id": str(f["sample_id"].iat[r]),
                "prompt": prompt if keep_text else user_message(hist, dataset.instruction),
                "chosen": chosen if keep_text else response_text(target),
                "rejected": [n[2] if keep_text else response_text(n[0]) for n in negs],
                "chosen_item_id": int(f["target_item_id"].iat[r]),
                "rejected_item_ids": [int(n[1]) for n in negs],
                "strategy": strategy,
            })
        imp.counts["records_without_negatives"] = no_negs
        no_negs_total += no_negs
        if not rows:
            raise DataError(f"no record kept: {imp.counts['matched']} matched, {no_negs} left without negatives",
                            path=imp.path)
        frames[imp.split] = pd.DataFrame(rows, columns=["sample_id", "prompt", "chosen", "rejected",
                                                        "chosen_item_id", "rejected_item_ids", "strategy"])
    summary = _summary(parts, "preferences", unknown, unmatched, {"keep_text": keep_text, "strategy": strategy},
                       rows={s: len(fr) for s, fr in frames.items()}, records_without_negatives=no_negs_total)
    return frames, summary


__all__ = ["IMPORTED_CANDIDATES_SCHEMA", "SplitMatcher", "format_counts", "import_candidates", "import_preferences",
           "match_file", "quoted_span", "read_records", "strip_title"]
