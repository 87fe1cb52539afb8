"""Bad input gives a clear error naming the file, the record and the field; nothing is half-written."""

import json
import logging

import pytest

from conftest import ORACLE, require_shared
from raydpo.cli import main
from raydpo.data import DataError, load_dataset
from raydpo.evaluation import Predictions, evaluate
from raydpo.io import atomic_path, write_json

ORACLE_FILE = ORACLE / "SPRec_Reproduction" / "raw_results_1000.json"


def _edit(path, fn):
    rows = json.loads(path.read_text())
    fn(rows)
    path.write_text(json.dumps(rows))


def test_malformed_json_names_file_and_position(goodreads_copy):
    p = goodreads_copy / "train.json"
    p.write_text(p.read_text()[:5000])
    with pytest.raises(DataError, match=r"train\.json: malformed JSON at line \d+, column \d+"):
        load_dataset(goodreads_copy)


def test_missing_field_names_record_and_field(goodreads_copy):
    _edit(goodreads_copy / "valid.json", lambda rows: rows[17].pop("output"))
    with pytest.raises(DataError, match=r"valid\.json: record 17, field 'output': missing field"):
        load_dataset(goodreads_copy)


def test_wrong_type_field(goodreads_copy):
    def f(rows):
        rows[3]["input"] = ["a", "b"]
    _edit(goodreads_copy / "train.json", f)
    with pytest.raises(DataError, match=r"train\.json: record 3, field 'input': expected a string"):
        load_dataset(goodreads_copy)


def test_empty_history(goodreads_copy):
    def f(rows):
        rows[5]["input"] = "The user has played the following books before: , please write a new books"
    _edit(goodreads_copy / "test.json", f)
    with pytest.raises(DataError, match=r"test\.json: record 5, field 'input': empty history"):
        load_dataset(goodreads_copy)


def test_duplicate_catalog_id(goodreads_copy):
    p = goodreads_copy / "id2name.json"
    text = p.read_text()
    p.write_text(text.rstrip().rstrip("}") + ', "12": "Another Title"}')
    with pytest.raises(DataError, match=r"id2name\.json: record 12: duplicate item id '12'"):
        load_dataset(goodreads_copy)


def test_duplicate_catalog_title(goodreads_copy):
    p = goodreads_copy / "id2name.json"
    d = json.loads(p.read_text())
    d["4058"] = d["0"]
    p.write_text(json.dumps(d))
    (goodreads_copy / "name2id.json").unlink()
    with pytest.raises(DataError, match=r"id2name\.json: record 4058: duplicate title"):
        load_dataset(goodreads_copy)


def test_missing_genres_are_a_counted_warning(goodreads_copy, caplog):
    p = goodreads_copy / "name2genre.json"
    d = json.loads(p.read_text())
    for t in list(d)[:7]:
        del d[t]
    p.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(goodreads_copy)
    assert ds.report["titles_without_genres"]["count"] == 7
    assert "7 of 4058 catalog titles have no genres" in caplog.text
    assert sum(1 for g in ds.catalog.genres if not g) == 14 + 7  # 14 titles already had none


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(DataError, match="not a dataset folder"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="dataset folder not found"):
        load_dataset(tmp_path / "nope")


@pytest.fixture
def oracle_rows():
    require_shared()
    return json.loads(ORACLE_FILE.read_text())


def test_predictions_missing_field(tmp_path, oracle_rows):
    del oracle_rows[42]["ground_truth"]
    p = tmp_path / "pred.json"
    p.write_text(json.dumps(oracle_rows))
    with pytest.raises(DataError, match=r"pred\.json: record 42, field 'ground_truth': missing field"):
        Predictions.read(p)


def test_predictions_prompt_mismatch(tmp_path, oracle_rows, goodreads):
    oracle_rows[7]["prompt"], oracle_rows[8]["prompt"] = oracle_rows[8]["prompt"], oracle_rows[7]["prompt"]
    p = tmp_path / "pred.json"
    p.write_text(json.dumps(oracle_rows))
    with pytest.raises(DataError, match=r"pred\.json: record 7, field 'prompt'"):
        evaluate(Predictions.read(p), goodreads)


def test_predictions_ground_truth_mismatch(tmp_path, oracle_rows, goodreads):
    oracle_rows[9]["ground_truth"] = "Some Other Book"
    p = tmp_path / "pred.json"
    p.write_text(json.dumps(oracle_rows))
    with pytest.raises(DataError, match=r"record 9, field 'ground_truth'"):
        evaluate(Predictions.read(p), goodreads)


def test_predictions_wrong_length(tmp_path, oracle_rows, goodreads):
    p = tmp_path / "pred.json"
    p.write_text(json.dumps(oracle_rows[:-1]))
    with pytest.raises(DataError, match="999 predictions but the test split"):
        evaluate(Predictions.read(p), goodreads)


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, oracle_rows, capsys):
    oracle_rows[3]["prompt"] = "nothing"
    p = tmp_path / "pred.json"
    p.write_text(json.dumps(oracle_rows))
    out = tmp_path / "metrics.json"
    from conftest import GOODREADS
    rc = main(["evaluate", str(p), "--data", str(GOODREADS), "--json", str(out), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pred.json: record 3, field 'prompt'" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [p]


def test_atomic_write_leaves_nothing_on_crash(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"partial": ')
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("garbage")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_directory_replace(tmp_path):
    d = tmp_path / "ds"
    with atomic_path(d, kind="dataset") as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with atomic_path(d, kind="dataset") as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in d.iterdir()) == [".raydpo-output.json", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
