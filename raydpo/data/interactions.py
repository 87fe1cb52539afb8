"""Reader for generic interaction logs (MovieLens, Amazon, Steam, ...).

Two tables, each CSV (``.csv``, ``.tsv``, optionally compressed: ``.csv.gz`` ...) or Parquet
(``.parquet``, ``.pq``), chosen by file extension:

``interactions``  ``user_id, item_id, timestamp`` (one row per interaction; other columns ignored)
``items``         ``item_id, title, genres``; genres are a list column (Parquet) or a string
                  separated by ``genre_sep`` (``"Action|Comedy"``)

Column names are parameters. Ids are compared as strings (``1`` in Parquet equals ``"1"`` in CSV;
integral floats such as ``1.0`` count as ``1``); ids, titles and genre labels are stripped of
surrounding whitespace. Timestamps must be numbers (Parquet timestamp/date columns are also
accepted); only their order matters.

Samples are *leave-last-out* sequences. Each user's interactions are sorted by timestamp (stable:
ties keep file order); with ``n`` interactions at positions ``0..n-1``:

* position ``n-1`` is the ``test`` target, position ``n-2`` the ``valid`` target;
* ``train_samples="all"``: every position ``1..n-3`` is a ``train`` target;
  ``train_samples="last"``: only position ``n-3`` (if it is >= 1);
* the history of a target at position ``p`` is the items at ``max(0, p-history_len)..p-1``,
  oldest first (never empty).

Users with fewer than ``min_interactions`` (>= 3) interactions are dropped and counted. A user
with exactly 3 interactions gives a valid and a test sample but no train sample.

Catalog ids are the rows of the items table (``0..n-1``, in file order); the original item id is
kept as ``source_id``. Sample ids are ``f"{user}-{split}-{position}"``; samples are ordered by
split (train, valid, test), then by user (first appearance in the interactions file), then by
position.

Errors name the file, the record and the field: records are 0-based data rows (the CSV header is
not a row), fields are the column names as configured.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from ..errors import DataError
from ..readers import one_line
from .schema import SAMPLES_SCHEMA, SPLITS, Catalog, Dataset, Samples

log = logging.getLogger(__name__)

TrainSamples = Literal["all", "last"]
UnknownItems = Literal["error", "drop"]

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
PARQUET_SUFFIXES = (".parquet", ".pq")
#: Genre strings that mean "no genres" (MovieLens writes ``(no genres listed)``).
NO_GENRE_LABELS = ("(no genres listed)",)
N_EXAMPLES = 5
#: The fewest interactions a user needs: a test target, a valid target and one history item.
MIN_INTERACTIONS = 3


# --------------------------------------------------------------------------------------------
# public API


def read_interactions(
    interactions_path: str | Path,
    items_path: str | Path,
    history_len: int = 10,
    min_interactions: int = 3,
    genre_sep: str = "|",
    train_samples: TrainSamples = "all",
    name: str | None = None,
    *,
    unknown_items: UnknownItems = "error",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
    items_item_col: str | None = None,
    title_col: str = "title",
    genres_col: str | None = "genres",
    no_genre_labels: Sequence[str] = NO_GENRE_LABELS,
) -> Dataset:
    """Read an interactions table and an items table into a leave-last-out :class:`Dataset`.

    ``unknown_items``: an interaction whose item is not in the items table is an error
    (``"error"``) or is dropped and counted (``"drop"``, before ``min_interactions`` applies).
    ``items_item_col`` is the item id column of the items table (default: ``item_col``);
    ``genres_col=None`` reads an items table without genres (every item gets no genres).
    ``Dataset.report`` counts users kept/dropped, interactions, samples per split, items without
    genres and dropped unknown items.
    """
    _check_params(history_len, min_interactions, train_samples, unknown_items)
    ipath, tpath = Path(interactions_path), Path(items_path)
    catalog, item_report = read_items(
        tpath,
        item_col=items_item_col or item_col,
        title_col=title_col,
        genres_col=genres_col,
        genre_sep=genre_sep,
        no_genre_labels=no_genre_labels,
    )

    cols = _read_table(ipath, [user_col, item_col, time_col])
    n_rows = len(cols[user_col])
    if n_rows == 0:
        raise DataError("the interactions table has no rows", path=ipath)
    users = _id_strings(cols[user_col], ipath, user_col)
    item_src = _id_strings(cols[item_col], ipath, item_col)
    ts = _timestamps(cols[time_col], ipath, time_col)
    file_rows = np.arange(n_rows)
    dup = pd.DataFrame({"u": users.to_numpy(), "i": item_src.to_numpy(), "t": ts}).duplicated(keep="first").to_numpy()
    dup_report = None
    if dup.any():
        n_dup, first = int(dup.sum()), int(np.flatnonzero(dup)[0])
        log.warning("%s: %d duplicate interaction row(s) dropped (same %s, %s and %s as an earlier row; first at "
                    "record %d); the first of each is kept", ipath, n_dup, user_col, item_col, time_col, first)
        dup_report = {"count": n_dup, "first_record": first}
        keep_rows = ~dup
        users = users[keep_rows].reset_index(drop=True)
        item_src = item_src[keep_rows].reset_index(drop=True)
        ts = ts[keep_rows]
        file_rows = file_rows[keep_rows]

    source_index = pd.Index(catalog.source_ids)
    item_ids = source_index.get_indexer(item_src).astype(np.int64)
    unknown = item_ids < 0
    report: dict = {}
    if dup_report is not None:
        report["duplicate_rows_dropped"] = dup_report
    if unknown.any():
        rows = np.flatnonzero(unknown)
        if unknown_items == "error":
            r = int(rows[0])
            raise DataError(
                f"item id {item_src.iloc[r]!r} is not in the items table {tpath} "
                f"({len(rows)} interaction(s) with unknown items; pass unknown_items='drop' to drop them)",
                path=ipath,
                record=int(file_rows[r]),
                field=item_col,
            )
        examples = list(dict.fromkeys(item_src.iloc[rows[:1000]].tolist()))[:N_EXAMPLES]
        log.warning(
            "%s: %d of %d interactions name an item that is not in %s (e.g. %s); dropped",
            ipath, len(rows), n_rows, tpath, examples,
        )
        report["unknown_items_dropped"] = {"count": int(len(rows)), "examples": examples}
        keep = ~unknown
        users, item_ids, ts = users[keep], item_ids[keep], ts[keep]

    samples, seq_report = leave_last_out_samples(
        users,
        item_ids,
        ts,
        catalog,
        history_len=history_len,
        min_interactions=min_interactions,
        train_samples=train_samples,
        path=ipath,
    )
    item_report["items"]["without_interactions"] = seq_report.pop("items_without_interactions")
    report = {
        "interactions": {"rows": int(n_rows), "used": seq_report.pop("interactions_used"),
                         "unknown_items_dropped": int(unknown.sum())},
        **seq_report,
        **item_report,
        **report,
    }
    log.info(
        "%s: %d users kept, %d dropped (< %d interactions); samples %s",
        ipath, report["users"]["kept"], report["users"]["dropped"], min_interactions, report["samples"],
    )
    return Dataset(
        catalog=catalog,
        samples=samples,
        name=name or ipath.name.split(".")[0],
        meta={
            "source": {
                "format": "interactions",
                "interactions": str(ipath),
                "items": str(tpath),
                "history_len": int(history_len),
                "min_interactions": int(min_interactions),
                "train_samples": train_samples,
                "unknown_items": unknown_items,
            }
        },
        report=report,
    )


def read_items(
    path: str | Path,
    *,
    item_col: str = "item_id",
    title_col: str = "title",
    genres_col: str | None = "genres",
    genre_sep: str = "|",
    no_genre_labels: Sequence[str] = NO_GENRE_LABELS,
) -> tuple[Catalog, dict]:
    """Read an items table into a :class:`Catalog` (ids = rows, in file order) and a report.

    Duplicate item ids, missing/empty titles and duplicate titles are errors naming the rows;
    items without genres get an empty genre list and are counted (``items_without_genres``).
    """
    path = Path(path)
    if not genre_sep:
        raise ValueError("genre_sep must be a non-empty string")
    wanted = [item_col, title_col] + ([genres_col] if genres_col else [])
    cols = _read_table(path, wanted)
    n = len(cols[item_col])
    if n == 0:
        raise DataError("the items table has no rows", path=path)
    ids = _id_strings(cols[item_col], path, item_col)
    _no_duplicates(ids, path, item_col, "item id")
    titles = _titles(cols[title_col], path, title_col)
    _no_duplicates(titles, path, title_col, "title")

    skip = {s.strip() for s in no_genre_labels}
    if genres_col:
        genres = [_parse_genres(v, genre_sep, skip, path, r, genres_col)
                  for r, v in enumerate(cols[genres_col].tolist())]
    else:
        genres = [()] * n
    title_list = titles.tolist()
    without = [i for i, g in enumerate(genres) if not g]
    report = {
        "items": {"count": int(n)},
        "items_without_genres": {"count": len(without),
                                 "examples": [title_list[i] for i in without[:N_EXAMPLES]]},
    }
    if without and genres_col:
        log.warning(
            "%s: %d of %d items have no genres (e.g. %s); they get an empty genre list",
            path, len(without), n, report["items_without_genres"]["examples"][:3],
        )
    catalog = Catalog(
        titles=tuple(title_list),
        genres=tuple(genres),
        source_ids=tuple(ids.tolist()),
        path=str(path),
    )
    return catalog, report


def leave_last_out_samples(
    user_ids: Sequence | np.ndarray,
    item_ids: Sequence[int] | np.ndarray,
    timestamps: Sequence | np.ndarray,
    catalog: Catalog,
    *,
    history_len: int = 10,
    min_interactions: int = 3,
    train_samples: TrainSamples = "all",
    path: str | Path | None = None,
) -> tuple[Samples, dict]:
    """Leave-last-out samples from parallel arrays of interactions (in file order).

    ``item_ids`` are catalog ids (``0..len(catalog)-1``); ``user_ids`` are any hashable values
    (written as strings). Returns the samples and a report: users kept/dropped, interactions used,
    samples per split, items that occur in no kept interaction.
    """
    _check_params(history_len, min_interactions, train_samples, "error")
    items = np.asarray(item_ids, dtype=np.int64)
    ts = np.asarray(timestamps)
    if not (len(items) == len(ts) == len(user_ids)):
        raise ValueError("user_ids, item_ids and timestamps must have the same length")
    if len(items) and (items.min() < 0 or items.max() >= len(catalog)):
        raise ValueError(f"item ids must be catalog ids 0..{len(catalog) - 1}")

    if not isinstance(user_ids, pd.Series):
        user_ids = np.asarray(user_ids, dtype=object)
    codes, uniques = pd.factorize(user_ids, sort=False)
    n_users = len(uniques)
    counts = np.bincount(codes, minlength=n_users)
    keep_user = counts >= min_interactions
    n_dropped = int((~keep_user).sum())
    if not keep_user.any():
        raise DataError(
            f"no user has at least {min_interactions} interactions ({n_users} users, {len(items)} interactions)",
            path=path,
        )

    order = np.lexsort((ts, codes))  # by user, then timestamp; stable, so ties keep file order
    order = order[keep_user[codes[order]]]
    u = codes[order]
    it = items[order]
    m = len(u)

    first = np.ones(m, dtype=bool)
    first[1:] = u[1:] != u[:-1]
    starts = np.flatnonzero(first)
    pos = np.arange(m, dtype=np.int64) - np.repeat(starts, np.diff(np.append(starts, m)))
    n = counts[u]

    if train_samples == "all":
        train = np.flatnonzero((pos >= 1) & (pos <= n - 3))
    else:
        train = np.flatnonzero((pos >= 1) & (pos == n - 3))
    valid = np.flatnonzero(pos == n - 2)
    test = np.flatnonzero(pos == n - 1)
    sel = np.concatenate([train, valid, test])
    split_codes = np.repeat(np.arange(3, dtype=np.int8), [len(train), len(valid), len(test)])

    hlen = np.minimum(pos[sel], history_len)
    offsets = np.zeros(len(sel) + 1, dtype=np.int64)
    np.cumsum(hlen, out=offsets[1:])
    total = int(offsets[-1])
    flat = np.repeat(sel - hlen - offsets[:-1], hlen) + np.arange(total, dtype=np.int64)
    hist_items = it[flat]

    titles = pa.array(catalog.titles, pa.string())
    offsets_pa = pa.array(offsets.astype(np.int32 if total < 2**31 else np.int64))
    hist_ids = pa.ListArray.from_arrays(offsets_pa, pa.array(hist_items, pa.int64()))
    hist_titles = pa.ListArray.from_arrays(offsets_pa, titles.take(pa.array(hist_items)))

    user_str = pa.array([str(x) for x in uniques], pa.string()).take(pa.array(u[sel]))
    split_str = pa.DictionaryArray.from_arrays(pa.array(split_codes), pa.array(list(SPLITS))).cast(pa.string())
    pos_str = pc.cast(pa.array(pos[sel]), pa.string())
    sample_ids = pc.binary_join_element_wise(user_str, split_str, pos_str, "-")
    target = it[sel]
    table = pa.table(
        {
            "sample_id": sample_ids,
            "user_id": user_str,
            "split": split_str,
            "history_item_ids": hist_ids,
            "history_titles": hist_titles,
            "target_item_id": pa.array(target, pa.int64()),
            "target_title": titles.take(pa.array(target)),
        },
        schema=SAMPLES_SCHEMA,
    )
    samples = Samples(table.to_pandas(), path=str(path) if path is not None else None)

    seen = np.zeros(len(catalog), dtype=bool)
    seen[it] = True
    report = {
        "users": {"kept": int(keep_user.sum()), "dropped": n_dropped, "min_interactions": int(min_interactions)},
        "interactions_used": int(m),
        "samples": {"train": len(train), "valid": len(valid), "test": len(test)},
        "history_len": int(history_len),
        "train_samples": train_samples,
        "items_without_interactions": int((~seen).sum()),
    }
    if n_dropped:
        log.info("%s: dropped %d of %d users with fewer than %d interactions",
                 path, n_dropped, n_users, min_interactions)
    return samples, report


# --------------------------------------------------------------------------------------------
# helpers


def _check_params(history_len: int, min_interactions: int, train_samples: str, unknown_items: str) -> None:
    if isinstance(history_len, bool) or not isinstance(history_len, (int, np.integer)) or history_len < 1:
        raise DataError(f"history_len must be an integer >= 1, got {history_len!r}", field="history_len")
    if isinstance(min_interactions, bool) or not isinstance(min_interactions, (int, np.integer)) \
            or min_interactions < MIN_INTERACTIONS:
        raise DataError(f"min_interactions must be an integer >= {MIN_INTERACTIONS} (a test target, a valid target "
                        f"and one history item), got {min_interactions!r}", field="min_interactions")
    if train_samples not in ("all", "last"):
        raise DataError(f"train_samples must be 'all' or 'last', got {train_samples!r}", field="train_samples")
    if unknown_items not in ("error", "drop"):
        raise DataError(f"unknown_items must be 'error' or 'drop', got {unknown_items!r}", field="unknown_items")


def _file_kind(path: Path) -> tuple[str, str | None]:
    """``("csv", delimiter)`` or ``("parquet", None)`` by extension."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in CSV_SUFFIXES:
        return "csv", CSV_SUFFIXES[last]
    if last in PARQUET_SUFFIXES and path.suffix.lower() == last:
        return "parquet", None
    raise DataError(
        f"unsupported file type {path.suffix!r}: expected .csv, .tsv (optionally compressed) or .parquet",
        path=path,
    )


