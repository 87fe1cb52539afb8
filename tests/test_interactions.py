"""The interactions reader: leave-last-out samples from (user, item, timestamp) logs + an items table."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydpo.data.interactions import leave_last_out_samples, read_interactions, read_items
from raydpo.data.schema import Dataset
from raydpo.errors import DataError

ITEMS_CSV = """item_id,title,genres
10,Alpha,Action|Comedy
20,Beta,Drama
30,Gamma,
40,Delta,Drama| Action|
50,Epsilon,(no genres listed)
"""

# First appearance: b, a, d, c.  Timestamps scrambled relative to file order.
#   a: 10@1 20@2 30@3 40@4 50@5 10@6  -> ids [0 1 2 3 4 0]
#   b: 20@5 30@10 10@10 40@20         -> ids [1 2 0 3]   (30 and 10 tie: file order, 30 first)
#   c: 50@1 40@2 30@3                 -> ids [4 3 2]
#   d: two interactions               -> dropped
INTERACTIONS = [
    ("b", 30, 10),
    ("a", 40, 4),
    ("a", 10, 1),
    ("b", 10, 10),
    ("d", 10, 1),
    ("a", 50, 5),
    ("c", 30, 3),
    ("a", 20, 2),
    ("b", 40, 20),
    ("c", 50, 1),
    ("a", 10, 6),
    ("b", 20, 5),
    ("d", 20, 2),
    ("a", 30, 3),
    ("c", 40, 2),
]

# (sample_id, user, split, history ids, target id) with history_len=2, train_samples="all"
EXPECTED_ALL = [
    ("b-train-1", "b", "train", [1], 2),
    ("a-train-1", "a", "train", [0], 1),
    ("a-train-2", "a", "train", [0, 1], 2),
    ("a-train-3", "a", "train", [1, 2], 3),
    ("b-valid-2", "b", "valid", [1, 2], 0),
    ("a-valid-4", "a", "valid", [2, 3], 4),
    ("c-valid-1", "c", "valid", [4], 3),
    ("b-test-3", "b", "test", [2, 0], 3),
    ("a-test-5", "a", "test", [3, 4], 0),
    ("c-test-2", "c", "test", [4, 3], 2),
]
TITLES = ["Alpha", "Beta", "Gamma", "Delta", "Epsilon"]


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def interactions_csv(path: Path, rows=INTERACTIONS, header="user_id,item_id,timestamp") -> Path:
    lines = [header] + [",".join(str(x) for x in r) for r in rows]
    return write_csv(path, "\n".join(lines) + "\n")


@pytest.fixture
def files(tmp_path):
    return interactions_csv(tmp_path / "ratings.csv"), write_csv(tmp_path / "movies.csv", ITEMS_CSV)


@pytest.fixture
def parquet_files(tmp_path):
    inter = tmp_path / "ratings.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [r[0] for r in INTERACTIONS],
                "item_id": pa.array([r[1] for r in INTERACTIONS], pa.int64()),
                "timestamp": pa.array([r[2] for r in INTERACTIONS], pa.int64()),
            }
        ),
        inter,
    )
    items = tmp_path / "movies.parquet"
    pq.write_table(
        pa.table(
            {
                "item_id": pa.array([10, 20, 30, 40, 50], pa.int64()),
                "title": TITLES,
                "genres": pa.array(
                    [["Action", "Comedy"], ["Drama"], None, ["Drama", "Action", None], ["(no genres listed)"]],
                    pa.list_(pa.string()),
                ),
            }
        ),
        items,
    )
    return inter, items


def rows_of(ds: Dataset) -> list[tuple]:
    f = ds.samples.frame
    return [
        (sid, uid, split, [int(x) for x in hid], int(tid))
        for sid, uid, split, hid, tid in zip(
            f["sample_id"], f["user_id"], f["split"], f["history_item_ids"], f["target_item_id"]
        )
    ]


def comparable(ds: Dataset) -> tuple:
    f = ds.samples.frame
    return (
        ds.catalog.titles,
        ds.catalog.genres,
        ds.catalog.source_ids,
        rows_of(ds),
        [list(t) for t in f["history_titles"]],
        list(f["target_title"]),
    )


def raises_at(fn, file: str, record, field: str | None) -> DataError:
    with pytest.raises(DataError) as info:
        fn()
    e = info.value
    msg = str(e)
    assert file in msg
    assert e.path is not None and Path(e.path).name == file
    if record is not None:
        assert e.record == record
        assert f"record {record}" in msg
    if field is not None:
        assert e.field == field
        assert f"field '{field}'" in msg
    return e


# ---------------------------------------------------------------------------------------------
# samples


def test_hand_computed_samples(files):
    inter, items = files
    ds = read_interactions(inter, items, history_len=2)
    assert rows_of(ds) == EXPECTED_ALL
    f = ds.samples.frame
    # titles follow ids, histories oldest first
    for hid, ht, tid, tt in zip(f["history_item_ids"], f["history_titles"], f["target_item_id"], f["target_title"]):
        assert list(ht) == [TITLES[i] for i in hid]
        assert tt == TITLES[tid]
    ds.samples.validate(ds.catalog)
    assert ds.catalog.source_ids == ("10", "20", "30", "40", "50")
    assert ds.catalog.titles == tuple(TITLES)
    assert ds.name == "ratings"
    rep = ds.report
    assert rep["users"] == {"kept": 3, "dropped": 1, "min_interactions": 3}
    assert rep["interactions"] == {"rows": 15, "used": 13, "unknown_items_dropped": 0}
    assert rep["samples"] == {"train": 4, "valid": 3, "test": 3}
    assert rep["items"] == {"count": 5, "without_interactions": 0}
    assert rep["items_without_genres"] == {"count": 2, "examples": ["Gamma", "Epsilon"]}


def test_history_len_truncates_to_most_recent(files):
    inter, items = files
    long = {r[0]: r[3] for r in rows_of(read_interactions(inter, items, history_len=10))}
    assert long["a-test-5"] == [0, 1, 2, 3, 4]
    assert long["a-valid-4"] == [0, 1, 2, 3]
    one = {r[0]: r[3] for r in rows_of(read_interactions(inter, items, history_len=1))}
    assert one["a-test-5"] == [4]
    assert one["b-test-3"] == [0]
    assert all(len(h) == 1 for h in one.values())


def test_timestamp_ties_keep_file_order(tmp_path, files):
    _, items = files
    # swap the two tied rows of user b (30@10 and 10@10): the order of the tie follows the file
    rows = list(INTERACTIONS)
    rows[0], rows[3] = rows[3], rows[0]
    inter = interactions_csv(tmp_path / "swapped.csv", rows)
    got = {r[0]: (r[3], r[4]) for r in rows_of(read_interactions(inter, items, history_len=2))}
    assert got["b-train-1"] == ([1], 0)
    assert got["b-valid-2"] == ([1, 0], 2)
    assert got["b-test-3"] == ([0, 2], 3)


def test_train_samples_last(files):
    inter, items = files
    got = rows_of(read_interactions(inter, items, history_len=2, train_samples="last"))
    train = [r for r in got if r[2] == "train"]
    # a: n=6 -> position 3 only; b: n=4 -> position 1; c: n=3 -> no train sample (position 0 has no history)
    assert train == [("b-train-1", "b", "train", [1], 2), ("a-train-3", "a", "train", [1, 2], 3)]
    assert [r for r in got if r[2] != "train"] == [r for r in EXPECTED_ALL if r[2] != "train"]


def test_min_interactions(files):
    inter, items = files
    ds = read_interactions(inter, items, history_len=2, min_interactions=5)
    assert {r[1] for r in rows_of(ds)} == {"a"}
    assert ds.report["users"] == {"kept": 1, "dropped": 3, "min_interactions": 5}
    with pytest.raises(ValueError, match="min_interactions"):
        read_interactions(inter, items, min_interactions=2)
    with pytest.raises(ValueError, match="train_samples"):
        read_interactions(inter, items, train_samples="first")
    raises_at(lambda: read_interactions(inter, items, min_interactions=7), "ratings.csv", None, None)


def test_csv_and_parquet_give_identical_datasets(files, parquet_files):
    a = read_interactions(*files, history_len=2)
    b = read_interactions(*parquet_files, history_len=2)
    assert comparable(a) == comparable(b)
    assert a.report == b.report
    # mixed: Parquet interactions with integer ids against CSV items with string ids
    c = read_interactions(parquet_files[0], files[1], history_len=2)
    assert comparable(c) == comparable(a)


def test_custom_column_names_and_tsv(tmp_path):
    inter = write_csv(tmp_path / "log.tsv", "uid\tmovieId\tts\textra\n" + "".join(
        f"u\t{i}\t{t}\tx\n" for i, t in [(1, 3), (2, 1), (3, 2)]))
    items = write_csv(tmp_path / "items.csv", "movieId,name\n1,One\n2,Two\n3,Three\n")
    ds = read_interactions(inter, items, user_col="uid", item_col="movieId", time_col="ts",
                           title_col="name", genres_col=None)
    assert rows_of(ds) == [("u-valid-1", "u", "valid", [1], 2), ("u-test-2", "u", "test", [1, 2], 0)]
    assert ds.catalog.genres == ((), (), ())


def test_leave_last_out_samples_from_arrays(files):
    catalog, _ = read_items(files[1])
    samples, report = leave_last_out_samples(
        [7, 7, 7, 7], [3, 2, 1, 0], [4.0, 3.0, 2.0, 1.0], catalog, history_len=5
    )
    got = [(s, list(h), t) for s, h, t in zip(samples.frame["sample_id"], samples.frame["history_item_ids"],
                                               samples.frame["target_item_id"])]
    assert got == [("7-train-1", [0], 1), ("7-valid-2", [0, 1], 2), ("7-test-3", [0, 1, 2], 3)]
    assert report["items_without_interactions"] == 1


# ---------------------------------------------------------------------------------------------
# genres


def test_genres_from_csv_strings(files):
    catalog, report = read_items(files[1])
    assert catalog.genres == (("Action", "Comedy"), ("Drama",), (), ("Drama", "Action"), ())
    assert catalog.fairness_genres == ("Action", "Comedy", "Drama")
    assert report["items_without_genres"]["count"] == 2


def test_genres_custom_separator(tmp_path):
    items = write_csv(tmp_path / "items.csv", "item_id,title,genres\n1,A,Sci-Fi;Drama;Sci-Fi\n2,B,Drama|Noir\n")
    catalog, _ = read_items(items, genre_sep=";")
    assert catalog.genres == (("Sci-Fi", "Drama"), ("Drama|Noir",))


def test_genres_from_parquet_lists_and_strings(tmp_path, parquet_files):
    catalog, report = read_items(parquet_files[1])
    assert catalog.genres == (("Action", "Comedy"), ("Drama",), (), ("Drama", "Action"), ())
    assert report["items_without_genres"] == {"count": 2, "examples": ["Gamma", "Epsilon"]}
    p = tmp_path / "string_genres.parquet"
    pq.write_table(pa.table({"item_id": ["x", "y"], "title": ["X", "Y"], "genres": ["War|Drama", None]}), p)
    catalog, _ = read_items(p)
    assert catalog.genres == (("War", "Drama"), ())


def test_items_without_genres_warn_with_count(files, caplog):
    with caplog.at_level(logging.WARNING, logger="raydpo.data.interactions"):
        ds = read_interactions(*files)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "movies.csv" in warnings[0] and "2 of 5 items have no genres" in warnings[0]
    assert "Gamma" in warnings[0]
    assert ds.report["items_without_genres"]["count"] == 2


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_files(tmp_path, files):
    inter, items = files
    raises_at(lambda: read_interactions(tmp_path / "nope.csv", items), "nope.csv", None, None)
    raises_at(lambda: read_interactions(inter, tmp_path / "nope.parquet"), "nope.parquet", None, None)
    e = raises_at(lambda: read_interactions(inter, tmp_path / "items.json"), "items.json", None, None)
    assert "unsupported file type" in str(e)


def test_missing_columns(tmp_path, files):
    inter, items = files
    bad = interactions_csv(tmp_path / "bad.csv", header="user,item_id,timestamp")
    e = raises_at(lambda: read_interactions(bad, items), "bad.csv", None, "user_id")
    assert "missing column" in str(e)
    bad_items = write_csv(tmp_path / "items.csv", "item_id,name,genres\n10,Alpha,\n")
    raises_at(lambda: read_interactions(inter, bad_items), "items.csv", None, "title")
    p = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [1], "title": ["A"]}), p)
    raises_at(lambda: read_items(p), "items.parquet", None, "genres")


def test_unknown_item_is_an_error(tmp_path, files):
    _, items = files
    rows = list(INTERACTIONS)
    rows[6] = ("c", 99, 3)
    inter = interactions_csv(tmp_path / "ratings.csv", rows)
    e = raises_at(lambda: read_interactions(inter, items), "ratings.csv", 6, "item_id")
    assert "'99'" in str(e) and "movies.csv" in str(e)


def test_unknown_item_dropped_and_counted(tmp_path, files, caplog):
    _, items = files
    rows = list(INTERACTIONS)
    rows[6] = ("c", 99, 3)  # c keeps 2 interactions -> dropped
    inter = interactions_csv(tmp_path / "ratings.csv", rows)
    with caplog.at_level(logging.WARNING, logger="raydpo.data.interactions"):
        ds = read_interactions(inter, items, history_len=2, unknown_items="drop")
    assert ds.report["unknown_items_dropped"] == {"count": 1, "examples": ["99"]}
    assert ds.report["interactions"] == {"rows": 15, "used": 10, "unknown_items_dropped": 1}
    assert ds.report["users"]["dropped"] == 2
    assert {r[1] for r in rows_of(ds)} == {"a", "b"}
    assert any("1 of 15 interactions" in r.getMessage() for r in caplog.records)


def test_duplicate_item_id_names_both_rows(tmp_path):
    items = write_csv(tmp_path / "items.csv", "item_id,title,genres\n1,A,\n2,B,\n3,C,\n2,D,\n")
    e = raises_at(lambda: read_items(items), "items.csv", 3, "item_id")
    assert "rows 1 and 3" in str(e)


def test_duplicate_title_names_both_rows(tmp_path, files):
    items = write_csv(tmp_path / "items.csv", "item_id,title,genres\n1,A,\n2,B,\n3,A,\n")
    e = raises_at(lambda: read_interactions(files[0], items), "items.csv", 2, "title")
    assert "rows 0 and 2" in str(e) and "'A'" in str(e)


def test_empty_or_missing_title(tmp_path):
    items = write_csv(tmp_path / "items.csv", 'item_id,title,genres\n1,A,\n2,"  ",Drama\n')
    raises_at(lambda: read_items(items), "items.csv", 1, "title")
    items = write_csv(tmp_path / "short.csv", "item_id,title,genres\n1,A,\n2,B,\n3,,\n")
    raises_at(lambda: read_items(items), "short.csv", 2, "title")
    p = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": [1, 2], "title": [None, "B"], "genres": [["x"], ["y"]]}), p)
    e = raises_at(lambda: read_items(p), "items.parquet", 0, "title")
    assert "missing title" in str(e)


@pytest.mark.parametrize("value, what", [("yesterday", "not a finite number"), ("", "missing timestamp"),
                                         ("nan", "not a finite number")])
def test_bad_timestamp(tmp_path, files, value, what):
    rows = list(INTERACTIONS)
    rows[4] = ("d", 10, value)
    inter = interactions_csv(tmp_path / "ratings.csv", rows)
    e = raises_at(lambda: read_interactions(inter, files[1]), "ratings.csv", 4, "timestamp")
    assert what in str(e)


def test_missing_timestamp_in_parquet(tmp_path, files):
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["u", "u", "u"], "item_id": [10, 20, 30], "timestamp": [1.0, None, 3.0]}), p)
    raises_at(lambda: read_interactions(p, files[1]), "log.parquet", 1, "timestamp")


def test_missing_ids(tmp_path, files):
    rows = list(INTERACTIONS)
    rows[2] = ("", 10, 1)
    inter = interactions_csv(tmp_path / "ratings.csv", rows)
    raises_at(lambda: read_interactions(inter, files[1]), "ratings.csv", 2, "user_id")
    rows = list(INTERACTIONS)
    rows[5] = ("a", " ", 5)
    inter = interactions_csv(tmp_path / "ratings2.csv", rows)
    raises_at(lambda: read_interactions(inter, files[1]), "ratings2.csv", 5, "item_id")


def test_malformed_files(tmp_path, files):
    inter, items = files
    bad = write_csv(tmp_path / "bad.csv", "user_id,item_id,timestamp\nu,10,1\nu,20,2,9\n")
    e = raises_at(lambda: read_interactions(bad, items), "bad.csv", None, None)
    assert "line 3" in str(e)
    empty = write_csv(tmp_path / "empty.csv", "")
    raises_at(lambda: read_interactions(empty, items), "empty.csv", None, None)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet at all")
    e = raises_at(lambda: read_interactions(junk, items), "junk.parquet", None, None)
    assert "Parquet" in str(e)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("item_id,title,genres\n1,Am\xe9lie,Drama\n".encode("latin-1"))
    raises_at(lambda: read_items(latin), "latin.csv", None, None)


# ---------------------------------------------------------------------------------------------
# roundtrip


def test_save_load_roundtrip(tmp_path, files):
    ds = read_interactions(*files, history_len=2, name="tiny")
    out = ds.save(tmp_path / "ds")
    back = Dataset.load(out)
    assert comparable(back) == comparable(ds)
    assert back.name == "tiny"
    assert back.report == ds.report
    assert back.meta["source"]["format"] == "interactions"
    assert back.meta["source"]["history_len"] == 2
    assert back.catalog.fairness_genres == ds.catalog.fairness_genres
    np.testing.assert_array_equal(back.samples.history_matrix(2), ds.samples.history_matrix(2))
    pd.testing.assert_frame_equal(back.samples.frame.drop(columns=["history_item_ids", "history_titles"]),
                                  ds.samples.frame.drop(columns=["history_item_ids", "history_titles"]))
