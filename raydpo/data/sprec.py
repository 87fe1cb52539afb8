"""Reader for the SPRec / ClusterExposure-DPO folder format.

A folder holds ``train.json``, ``valid.json``, ``test.json`` (JSON lists of
``{instruction, input, output}``) and the catalog files ``id2name.json``, ``name2genre.json``
and ``genre_dict.json`` (``name2id.json`` is optional and checked against ``id2name.json``).

Histories are parsed against the catalog, not with a quote regex, so titles with embedded
quotes (``A Child Called "It" (Dave Pelzer #1)``) survive. History titles and targets that are
not catalog titles are kept with id -1 and reported (counts plus examples), never dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import DataError
from ..readers import json_kind, read_json, read_json_pairs
from .schema import SPLITS, UNKNOWN_ITEM, Catalog, Dataset, Samples

log = logging.getLogger(__name__)

SEPARATOR = '", "'
REQUIRED_FIELDS = ("instruction", "input", "output")


def is_sprec_folder(directory: str | Path) -> bool:
    d = Path(directory)
    return (d / "id2name.json").exists() and any((d / f"{s}.json").exists() for s in SPLITS)


def read_sprec_catalog(directory: str | Path) -> tuple[Catalog, dict]:
    """Read ``id2name.json`` (+ ``name2genre.json``, ``genre_dict.json``, ``name2id.json``)."""
    d = Path(directory)
    id_path = d / "id2name.json"
    pairs = read_json_pairs(id_path)
    seen: dict[str, int] = {}
    entries: list[tuple[int, str, str]] = []
    for rec, (key, title) in enumerate(pairs):
        if key in seen:
            raise DataError(f"duplicate item id {key!r} (entries {seen[key]} and {rec})", path=id_path, record=key)
        seen[key] = rec
        try:
            num = int(key)
        except ValueError:
            raise DataError(f"item id {key!r} is not an integer", path=id_path, record=key) from None
        if not isinstance(title, str) or not title.strip():
            raise DataError("title must be a non-empty string", path=id_path, record=key, field="title")
        entries.append((num, key, title))
    entries.sort()
    titles = [t for _, _, t in entries]
    dup_title: dict[str, str] = {}
    for _, key, t in entries:
        if t in dup_title:
            raise DataError(f"duplicate title {t!r} (also id {dup_title[t]})", path=id_path, record=key)
        dup_title[t] = key

    report: dict = {}
    genre_path = d / "name2genre.json"
    name2genre = read_json(genre_path) if _present(genre_path) else {}
    if not isinstance(name2genre, dict):
        raise DataError(f"expected a JSON object title -> list of genres, got a JSON {json_kind(name2genre)}",
                        path=genre_path)
    genres = []
    missing = []
    for t in titles:
        g = name2genre.get(t)
        if g is None:
            missing.append(t)
            g = []
        if not isinstance(g, list) or not all(isinstance(x, str) for x in g):
            raise DataError("genres must be a list of strings", path=genre_path, record=t)
        genres.append(tuple(g))
    if missing:
        log.warning("%s: %d of %d catalog titles have no genres (e.g. %s); they get an empty genre list",
                    genre_path, len(missing), len(titles), missing[:3])
        report["titles_without_genres"] = {"count": len(missing), "examples": missing[:5]}

    fairness = None
    gd_path = d / "genre_dict.json"
    if _present(gd_path):
        gd = read_json(gd_path)
        if not isinstance(gd, dict):
            raise DataError(f"expected a JSON object of genres, got a JSON {json_kind(gd)}", path=gd_path)
        fairness = tuple(gd)

    n2i_path = d / "name2id.json"
    if _present(n2i_path):
        n2i = read_json(n2i_path)
        if not isinstance(n2i, dict):
            raise DataError(f"expected a JSON object title -> item id, got a JSON {json_kind(n2i)}", path=n2i_path)
        by_key = {t: key for _, key, t in entries}
        for t, i in n2i.items():
            if by_key.get(t) != str(i):
                raise DataError(f"name2id says {i!r} but id2name says {by_key.get(t)!r}", path=n2i_path, record=t)

    catalog = Catalog(
        titles=tuple(titles),
        genres=tuple(genres),
        source_ids=tuple(k for _, k, _ in entries),
        fairness_genres=fairness,
        path=str(id_path),
    )
    return catalog, report


def parse_history(text: str, catalog: Catalog) -> list[str]:
    """Split the quoted list inside an ``input`` string into titles, matching against the catalog.

    The list is the span from the first to the last double quote: ``"A", "B", "C"``. It is split
    on ``", "``; adjacent pieces are re-joined when the joined text is a catalog title (a title
    that itself contains ``", "``). Unknown titles are returned as they are.
    """
    start, end = text.find('"'), text.rfind('"')
    if start < 0 or end <= start:
        return []
    pieces = text[start + 1 : end].split(SEPARATOR)
    titles: list[str] = []
    i = 0
    while i < len(pieces):
        # prefer the longest join that is a catalog title
        best = 1
        if pieces[i] not in catalog.title_to_id:
            joined = pieces[i]
            for j in range(i + 1, min(len(pieces), i + 4)):
                joined = joined + SEPARATOR + pieces[j]
                if joined in catalog.title_to_id:
                    best = j - i + 1
                    break
        titles.append(SEPARATOR.join(pieces[i : i + best]))
        i += best
    return [t for t in titles if t != ""]


def parse_target(output: str) -> str:
    """``'"Title"\\n'`` -> ``Title`` (removes exactly one pair of surrounding quotes)."""
    s = output.strip()
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        return s[1:-1]
    return s.strip('"')


def read_sprec_split(path: Path, split: str, catalog: Catalog) -> tuple[list[dict], dict, str | None]:
    rows = read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"expected a JSON list of records, got a JSON {json_kind(rows)}", path=path)
    records = []
    unknown_hist: list[str] = []
    unknown_tgt: list[str] = []
    slots = 0
    instruction = None
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError("record is not a JSON object", path=path, record=i)
        for f in REQUIRED_FIELDS:
            if f not in row:
                raise DataError("missing field", path=path, record=i, field=f)
            if not isinstance(row[f], str):
                raise DataError(f"expected a string, got {type(row[f]).__name__}", path=path, record=i, field=f)
        instruction = instruction or row["instruction"]
        hist = parse_history(row["input"], catalog)
        if not hist:
            raise DataError("empty history (no quoted titles)", path=path, record=i, field="input")
        target = parse_target(row["output"])
        if not target:
            raise DataError("empty target", path=path, record=i, field="output")
        hid = [catalog.id_of(t) for t in hist]
        slots += len(hid)
        unknown_hist += [t for t, j in zip(hist, hid) if j == UNKNOWN_ITEM]
        tid = catalog.id_of(target)
        if tid == UNKNOWN_ITEM:
            unknown_tgt.append(target)
        records.append(
            {
                "sample_id": f"{split}-{i}",
                "user_id": f"{split}-{i}",
                "split": split,
                "history_item_ids": hid,
                "history_titles": hist,
                "target_item_id": tid,
                "target_title": target,
            }
        )
    report = {
        "rows": len(records),
        "history_slots": slots,
        "unknown_history_titles": {"count": len(unknown_hist), "examples": sorted(set(unknown_hist))[:5]},
        "unknown_targets": {"count": len(unknown_tgt), "examples": sorted(set(unknown_tgt))[:5]},
    }
    if unknown_hist or unknown_tgt:
        log.warning(
            "%s: %d/%d history titles and %d/%d targets are not catalog titles (e.g. %s); kept with id -1",
            path, len(unknown_hist), slots, len(unknown_tgt), len(records),
            (sorted(set(unknown_hist)) + sorted(set(unknown_tgt)))[:3],
        )
    return records, report, instruction


def read_sprec(directory: str | Path, name: str | None = None) -> Dataset:
    """Read a SPRec/ClusterExposure folder into a :class:`Dataset`."""
    d = Path(directory)
    if not (d / "id2name.json").exists():
        raise DataError("not a SPRec folder: id2name.json is missing", path=d)
    catalog, report = read_sprec_catalog(d)
    records: list[dict] = []
    instruction = None
    for split in SPLITS:
        path = d / f"{split}.json"
        if not _present(path):
            log.warning("%s: not found; split %r is empty", path, split)
            continue
        recs, rep, instr = read_sprec_split(path, split, catalog)
        records += recs
        report[split] = rep
        instruction = instruction or instr
    if not records:
        raise DataError("no train.json, valid.json or test.json with records", path=d)
    samples = Samples.from_records(records, path=str(d))
    return Dataset(catalog=catalog, samples=samples, name=name or d.name, instruction=instruction,
                   meta={"source": {"format": "sprec", "path": str(d)}}, report=report)


def _present(path: Path) -> bool:
    """An optional file is there (a folder or a broken entry of that name is there too, and its
    reader then names the problem)."""
    return path.exists() or path.is_symlink()
