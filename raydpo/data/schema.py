"""raydpo's one internal representation of a recommendation dataset.

A :class:`Dataset` is a folder with three files::

    catalog.parquet   item_id (int64, 0..n-1), title (str), genres (list<str>), source_id (str)
    samples.parquet   sample_id (str), user_id (str), split (train|valid|test),
                      history_item_ids (list<int64>), history_titles (list<str>),
                      target_item_id (int64), target_title (str)
    meta.json         name, source, instruction, fairness_genres, format version

Item ids are contiguous row numbers of the catalog. A history title or target that is not a
catalog title keeps its text and gets the id ``UNKNOWN_ITEM`` (-1): nothing is dropped
silently, and every reader reports how many such titles it met.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError
from ..io import atomic_path, write_json
from ..readers import check_file, json_kind, one_line, read_json

UNKNOWN_ITEM = -1
SPLITS = ("train", "valid", "test")
FORMAT_VERSION = 1

CATALOG_SCHEMA = pa.schema(
    [
        ("item_id", pa.int64()),
        ("title", pa.string()),
        ("genres", pa.list_(pa.string())),
        ("source_id", pa.string()),
    ]
)
SAMPLES_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("history_item_ids", pa.list_(pa.int64())),
        ("history_titles", pa.list_(pa.string())),
        ("target_item_id", pa.int64()),
        ("target_title", pa.string()),
    ]
)


@dataclass(frozen=True)
class Catalog:
    """Items with titles and genre labels; ``item_id`` is the position in ``titles``.

    ``fairness_genres`` are the genres (in order) the fairness metrics DGU/MGU use; by default
    every genre label in the catalog, in order of first appearance.
    """

    titles: tuple[str, ...]
    genres: tuple[tuple[str, ...], ...]
    source_ids: tuple[str, ...] | None = None
    fairness_genres: tuple[str, ...] | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if len(self.titles) != len(self.genres):
            raise DataError(
                f"{len(self.titles)} titles but {len(self.genres)} genre lists", path=self.path, field="genres"
            )
        if self.source_ids is not None and len(self.source_ids) != len(self.titles):
            raise DataError("source_ids must have one entry per title", path=self.path, field="source_id")
        if not self.titles:
            raise DataError("the catalog is empty", path=self.path, field="title")
        seen: dict[str, int] = {}
        for i, t in enumerate(self.titles):
            if not isinstance(t, str) or not t.strip():
                raise DataError("empty or non-string title", path=self.path, record=i, field="title")
            if t in seen:
                raise DataError(
                    f"duplicate title {t!r} (also item {seen[t]})", path=self.path, record=i, field="title"
                )
            seen[t] = i
        if self.fairness_genres is None:
            object.__setattr__(self, "fairness_genres", self.genre_vocab)

    def __len__(self) -> int:
        return len(self.titles)

    @cached_property
    def title_to_id(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.titles)}

    def id_of(self, title: str) -> int:
        """The item id of an exact title, or ``UNKNOWN_ITEM``."""
        return self.title_to_id.get(title, UNKNOWN_ITEM)

    @cached_property
    def genre_vocab(self) -> tuple[str, ...]:
        """Every genre label, in order of first appearance over the catalog."""
        vocab: dict[str, None] = {}
        for gs in self.genres:
            for g in gs:
                vocab.setdefault(g, None)
        return tuple(vocab)

    @cached_property
    def genre_matrix(self) -> np.ndarray:
        """``[n_items, max_labels]`` genre indices into ``genre_vocab`` in each item's own order, -1 padded."""
        index = {g: j for j, g in enumerate(self.genre_vocab)}
        width = max((len(g) for g in self.genres), default=0) or 1
        out = np.full((len(self), width), -1, dtype=np.int64)
        for i, gs in enumerate(self.genres):
            out[i, : len(gs)] = [index[g] for g in gs]
        return out

    def genre_frequency(self) -> dict[str, float]:
        """Share of catalog items that carry each genre."""
        counts: dict[str, int] = {g: 0 for g in self.genre_vocab}
        for gs in self.genres:
            for g in set(gs):
                counts[g] += 1
        return {g: c / len(self) for g, c in counts.items()}

    @cached_property
    def fairness_weights(self) -> np.ndarray:
        """``[n_items, n_fairness_genres]``: each item spreads a unit mass over its fairness genres.

        Items without any fairness genre have an all-zero row (they carry no genre mass), exactly as
        the reference evaluator treats them.
        """
        fg = {g: j for j, g in enumerate(self.fairness_genres or ())}
        w = np.zeros((len(self), len(fg)), dtype=np.float64)
        for i, gs in enumerate(self.genres):
            sel = [fg[g] for g in gs if g in fg]
            for j in sel:
                w[i, j] += 1.0 / len(sel)
        return w

    def to_arrow(self) -> pa.Table:
        src = self.source_ids if self.source_ids is not None else tuple(str(i) for i in range(len(self)))
        return pa.table(
            {
                "item_id": pa.array(np.arange(len(self), dtype=np.int64)),
                "title": pa.array(list(self.titles), pa.string()),
                "genres": pa.array([list(g) for g in self.genres], pa.list_(pa.string())),
                "source_id": pa.array(list(src), pa.string()),
            },
            schema=CATALOG_SCHEMA,
        )

    @classmethod
    def from_arrow(
        cls, table: pa.Table, *, path: str | None = None, fairness_genres: Sequence[str] | None = None
    ) -> "Catalog":
        table = _check_columns(table, CATALOG_SCHEMA, path)
        _no_nulls(table, ("item_id", "title"), path)
        ids = table.column("item_id").to_numpy()
        if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
            bad = int(np.flatnonzero(ids != np.arange(len(ids)))[0])
            raise DataError(
                f"item ids must be 0..n-1 in order; found {int(ids[bad])} at row {bad}",
                path=path,
                record=bad,
                field="item_id",
            )
        genres = tuple(tuple(g or ()) for g in table.column("genres").to_pylist())
        return cls(
            titles=tuple(table.column("title").to_pylist()),
            genres=genres,
            source_ids=tuple(table.column("source_id").to_pylist()),
            fairness_genres=tuple(fairness_genres) if fairness_genres is not None else None,
            path=path,
        )


