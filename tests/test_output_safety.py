"""raydpo never removes or overwrites what it did not write, never writes onto its inputs, and a
killed run leaves nothing that looks complete (and nothing the next run does not clean up)."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import GOODREADS, ORACLE, require_shared
from raydpo.cli import main
from raydpo.io import _tmp_name, atomic_path, sweep_stale, write_json
from raydpo.outputs import LEDGER, MARKER, OutputError, check_output, marker_kind, recorded_kind

ORACLE_FILE = ORACLE / "SPRec_Reproduction" / "raw_results_1000.json"
RAYDPO = [sys.executable, "-m", "raydpo.cli"]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def err_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("raydpo: error: ")
    return lines[0]


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    (path / "sub").mkdir()
    (path / "sub" / "notes.txt").write_text("notes")
    return path


# --- the data destroyed before: each one impossible now -----------------------------------------

def test_synth_onto_a_users_folder_is_refused(tmp_path, capsys):
    d = user_folder(tmp_path / "mine")
    before = tree_hashes(d)
    assert main(["data", "synth", "--out", str(d), "--users", "50", "--items", "20"]) == 2
    assert "was not written by raydpo" in err_line(capsys)
    assert tree_hashes(d) == before
    # --overwrite does not change that: the folder is not raydpo's
    assert main(["data", "synth", "--out", str(d), "--users", "50", "--items", "20", "--overwrite"]) == 2
    assert tree_hashes(d) == before


@pytest.mark.parametrize("where", ["cwd", "home", "root"])
def test_synth_into_cwd_home_or_root_is_refused(tmp_path, monkeypatch, capsys, where):
    home = user_folder(tmp_path / "home")
    work = user_folder(tmp_path / "work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = {"cwd": ".", "home": "~", "root": "/"}[where]
    before = tree_hashes(tmp_path)
    assert main(["data", "synth", "--out", target, "--users", "50", "--items", "20", "--overwrite"]) == 2
    line = err_line(capsys)
    assert {"cwd": "the working folder", "home": "your home folder", "root": "the filesystem root"}[where] in line
    assert tree_hashes(tmp_path) == before


def test_convert_onto_its_source_is_refused(goodreads_copy, capsys):
    before = tree_hashes(goodreads_copy)
    assert main(["data", "convert", str(goodreads_copy), str(goodreads_copy)]) == 2
    assert "the output is the input" in err_line(capsys)
    assert tree_hashes(goodreads_copy) == before
    assert main(["data", "convert", str(goodreads_copy), str(goodreads_copy / "converted")]) == 2
    assert "lies inside the input" in err_line(capsys)
    assert main(["data", "convert", str(goodreads_copy), str(goodreads_copy.parent)]) == 2
    assert "contains the input" in err_line(capsys)
    assert tree_hashes(goodreads_copy) == before


def test_evaluate_json_onto_the_predictions_is_refused(tmp_path, capsys):
    require_shared()
    p = tmp_path / "P.json"
    shutil.copy(ORACLE_FILE, p)
    before = tree_hashes(tmp_path)
    assert main(["evaluate", str(p), "--data", str(GOODREADS), "--json", str(p), "-q"]) == 2
    assert "the output is the input" in err_line(capsys)
    assert tree_hashes(tmp_path) == before


def test_sample_onto_the_candidates_is_refused(tmp_path, synthetic_small, capsys):
    _, data = synthetic_small
    cands = tmp_path / "candidates.parquet"
    cands.write_bytes(b"PAR1 pretend candidates PAR1")
    before = tree_hashes(tmp_path)
    assert main(["sample", "--data", str(data), "--candidates", str(cands), "--strategy", "random",
                 "--out", str(cands)]) == 2
    assert "the output is the input" in err_line(capsys)
    assert main(["sample", "--data", str(data), "--candidates", str(cands), "--strategy", "random",
                 "--out", str(data / "negatives")]) == 2
    assert "lies inside the input" in err_line(capsys)
    assert tree_hashes(tmp_path) == before


def test_import_logs_onto_its_interactions_is_refused(tmp_path, capsys):
    x = tmp_path / "x.csv"
    x.write_text("user_id,item_id,timestamp\n1,1,1\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title,genres\n1,A,g\n")
    before = tree_hashes(tmp_path)
    assert main(["data", "import-logs", "--interactions", str(x), "--items", str(items), "--out", str(x)]) == 2
    assert "the output is the input" in err_line(capsys)
    assert tree_hashes(tmp_path) == before


# --- what is allowed: raydpo's own outputs, with --overwrite ------------------------------------

def test_earlier_dataset_needs_overwrite_and_is_then_replaced(tmp_path, capsys):
    d = tmp_path / "ds"
    assert main(["data", "synth", "--out", str(d), "--users", "50", "--items", "20"]) == 0
    assert marker_kind(d) == "dataset"
    first = tree_hashes(d)
    assert main(["data", "synth", "--out", str(d), "--users", "60", "--items", "20", "--seed", "1"]) == 2
    assert "pass --overwrite" in err_line(capsys)
    assert tree_hashes(d) == first
    assert main(["data", "synth", "--out", str(d), "--users", "60", "--items", "20", "--seed", "1",
                 "--overwrite"]) == 0
    assert tree_hashes(d) != first and marker_kind(d) == "dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nothing left beside it
    # an empty folder is a fine place to write
    (tmp_path / "empty").mkdir()
    assert main(["data", "synth", "--out", str(tmp_path / "empty"), "--users", "50", "--items", "20"]) == 0


def test_output_of_another_kind_is_refused(tmp_path, capsys):
    d = tmp_path / "x"
    d.mkdir()
    write_json(d / MARKER, {"written_by": "raydpo", "kind": "candidates"})
    (d / "run.json").write_text("{}")
    assert main(["data", "synth", "--out", str(d), "--users", "50", "--items", "20", "--overwrite"]) == 2
    assert "holds a raydpo candidates output, not a dataset" in err_line(capsys)


def test_file_where_a_folder_is_expected_and_below_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    assert main(["data", "synth", "--out", str(f), "--users", "50", "--items", "20"]) == 2
    assert "exists and is a file; expected a folder" in err_line(capsys)
    assert main(["data", "synth", "--out", str(f / "below"), "--users", "50", "--items", "20"]) == 2
    assert f"{f} is a file, not a folder" in err_line(capsys)
    assert f.read_text() == "mine"


def test_metrics_file_rules(tmp_path, capsys, monkeypatch):
    """--json: checked before the evaluation runs; a user's file is never replaced; raydpo's own
    file only with --overwrite and only while unchanged."""
    require_shared()
    pred = tmp_path / "pred.json"
    shutil.copy(ORACLE_FILE, pred)
    folder = tmp_path / "afolder"
    folder.mkdir()
    import importlib

    evaluate_mod = importlib.import_module("raydpo.evaluation.evaluate")

    def no_evaluation(*a, **k):
        raise AssertionError("the evaluation started before the output was checked")

    monkeypatch.setattr(evaluate_mod, "catalog_embeddings", no_evaluation)
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--json", str(folder), "-q"]) == 2
    assert "exists and is a folder; expected a file" in err_line(capsys)
    users = tmp_path / "users.json"
    users.write_text('{"mine": 1}')
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--json", str(users / "m.json"), "-q"]) == 2
    assert "is a file, not a folder" in err_line(capsys)
    monkeypatch.undo()  # the outputs were refused before any evaluation work
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--json", str(users), "-q", "--overwrite"]) == 2
    assert "was not written by raydpo" in err_line(capsys)
    assert users.read_text() == '{"mine": 1}'

    m = tmp_path / "m.json"
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--json", str(m), "-q"]) == 0
    capsys.readouterr()
    assert recorded_kind(m) == "metrics" and (tmp_path / LEDGER).exists()
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--json", str(m), "-q"]) == 2
    assert "pass --overwrite" in err_line(capsys)
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--json", str(m), "-q", "--overwrite"]) == 0
    capsys.readouterr()
    m.write_text(m.read_text().replace("NDCG", "NDCG "))  # the user edits it: it is theirs now
    edited = m.read_text()
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--json", str(m), "-q", "--overwrite"]) == 2
    assert "changed since" in err_line(capsys)
    assert m.read_text() == edited


def test_check_output_unit_rules(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    with pytest.raises(OutputError, match="through a link"):
        link = tmp_path / "link"
        link.symlink_to(inp)
        check_output(link, kind="dataset", folder=True, inputs=[inp / ".." / "in"])
    assert check_output(tmp_path / "new" / "deeper", kind="dataset", folder=True, inputs=[inp]) == \
        tmp_path / "new" / "deeper"
    # resumable outputs continue without --overwrite
    d = tmp_path / "cands"
    d.mkdir()
    write_json(d / MARKER, {"written_by": "raydpo", "kind": "candidates"})
    (d / "shard-00000.parquet").write_text("x")
    check_output(d, kind="candidates", folder=True, resumable=True)
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_output(d, kind="candidates", folder=True)


def test_atomic_path_never_replaces_a_foreign_folder(tmp_path):
    d = user_folder(tmp_path / "d")
    before = tree_hashes(d)
    with pytest.raises(OutputError, match="was not written by raydpo"):
        with atomic_path(d, kind="dataset") as tmp:
            tmp.mkdir()
            (tmp / "x").write_text("1")
    assert tree_hashes(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the temporary is gone too


# --- temporaries: removed on failure, swept when a killed run left them ---------------------------

def _fake_leftover(folder: Path, name: str, pid: int, as_dir: bool) -> Path:
    real = _tmp_name(folder / name)
    parts = real.name.split("-")
    parts[-2] = str(pid)
    p = folder / "-".join(parts)
    if as_dir:
        p.mkdir()
        (p / "partial.parquet").write_text("half")
    else:
        p.write_text('{"partial": ')
    return p


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_swept(tmp_path):
    dead = _dead_pid()
    stale_file = _fake_leftover(tmp_path, "out.json", dead, as_dir=False)
    stale_dir = _fake_leftover(tmp_path, "ds", dead, as_dir=True)
    alive = _fake_leftover(tmp_path, "out.json", os.getppid(), as_dir=False)  # a live process: kept
    other_host = tmp_path / f".out.json.tmp-otherhost-{dead}-abc"
    other_host.write_text("x")  # another host's PID says nothing here: kept
    lookalike = tmp_path / ".out.json.tmp-notes"
    lookalike.write_text("a user's file")  # not raydpo's pattern: kept
    write_json(tmp_path / "out.json", {"a": 1})
    assert not stale_file.exists()
    assert stale_dir.exists()  # only the target's own temporaries are swept by a write
    assert sweep_stale(tmp_path) == [stale_dir]
    assert alive.exists() and other_host.exists() and lookalike.exists()


def test_temporaries_removed_when_the_command_fails(tmp_path, capsys, monkeypatch):
    import raydpo.data.schema as schema

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(schema.pq, "write_table", boom)
    assert main(["data", "synth", "--out", str(tmp_path / "ds"), "--users", "50", "--items", "20"]) == 2
    assert "No space left on device" in err_line(capsys)
    assert list(tmp_path.iterdir()) == []


# --- kill tests ----------------------------------------------------------------------------------

def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp-" in p.name]


def _run_and_kill(cmd: list[str], watch: Path, sig: int, env: dict, held: bool) -> subprocess.Popen:
    """Start ``cmd``; once a temporary appears in ``watch`` (``held``: once it is complete and
    waiting to be renamed), send ``sig``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=watch)
    deadline = time.time() + 120
    while time.time() < deadline:
        names = [p.name for p in _temporaries(watch)]
        if any(n.endswith(".held") for n in names) if held else names:
            break
        if proc.poll() is not None:
            pytest.fail(f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("no temporary appeared")
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def _synth(out: Path) -> list[str]:
    return [*RAYDPO, "data", "synth", "--out", str(out), "--users", "20000", "--items", "300"]


@pytest.fixture(scope="module")
def reference_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ds"
    subprocess.run(_synth(out), env=_env(), check=True, capture_output=True)
    return tree_hashes(out)


@pytest.mark.slow
@pytest.mark.parametrize("held", [False, True], ids=["mid-write", "before-rename"])
def test_killed_synth_leaves_nothing_complete_and_next_run_cleans_up(tmp_path, reference_synth, held):
    out = tmp_path / "ds"
    env = _env(RAYDPO_FAULT_HOLD_TMP="30") if held else _env()
    _run_and_kill(_synth(out), tmp_path, signal.SIGKILL, env, held)
    assert not out.exists()  # nothing that looks complete
    assert _temporaries(tmp_path)  # SIGKILL cannot clean up; the next run does
    subprocess.run(_synth(out), env=_env(), check=True, capture_output=True)
    assert _temporaries(tmp_path) == []
    assert tree_hashes(out) == reference_synth  # identical to an uninterrupted run


@pytest.mark.slow
def test_killed_overwrite_keeps_the_old_output(tmp_path, reference_synth):
    out = tmp_path / "ds"
    subprocess.run([*RAYDPO, "data", "synth", "--out", str(out), "--users", "50", "--items", "20"],
                   env=_env(), check=True, capture_output=True)
    old = tree_hashes(out)
    _run_and_kill(_synth(out) + ["--overwrite"], tmp_path, signal.SIGKILL, _env(RAYDPO_FAULT_HOLD_TMP="30"), True)
    assert tree_hashes(out) == old
    subprocess.run(_synth(out) + ["--overwrite"], env=_env(), check=True, capture_output=True)
    assert tree_hashes(out) == reference_synth and _temporaries(tmp_path) == []


@pytest.mark.slow
def test_sigterm_removes_temporaries_at_once(tmp_path):
    out = tmp_path / "ds"
    proc = _run_and_kill(_synth(out), tmp_path, signal.SIGTERM, _env(RAYDPO_FAULT_HOLD_TMP="30"), True)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["convert", "evaluate", "import-logs"])
