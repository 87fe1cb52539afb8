"""Importing the research code's candidate and preference files (`raydpo data import-candidates`,
`raydpo data import-preferences`): round trips, unknown titles, bad input, output safety, and the
imported tables through `raydpo sample` and `raydpo train dpo`."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import GOODREADS, require_shared
from raydpo.cli import main
from raydpo.data.research import import_candidates, import_preferences, strip_title
from raydpo.outputs import marker_kind

# the research code's text (method.md 1.1, 1.3, 1.4), written here independently of raydpo
HEAD = "The user has played the following books before: "
TAIL = ", please write a new books that the user may bought"


def research_input(history) -> str:
    return HEAD + ", ".join('"' + t + '"' for t in history) + TAIL


def beam_prompt(instruction: str, inp: str) -> str:
    return f"### Instruction:\n{instruction}\n### Input:\n{inp}\n### Response:"


def export_candidates(ds, table: pd.DataFrame, shape: str = "annotated") -> dict[str, list]:
    """A raydpo candidates table in the research code's candidate format, one list per split
    (``annotated``: {instruction, input, chosen, rejected}; ``beam``: {prompt, chosen, rejected})."""
    frame = ds.samples.frame.set_index(ds.samples.frame["sample_id"].astype(str))
    out: dict[str, list] = {}
    for sid, titles in zip(table["sample_id"], table["candidate_titles"]):
        row = frame.loc[sid]
        inp = research_input(list(row["history_titles"]))
        chosen = '"' + row["target_title"] + '"'
        rejected = ['"' + t + '"' for t in titles]
        rec = ({"instruction": ds.instruction, "input": inp, "chosen": chosen, "rejected": rejected}
               if shape == "annotated" else
               {"prompt": beam_prompt(ds.instruction, inp), "chosen": chosen, "rejected": rejected})
        out.setdefault(row["split"], []).append(rec)
    return out


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False))
    return path


def digest(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raydpo: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def generated(synthetic_small, tiny_model):
    """Real candidates of the tiny model (constrained beam search) for 12 train and 6 valid rows."""
    from raydpo.generation.candidates import CandidateGenerator, DecodeConfig

    ds, path = synthetic_small
    model, tok = tiny_model
    frame = pd.concat([ds.split("train").frame.iloc[:12], ds.split("valid").frame.iloc[:6]], ignore_index=True)
    gen = CandidateGenerator(model, tok, ds.catalog, DecodeConfig(mode="beam", num_return_sequences=5,
                                                                  batch_size=8), instruction=ds.instruction)
    table = gen.candidates(frame)
    assert table["candidate_item_ids"].apply(len).min() >= 1
    return ds, path, table


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["annotated", "beam"])
def test_generated_candidates_round_trip_through_the_research_format(generated, tmp_path, shape, capsys):
    ds, data, table = generated
    files = {s: write_json(tmp_path / f"{s}.json", recs) for s, recs in export_candidates(ds, table, shape).items()}
    assert set(files) == {"train", "valid"}
    out = tmp_path / "imported"
    assert main(["data", "import-candidates", "--data", str(data), "--train", str(files["train"]),
                 "--valid", str(files["valid"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "18 records, 18 matched, 0 unmatched" in printed
    got = pq.read_table(out / "candidates.parquet").to_pandas()
    assert got["sample_id"].tolist() == table["sample_id"].astype(str).tolist()
    assert [list(x) for x in got["candidate_item_ids"]] == [list(x) for x in table["candidate_item_ids"]]
    assert [list(x) for x in got["candidate_titles"]] == [list(x) for x in table["candidate_titles"]]
    assert got["source_record"].tolist() == list(range(12)) + list(range(6))
    assert (out / "_SUCCESS").exists() and marker_kind(out) == "imported-candidates"
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["matched"] == 18 and success["candidates"] == int(table["candidate_item_ids"].apply(len).sum())
    assert success["options"] == {"unknown": "drop", "unmatched": "error"} and success["unmatched"] == 0


def test_goodreads_research_inputs_match_their_rows(goodreads, tmp_path):
    """The real research inputs (an embedded quote, history titles and a target outside the
    catalog) each find their own row, so the sample ids are the "<split>-<row>" of the data."""
    require_shared()
    titles = goodreads.catalog.titles
    files = {}
    for split in ("train", "valid"):
        rows = json.loads((GOODREADS / f"{split}.json").read_text())
        recs = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"],
                 "rejected": ['"' + titles[(7 * i + j) % len(titles)] + '"\n' for j in range(4)]}
                for i, r in enumerate(rows)]
        files[split] = write_json(tmp_path / f"{split}.json", recs)
    table, summary = import_candidates(goodreads, files)
    sids = table.column("sample_id").to_pylist()
    assert sids == [f"train-{i}" for i in range(1024)] + [f"valid-{i}" for i in range(256)]
    assert summary["matched"] == 1280 and summary["unmatched"] == 0 and summary["unknown_titles"] == 0
    assert summary["unknown_targets"] == 1  # "Moxie" in valid
    ids = table.column("candidate_item_ids").to_pylist()
    assert ids[5] == [(35 + j) % len(titles) for j in range(4)]
    assert table.column("candidate_titles").to_pylist()[5][0] == titles[35]


def test_preferences_round_trip_both_text_modes(synthetic_small, tmp_path):
    """raydpo preferences -> the research self-play format (prompt = instruction + input, rejected
    ending in a newline) -> import: raydpo's texts by default, the file's texts with keep_text."""
    from raydpo.training.data import random_preferences

    ds, data = synthetic_small
    prefs = random_preferences(ds, "train", n_negatives=3, variable=True, seed=4, limit=30)
    recs = []
    for _, r in prefs.iterrows():
        row = ds.samples.frame[ds.samples.frame["sample_id"] == r["sample_id"]].iloc[0]
        recs.append({"prompt": ds.instruction + research_input(list(row["history_titles"])),
                     "chosen": r["chosen"], "rejected": [x + "\n" for x in r["rejected"]]})
    recs[0]["rejected"] = recs[0]["rejected"][0]  # a single negative as a string (TRL pair format)
    f = write_json(tmp_path / "train.json", recs)
    frames, summary = import_preferences(ds, {"train": f})
    got = frames["train"]
    assert summary["matched"] == 30 and got["sample_id"].tolist() == prefs["sample_id"].tolist()
    want = prefs.copy()
    want.loc[0, "rejected"] = [want.loc[0, "rejected"][0]]
    want.at[0, "rejected_item_ids"] = [want.loc[0, "rejected_item_ids"][0]]
    for col in ("prompt", "chosen", "chosen_item_id"):
        assert got[col].tolist() == want[col].tolist(), col
    assert [list(x) for x in got["rejected"]] == [list(x) for x in want["rejected"]]
    assert [list(x) for x in got["rejected_item_ids"]] == [list(x) for x in want["rejected_item_ids"]]
    assert set(got["strategy"]) == {"imported"}
    kept, _ = import_preferences(ds, {"train": f}, keep_text=True)
    assert kept["train"]["prompt"].tolist() == [r["prompt"] for r in recs]
    assert kept["train"]["rejected"].iloc[1] == recs[1]["rejected"]  # the newline kept verbatim


def test_a_history_inside_other_quoted_text_still_matches(generated, tmp_path):
    """A prompt with more quoted text around the history (an instruction quoting a word, the
    response already started) is matched by containment."""
    ds, _, table = generated
    recs = export_candidates(ds, table, "beam")["train"]
    for r in recs:
        r["prompt"] = 'Answer with a "title".\n' + r["prompt"] + ' "'
    got, summary = import_candidates(ds, {"train": write_json(tmp_path / "train.json", recs)})
    assert summary["matched"] == 12
    assert got.column("sample_id").to_pylist() == table["sample_id"].astype(str).tolist()[:12]


def test_strip_title_is_the_evaluators_rule():
    from raydpo.evaluation.evaluate import strip_title as evaluator_strip

    for text in ['"A"\n', ' "A  B" ', '"A Child Called "It" (Dave Pelzer #1)"', '""', "A"]:
        assert strip_title(text) == evaluator_strip(text)


# --- unknown titles ------------------------------------------------------------------------------


@pytest.mark.parametrize("unknown", ["keep", "drop"])
def test_unknown_titles_are_kept_or_dropped_and_counted(generated, tmp_path, unknown, capsys):
    ds, data, table = generated
    recs = export_candidates(ds, table)["train"]
    recs[0]["rejected"] = ['"Not In The Catalog"', *recs[0]["rejected"], '""']
    recs[3]["rejected"] = recs[3]["rejected"] + ['  "Another Stranger"\n', '"Not In The Catalog"']
    f = write_json(tmp_path / "train.json", recs)
    out = tmp_path / "out"
    assert main(["data", "import-candidates", "--data", str(data), "--train", str(f), "--out", str(out),
                 "--unknown", unknown]) == 0
    printed = capsys.readouterr().out
    kept, dropped = (3, 0) if unknown == "keep" else (0, 3)
    assert f"3 unknown ({kept} kept, {dropped} dropped)" in printed and "1 empty dropped" in printed
    got = pq.read_table(out / "candidates.parquet").to_pandas()
    first = list(table["candidate_item_ids"].iloc[0])
    if unknown == "keep":
        assert list(got["candidate_item_ids"].iloc[0]) == [-1, *first]
        assert got["candidate_titles"].iloc[0][0] == "Not In The Catalog"
        assert list(got["candidate_titles"].iloc[3][-2:]) == ["Another Stranger", "Not In The Catalog"]
        assert "raydpo sample --on-unknown-item drop" in printed
    else:
        assert list(got["candidate_item_ids"].iloc[0]) == first
    summary = json.loads((out / "_SUCCESS").read_text())
    assert (summary["unknown_titles"], summary["unknown_titles_kept"], summary["unknown_titles_dropped"],
            summary["empty_titles_dropped"]) == (3, kept, dropped, 1)


# --- bad input -----------------------------------------------------------------------------------


def _bad_cases():
    def edit(fn):
        def build(recs):
            fn(recs)
            return recs
        return build

    def swap_history(recs):
        recs[4]["input"] = recs[5]["input"]

    return [
        ("not-a-list", lambda recs: {"records": recs}, "train.json: expected a JSON list of records, got a JSON object"),
        ("record-not-object", edit(lambda r: r.__setitem__(2, "x")), "train.json: record 2: record is a JSON string"),
        ("missing-input", edit(lambda r: r[3].pop("input")), "train.json: record 3, field 'input': missing field"),
        ("missing-target", edit(lambda r: r[1].pop("chosen")), "train.json: record 1, field 'chosen': missing field"),
        ("missing-rejected", edit(lambda r: r[6].pop("rejected")),
         "train.json: record 6, field 'rejected': missing field"),
        ("rejected-not-a-list", edit(lambda r: r[7].__setitem__("rejected", '"A"')),
         "train.json: record 7, field 'rejected': expected a list of candidate strings, got a JSON string"),
        ("rejected-element", edit(lambda r: r[8]["rejected"].append(3)),
         "train.json: record 8, field 'rejected': element"),
        ("input-not-string", edit(lambda r: r[0].__setitem__("input", ["a"])),
         "train.json: record 0, field 'input': expected a string, got a JSON list"),
        ("history-not-matching", edit(swap_history), "train.json: record 4, field 'input': no train row with the target"),
        ("target-not-matching", edit(lambda r: r[9].__setitem__("chosen", '"No Such Book"')),
         "train.json: record 9, field 'chosen': no train row of the dataset has the target 'No Such Book'"),
        ("duplicate-record", edit(lambda r: r.__setitem__(10, dict(r[0]))),
         "train.json: record 10, field 'input': matches train rows already taken"),
        ("empty-list", lambda recs: [], "train.json: no records"),
    ]


@pytest.mark.parametrize("name,build,expect", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_candidate_files_are_one_line_naming_file_record_field(generated, tmp_path, capsys, name, build, expect):
    ds, data, table = generated
    recs = export_candidates(ds, table)["train"]
    f = write_json(tmp_path / "train.json", build(recs))
    before = digest(tmp_path)
    assert main(["data", "import-candidates", "--data", str(data), "--train", str(f),
                 "--out", str(tmp_path / "out")]) == 2
    assert expect in one_error_line(capsys)
    assert digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_not_utf8_and_malformed_files(generated, tmp_path, capsys):
    _, data, _ = generated
    for content, expect in ((b'[{"input": "caf\xe9"}]', "train.json: not UTF-8 text: invalid byte 0xe9 at line 1"),
                            (b'[{"input": ', "train.json: malformed JSON at line 1"),
                            (b'{"a": 1}\n[', "train.jsonl: line 2: malformed JSON")):
        f = tmp_path / ("train.jsonl" if b"\n" in content else "train.json")
        f.write_bytes(content)
        for cmd in ("import-candidates", "import-preferences"):
            assert main(["data", cmd, "--data", str(data), "--train", str(f), "--out", str(tmp_path / "o")]) == 2
            assert expect in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_unmatched_records_can_be_skipped_and_counted(generated, tmp_path, capsys):
    ds, data, table = generated
    recs = export_candidates(ds, table)["train"]
    recs[2]["chosen"] = '"No Such Book"'
    recs[4]["input"] = recs[5]["input"]
    recs.append(dict(recs[0]))
    f = write_json(tmp_path / "train.json", recs)
    assert main(["data", "import-candidates", "--data", str(data), "--train", str(f), "--out",
                 str(tmp_path / "out"), "--unmatched", "skip"]) == 0
    assert "13 records, 10 matched, 3 unmatched (duplicate 1, history 1, target 1)" in capsys.readouterr().out
    got = pq.read_table(tmp_path / "out" / "candidates.parquet").to_pandas()
    assert len(got) == 10 and got["source_record"].tolist() == [0, 1, 3, 5, 6, 7, 8, 9, 10, 11]


def test_bad_preference_files(synthetic_small, tmp_path, capsys):
    ds, data = synthetic_small
    row = ds.split("train").frame.iloc[0]
    good = {"prompt": ds.instruction + research_input(list(row["history_titles"])),
            "chosen": '"' + row["target_title"] + '"', "rejected": '"' + ds.catalog.titles[0] + '"\n'}
    cases = [({**good, "rejected": {"a": 1}}, "record 0, field 'rejected': expected a string or a list of strings"),
             ({k: v for k, v in good.items() if k != "prompt"}, "record 0, field 'input': missing field"),
             ({**good, "chosen": '""'}, "record 0, field 'chosen': empty target"),
             ({**good, "rejected": ['"Not A Title"']}, "no record kept: 1 matched, 1 left without negatives")]
    for rec, expect in cases:
        f = write_json(tmp_path / "p.json", [rec])
        args = ["data", "import-preferences", "--data", str(data), "--train", str(f), "--out", str(tmp_path / "o")]
        assert main(args + (["--unknown", "drop"] if "no record kept" in expect else [])) == 2
        assert f"p.json: {expect}" in one_error_line(capsys)
    assert main(["data", "import-preferences", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "needs at least one research file" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


# --- output safety -------------------------------------------------------------------------------


def test_outputs_never_replace_inputs_or_foreign_folders(generated, tmp_path, capsys):
    ds, data, table = generated
    f = write_json(tmp_path / "train.json", export_candidates(ds, table)["train"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = {**digest(tmp_path), **digest(Path(data))}
    for cmd in ("import-candidates", "import-preferences"):
        base = ["data", cmd, "--data", str(data), "--train", str(f)]
        for out, expect in ((data, "the output is the input"), (Path(data) / "sub", "the output lies inside the input"),
                            (f, "the output is the input"), (mine, "was not written by raydpo"),
                            (tmp_path, "the output contains the input")):
            assert main(base + ["--out", str(out), "--overwrite"]) == 2, (cmd, out)
            assert expect in one_error_line(capsys)
    assert {**digest(tmp_path), **digest(Path(data))} == before
    # an earlier import is replaced only with --overwrite, and only by the same command
    out = tmp_path / "out"
    args = ["data", "import-candidates", "--data", str(data), "--train", str(f), "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "pass --overwrite" in one_error_line(capsys)
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["data", "import-preferences", "--data", str(data), "--train", str(f), "--out", str(out),
                 "--overwrite"]) == 2
    assert "holds a raydpo imported-candidates output" in one_error_line(capsys)
    assert main(["data", "import-preferences", "--data", str(data), "--train", str(f), "--out", str(tmp_path / "p")]) == 0
    assert marker_kind(tmp_path / "p") == "imported-preferences"


# --- end to end ----------------------------------------------------------------------------------


def test_imported_candidates_through_raydpo_sample(generated, tmp_path, capsys):
    from raydpo.data.preference import read_preferences

    ds, data, table = generated
    files = {s: write_json(tmp_path / f"{s}.json", r) for s, r in export_candidates(ds, table, "beam").items()}
    out = tmp_path / "cands"
    assert main(["data", "import-candidates", "--data", str(data), "--train", str(files["train"]),
                 "--valid", str(files["valid"]), "--out", str(out)]) == 0
    assert main(["sample", "--data", str(data), "--candidates", str(out), "--strategy", "clusterout_low",
                 "low_exposure", "-q"]) == 0
    capsys.readouterr()
    cand = {s: set(c) for s, c in zip(table["sample_id"].astype(str), table["candidate_item_ids"])}
    for strategy in ("clusterout_low", "low_exposure"):
        negs = read_preferences(tmp_path / "cands-negatives" / f"{strategy}.parquet")
        assert len(negs) == 18
        for sid, ids in zip(negs["sample_id"], negs["rejected_item_ids"]):
            assert len(ids) == 1 and set(ids) <= cand[sid]


@pytest.mark.slow
def test_imported_preferences_train_one_dpo_and_one_sdpo_step(synthetic_small, tmp_path, capsys):
    """Research self-play and list files -> import -> `raydpo train dpo` on the tiny model."""
    ds, data = synthetic_small
    train = ds.split("train").frame.iloc[:4]
    titles = ds.catalog.titles
    recs = [{"prompt": ds.instruction + research_input(list(h)), "chosen": '"' + t + '"',
             "rejected": ['"' + titles[(int(i) + 1) % len(titles)] + '"\n', '"' + titles[(int(i) + 2) % len(titles)] + '"']}
            for h, t, i in zip(train["history_titles"], train["target_title"], train["target_item_id"])]
    f = write_json(tmp_path / "selfplay.json", recs)
    prefs = tmp_path / "prefs"
    assert main(["data", "import-preferences", "--data", str(data), "--train", str(f), "--out", str(prefs)]) == 0
    plan = {"model": {"name_or_path": "tiny"}, "dataset": str(data), "output_dir": str(tmp_path / "run"),
            "ray": {"num_workers": 0},
            "stages": [{"kind": "preference", "name": "dpo", "data": str(prefs / "train.parquet"), "loss": "sigmoid",
                        "max_rows": 2, "batch_size": 2, "epochs": 1, "learning_rate": 1e-3},
                       {"kind": "preference", "name": "sdpo", "data": str(prefs / "train.parquet"), "loss": "sdpo",
                        "max_rows": 2, "batch_size": 2, "epochs": 1, "learning_rate": 1e-3}]}
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump(plan))
    assert main(["train", "dpo", str(cfg)]) == 0
    printed = capsys.readouterr().out
    assert "dpo: epoch" in printed and "sdpo: epoch" in printed and "final adapter" in printed