@dataclass(frozen=True)
class Samples:
    """Sequential samples: a history of items and the next item (the target), per split."""

    frame: pd.DataFrame
    path: str | None = None

    COLUMNS = tuple(SAMPLES_SCHEMA.names)

    def __post_init__(self) -> None:
        missing = [c for c in self.COLUMNS if c not in self.frame.columns]
        if missing:
            raise DataError(f"missing columns {missing}", path=self.path, field=missing[0])

    def __len__(self) -> int:
        return len(self.frame)

    def split(self, name: str) -> "Samples":
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {list(SPLITS)}", field="split")
        return Samples(self.frame[self.frame["split"] == name].reset_index(drop=True), path=self.path)

    def history_matrix(self, max_len: int | None = None) -> np.ndarray:
        """``[n_samples, L]`` history item ids (oldest first), padded on the right with -1."""
        hist = self.frame["history_item_ids"].tolist()
        width = max_len or max((len(h) for h in hist), default=0) or 1
        out = np.full((len(hist), width), UNKNOWN_ITEM, dtype=np.int64)
        for i, h in enumerate(hist):
            h = list(h)[-width:]
            out[i, : len(h)] = h
        return out

    @property
    def target_ids(self) -> np.ndarray:
        return self.frame["target_item_id"].to_numpy(dtype=np.int64)

    def validate(self, catalog: Catalog) -> None:
        """Check ids against the catalog and that every history is non-empty."""
        n = len(catalog)
        for i, (sid, hid, ht, tid, split) in enumerate(
            zip(
                self.frame["sample_id"],
                self.frame["history_item_ids"],
                self.frame["history_titles"],
                self.frame["target_item_id"],
                self.frame["split"],
            )
        ):
            if split not in SPLITS:
                raise DataError(f"unknown split {split!r}", path=self.path, record=sid, field="split")
            if hid is None or ht is None:
                raise DataError("missing value", path=self.path, record=sid,
                                field="history_item_ids" if hid is None else "history_titles")
            if len(hid) == 0:
                raise DataError("empty history", path=self.path, record=sid, field="history_item_ids")
            if len(hid) != len(ht):
                raise DataError(
                    "history_item_ids and history_titles differ in length",
                    path=self.path,
                    record=sid,
                    field="history_titles",
                )
            for j in hid:
                if j < UNKNOWN_ITEM or j >= n:
                    raise DataError(f"item id {j} outside the catalog (0..{n - 1})", path=self.path, record=sid,
                                    field="history_item_ids")
            if tid < UNKNOWN_ITEM or tid >= n:
                raise DataError(f"item id {tid} outside the catalog", path=self.path, record=sid, field="target_item_id")

    def to_arrow(self) -> pa.Table:
        return pa.Table.from_pandas(self.frame[list(self.COLUMNS)], schema=SAMPLES_SCHEMA, preserve_index=False)

    @classmethod
    def from_records(cls, records: Iterable[dict], path: str | None = None) -> "Samples":
        frame = pd.DataFrame.from_records(list(records), columns=list(cls.COLUMNS))
        frame["target_item_id"] = frame["target_item_id"].astype("int64")
        return cls(frame, path=path)