def test_killed_writers_of_other_commands(tmp_path, command, goodreads_copy):
    """SIGKILL before the rename, then a clean rerun: same output as an uninterrupted run."""
    work = tmp_path / "work"
    work.mkdir()
    if command == "convert":
        cmd = [*RAYDPO, "data", "convert", str(goodreads_copy), str(work / "out")]
        result = work / "out"
    elif command == "evaluate":
        cmd = [*RAYDPO, "evaluate", str(ORACLE_FILE), "--data", str(GOODREADS), "--json", str(work / "m.json"), "-q"]
        result = work / "m.json"
    else:
        import pandas as pd

        rng = np.random.default_rng(0)
        logs = pd.DataFrame({"user_id": rng.integers(0, 200, 4000), "item_id": rng.integers(0, 80, 4000),
                             "timestamp": np.arange(4000)}).drop_duplicates(["user_id", "item_id"])
        logs.to_csv(tmp_path / "logs.csv", index=False)
        pd.DataFrame({"item_id": range(80), "title": [f"Book {i}" for i in range(80)],
                      "genres": ["a|b" if i % 2 else "c" for i in range(80)]}).to_csv(tmp_path / "items.csv", index=False)
        cmd = [*RAYDPO, "data", "import-logs", "--interactions", str(tmp_path / "logs.csv"),
               "--items", str(tmp_path / "items.csv"), "--out", str(work / "out")]
        result = work / "out"
    _run_and_kill(cmd, work, signal.SIGKILL, _env(RAYDPO_FAULT_HOLD_TMP="30"), True)
    assert not result.exists() and _temporaries(work)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _temporaries(work) == []
    first = tree_hashes(work)
    shutil.rmtree(work)
    work.mkdir()
    subprocess.run(cmd, env=_env(), check=True, capture_output=True)
    assert tree_hashes(work) == first