def _read_table(path: Path, columns: list[str]) -> dict[str, pd.Series]:
    """The named columns of a CSV or Parquet file, as pandas Series (CSV cells as strings, empty cells as "")."""
    from ..readers import check_file

    kind, sep = _file_kind(path)
    check_file(path)
    if kind == "csv":
        table = _read_csv(path, sep, columns)
    else:
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"not a readable Parquet file: {one_line(e)}", path=path) from None
        _check_header(path, names, columns)
        try:
            table = pq.read_table(path, columns=list(dict.fromkeys(columns)))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"not a readable Parquet file: {one_line(e)}", path=path) from None
    out = {}
    for c in columns:
        col = table.column(c)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            col = col.cast(pa.int64() if pa.types.is_timestamp(col.type) or pa.types.is_date64(col.type)
                           else pa.int32())
        out[c] = col.to_pandas()
    return out


def _check_header(path: Path, names: list[str], columns: list[str]) -> None:
    for c in columns:
        if c not in names:
            raise DataError(f"missing column (the file has columns {names})", path=path, field=c)


def _read_csv(path: Path, sep: str, columns: list[str]) -> pa.Table:
    """The named columns of a CSV file as strings (empty cells as ""), read with pyarrow."""
    wanted = list(dict.fromkeys(columns))
    try:
        return pcsv.read_csv(
            path,
            parse_options=pcsv.ParseOptions(delimiter=sep, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in wanted},
                include_columns=wanted,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
    except KeyError:  # pa.ArrowKeyError: an included column is not in the header
        try:
            names = pcsv.open_csv(path, parse_options=pcsv.ParseOptions(delimiter=sep)).schema.names
        except (pa.ArrowException, OSError, EOFError) as e:
            raise DataError(f"not a readable CSV file: {one_line(e)}", path=path) from None
        _check_header(path, names, columns)
        raise DataError("missing column", path=path)  # not reached: some column is missing
    except (pa.ArrowException, OSError, EOFError, UnicodeDecodeError) as e:
        detail = str(e)
        if "parse error" in detail:
            # pyarrow does not say where; the pandas tokenizer names the line
            try:
                pd.read_csv(path, sep=sep, dtype=str, na_filter=False)
            except pd.errors.ParserError as pe:
                detail = f"{detail} ({str(pe).replace('Error tokenizing data. C error: ', '').strip()})"
            except Exception:  # noqa: BLE001 - only used to improve the message
                pass
        if "Empty CSV file" in detail:
            detail = "empty file (no header row)"
        raise DataError(f"not a readable CSV file: {one_line(detail)}", path=path) from None


def _fail_at(mask: np.ndarray, series: pd.Series, path: Path, field: str, what: str) -> None:
    """Raise for the first row where ``mask`` is true."""
    rows = np.flatnonzero(mask)
    if len(rows):
        r = int(rows[0])
        more = f" ({len(rows)} rows in all)" if len(rows) > 1 else ""
        raise DataError(f"{what}: {series.iloc[r]!r}{more}", path=path, record=r, field=field)


def _id_strings(s: pd.Series, path: Path, field: str) -> pd.Series:
    """Ids as stripped strings; missing or empty ids are errors."""
    s = s.reset_index(drop=True)
    _fail_at(s.isna().to_numpy(), s, path, field, "missing id")
    if pd.api.types.is_float_dtype(s):
        vals = s.to_numpy(dtype=np.float64)
        _fail_at(~np.isfinite(vals), s, path, field, "not a valid id")
        if np.all(vals == np.floor(vals)) and np.all(np.abs(vals) < 2**63):
            s = pd.Series(vals.astype(np.int64))
    elif s.dtype == object:
        s = s.map(lambda x: x if isinstance(x, str) else str(x))
    out = s.astype(str).str.strip()
    _fail_at((out == "").to_numpy(), s, path, field, "missing id")
    return out


def _timestamps(s: pd.Series, path: Path, field: str) -> np.ndarray:
    """Timestamps as numbers (int64 where every value is an integer); missing or non-numeric is an error."""
    s = s.reset_index(drop=True)
    _fail_at(s.isna().to_numpy(), s, path, field, "missing timestamp")
    if pd.api.types.is_bool_dtype(s):
        _fail_at(np.ones(len(s), dtype=bool), s, path, field, "timestamp is not a number")
    if pd.api.types.is_numeric_dtype(s):
        vals = s
    elif (fast := _cast_numbers(s)) is not None:
        vals = pd.Series(fast)
    else:
        text = s.astype(str).str.strip()
        _fail_at((text == "").to_numpy(), s, path, field, "missing timestamp")
        vals = pd.to_numeric(text, errors="coerce")
    arr = vals.to_numpy()
    if arr.dtype.kind == "f":
        _fail_at(~np.isfinite(arr), s, path, field, "timestamp is not a finite number")
    elif arr.dtype.kind not in "iu":
        arr = arr.astype(np.float64)
    return arr


def _cast_numbers(s: pd.Series) -> np.ndarray | None:
    """Fast path: strings that all parse as int64 (or else float64) with Arrow; None if any does not."""
    try:
        arr = pa.array(s, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError):
        return None
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        return None
    for t in (pa.int64(), pa.float64()):
        try:
            return pc.cast(arr, t).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return None


def _titles(s: pd.Series, path: Path, field: str) -> pd.Series:
    s = s.reset_index(drop=True)
    _fail_at(s.isna().to_numpy(), s, path, field, "missing title")
    if s.dtype == object:
        _fail_at(~s.map(lambda x: isinstance(x, str)).to_numpy(dtype=bool), s, path, field, "title is not a string")
    out = s.astype(str).str.strip()
    _fail_at((out == "").to_numpy(), s, path, field, "empty title")
    return out


def _no_duplicates(values: pd.Series, path: Path, field: str, what: str) -> None:
    dup = values.duplicated(keep="first").to_numpy()
    if dup.any():
        r = int(np.flatnonzero(dup)[0])
        v = values.iloc[r]
        first = int(np.flatnonzero((values == v).to_numpy())[0])
        raise DataError(
            f"duplicate {what} {v!r} in rows {first} and {r}" + (
                " (the catalog needs unique titles)" if what == "title" else ""),
            path=path,
            record=r,
            field=field,
        )


def _parse_genres(value, sep: str, skip: set[str], path: Path, row: int, field: str) -> tuple[str, ...]:
    """A genre cell -> labels in order, stripped, without empties, ``skip`` labels and repeats."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts = value.split(sep)
    elif isinstance(value, float) and np.isnan(value):
        return ()
    elif isinstance(value, (list, tuple, np.ndarray)):
        parts = []
        for g in value:
            if g is None:
                continue
            if not isinstance(g, str):
                raise DataError(f"genre labels must be strings, got {g!r}", path=path, record=row, field=field)
            parts.append(g)
    else:
        raise DataError(f"expected a list of genres or a {sep!r}-separated string, got {value!r}",
                        path=path, record=row, field=field)
    labels = dict.fromkeys(p.strip() for p in parts)
    return tuple(g for g in labels if g and g not in skip)