@dataclass
class Dataset:
    """A catalog, its samples, and where they came from."""

    catalog: Catalog
    samples: Samples
    name: str = "dataset"
    instruction: str | None = None
    meta: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def split(self, name: str) -> Samples:
        return self.samples.split(name)

    def save(self, directory: str | Path) -> Path:
        """Write the dataset folder atomically (a temporary folder renamed into place)."""
        directory = Path(directory)
        with atomic_path(directory, kind="dataset") as tmp:
            tmp.mkdir(parents=True)
            pq.write_table(self.catalog.to_arrow(), tmp / "catalog.parquet")
            pq.write_table(self.samples.to_arrow(), tmp / "samples.parquet")
            write_json(
                tmp / "meta.json",
                {
                    "format_version": FORMAT_VERSION,
                    "name": self.name,
                    "instruction": self.instruction,
                    "fairness_genres": list(self.catalog.fairness_genres or ()),
                    "n_items": len(self.catalog),
                    "n_samples": {s: int((self.samples.frame["split"] == s).sum()) for s in SPLITS},
                    "report": self.report,
                    **self.meta,
                },
            )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Dataset":
        directory = Path(directory)
        meta_path = directory / "meta.json"
        meta = read_json(meta_path)
        if not isinstance(meta, dict):
            raise DataError(f"expected a JSON object, got a JSON {json_kind(meta)}", path=meta_path)
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(f"unsupported format version {version!r}", path=meta_path, field="format_version")
        for key, ok, want in (("name", lambda v: isinstance(v, str), "a string"),
                              ("instruction", lambda v: v is None or isinstance(v, str), "a string or null"),
                              ("fairness_genres", lambda v: v is None or (isinstance(v, list) and all(
                                  isinstance(g, str) for g in v)), "a list of strings or null"),
                              ("report", lambda v: isinstance(v, dict), "a JSON object")):
            if key in meta and not ok(meta[key]):
                raise DataError(f"expected {want}, got {meta[key]!r:.60}", path=meta_path, field=key)
        cat_path = directory / "catalog.parquet"
        catalog = Catalog.from_arrow(
            _read_parquet(cat_path), path=str(cat_path), fairness_genres=meta.get("fairness_genres") or None
        )
        s_path = directory / "samples.parquet"
        table = _check_columns(_read_parquet(s_path), SAMPLES_SCHEMA, str(s_path))
        _no_nulls(table, ("sample_id", "split", "target_item_id", "target_title"), str(s_path))
        samples = Samples(table.to_pandas(), path=str(s_path))
        samples.validate(catalog)
        known = {"format_version", "name", "instruction", "fairness_genres", "n_items", "n_samples", "report"}
        return cls(
            catalog=catalog,
            samples=samples,
            name=meta.get("name", directory.name),
            instruction=meta.get("instruction"),
            meta={k: v for k, v in meta.items() if k not in known},
            report=meta.get("report", {}),
        )


def _read_parquet(path: Path) -> pa.Table:
    check_file(path)
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a readable Parquet file: {one_line(e)}", path=path) from None


def _no_nulls(table: pa.Table, columns: Sequence[str], path: str | None) -> None:
    for c in columns:
        if table.column(c).null_count:
            bad = int(np.flatnonzero(table.column(c).is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError("missing value", path=path, record=bad, field=c)


def _check_columns(table: pa.Table, schema: pa.Schema, path: str | None) -> pa.Table:
    """``table`` with every column of ``schema`` present and cast to its type (a DataError names
    the file and the column otherwise)."""
    for f in schema:
        if f.name not in table.column_names:
            raise DataError("missing column", path=path, field=f.name)
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowException, ValueError, TypeError):
                raise DataError(f"column type {col.type}, expected {f.type}", path=path, field=f.name) from None
            table = table.set_column(table.schema.get_field_index(f.name), f.name, col)
    return table