# --- caches are checked ------------------------------------------------------------------------

def test_corrupted_embedding_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    from raydpo.evaluation import encoders

    monkeypatch.setenv("RAYDPO_CACHE_DIR", str(tmp_path))
    calls = []

    class Enc:
        identity = "fake-for-cache"

        def encode(self, texts, progress=False):
            calls.append(len(texts))
            return np.arange(len(texts) * 4, dtype=np.float32).reshape(len(texts), 4) + 1

    titles = ["A", "B", "C"]
    good = encoders.catalog_embeddings(Enc(), titles)
    assert encoders.catalog_embeddings(Enc(), titles).tolist() == good.tolist() and calls == [3]
    (entry,) = (tmp_path / "embeddings").iterdir()

    # same shape, zeroed values: the checksum catches it
    with np.load(entry) as z:
        fields = {k: z[k] for k in z.files}
    fields["embeddings"] = np.zeros_like(fields["embeddings"])
    with open(entry, "wb") as f:
        np.savez(f, **fields)
    with caplog.at_level("WARNING"):
        again = encoders.catalog_embeddings(Enc(), titles)
    assert again.tolist() == good.tolist() and calls == [3, 3]
    assert "checksum mismatch" in caplog.text and "rebuilding" in caplog.text

    # truncated
    entry.write_bytes(entry.read_bytes()[:40])
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert encoders.catalog_embeddings(Enc(), titles).tolist() == good.tolist()
    assert "unreadable" in caplog.text and calls == [3, 3, 3]
    assert encoders.catalog_embeddings(Enc(), titles).tolist() == good.tolist() and calls == [3, 3, 3]
    assert [p.name for p in (tmp_path / "embeddings").iterdir()] == [entry.name]  # no temporaries left
