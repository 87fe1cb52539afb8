"""The commands a user starts with, run through the command line the way a user runs them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raydpo.cli import main
from raydpo.data import load_dataset
from raydpo.outputs import marker_kind

ROOT = Path(__file__).resolve().parents[1]
RAYDPO = [sys.executable, "-m", "raydpo.cli"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("RAY_ADDRESS", "local")  # its own Ray instance, never a cluster running nearby
    return env


def _run(args, cwd, timeout=900) -> subprocess.CompletedProcess:
    r = subprocess.run([*RAYDPO, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"raydpo {' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    # raydpo's own process prints no traceback (Ray's actors may log theirs at shutdown, tagged
    # "(ActorName pid=N)", e.g. Ray Train's PlacementGroupCleaner losing its GCS connection)
    own = [ln for ln in r.stderr.splitlines() if not re.search(r"\(\w+ pid=\d+", ln)]
    assert not any("Traceback" in ln for ln in own), r.stderr[-3000:]
    return r


def test_data_synth_convert_stats_import_logs(tmp_path, goodreads_copy, capsys):
    # synth
    assert main(["data", "synth", "--out", str(tmp_path / "syn"), "--users", "120", "--items", "40",
                 "--genres", "4", "--history-len", "5", "--seed", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    syn = load_dataset(tmp_path / "syn")
    assert len(syn.catalog) == 40 and marker_kind(tmp_path / "syn") == "dataset"
    # convert the published SPRec-format folder
    assert main(["data", "convert", str(goodreads_copy), str(tmp_path / "gr")]) == 0
    out = capsys.readouterr().out
    assert "4058 items" in out
    gr = load_dataset(tmp_path / "gr")
    assert (gr.samples.frame["split"] == "test").sum() == 1000
    # stats
    assert main(["data", "stats", str(tmp_path / "gr"), "--cluster-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "4058 items" in out and "exposure (split_histories)" in out and "interest clusters (top-2" in out
    # import-logs: users with 4+ interactions become leave-last-out samples
    rows = [(u, (u * 7 + j) % 30, j) for u in range(40) for j in range(6)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(tmp_path / "logs.csv", index=False)
    pd.DataFrame({"item_id": range(30), "title": [f"Title {i}" for i in range(30)],
                  "genres": ["x|y" if i % 3 else "z" for i in range(30)]}).to_csv(tmp_path / "items.csv", index=False)
    assert main(["data", "import-logs", "--interactions", str(tmp_path / "logs.csv"), "--items",
                 str(tmp_path / "items.csv"), "--out", str(tmp_path / "logs"), "--history-len", "3"]) == 0
    logs = load_dataset(tmp_path / "logs")
    assert len(logs.catalog) == 30
    assert set(logs.samples.frame["split"]) == {"train", "valid", "test"}
    assert (logs.samples.frame["split"] == "test").sum() == 40  # one test sample per user


RUN_CONFIG = """
name: clirun
data:
  source: synthetic
  synthetic: {n_users: 120, n_items: 50, n_genres: 4, seed: 1}
sft: {epochs: 1, learning_rate: 0.003, batch_size: 16, full_finetune: true}
generation: {mode: beam, num_return_sequences: 3, batch_size: 32, limit: 24}
sampling: {strategy: clusterout_low}
alignment: {loss: sigmoid, beta: 0.1, epochs: 1, learning_rate: 0.0005, batch_size: 16}
prediction: {mode: constrained, num_beams: 2, batch_size: 16, limit: 8}
evaluation: {split: valid, ks: [5]}
ray: {num_workers: 1, cpus_per_worker: 0.5, shard_size: 12}
run_dir: runs
"""


@pytest.mark.slow
def test_run_with_set_until_and_from(tmp_path):
    (tmp_path / "config.yaml").write_text(RUN_CONFIG)
    # repeated --set accumulate; --until stops after a stage
    r = _run(["run", "config.yaml", "--set", "alignment.beta=0.2", "--set", "sampling.strategy=random",
              "--until", "sample", "-q"], tmp_path)
    assert "[sample] done" in r.stdout and "[align]" not in r.stdout
    last = json.loads((tmp_path / "runs" / "last_run.json").read_text())
    assert last["config"]["alignment"]["beta"] == 0.2 and last["config"]["sampling"]["strategy"] == "random"
    assert last["until"] == "sample"
    # the rest of the pipeline reuses the finished stages
    r = _run(["run", "config.yaml", "--set", "alignment.beta=0.2", "--set", "sampling.strategy=random", "-q"], tmp_path)
    assert "[sft] cached" in r.stdout and "[evaluate] done" in r.stdout
    metrics = json.loads((tmp_path / "runs" / "evaluate" / last["keys"]["evaluate"] / "metrics.json").read_text())
    assert metrics["5"]["Predict_NotIn_Ratio"] == 0.0  # constrained prediction: catalog titles only
    # --from reruns from a stage on, whatever is cached
    r = _run(["run", "config.yaml", "--set", "alignment.beta=0.2", "--set", "sampling.strategy=random",
              "--from", "predict", "-q"], tmp_path)
    assert "[align] cached" in r.stdout and "[predict] running" in r.stdout and "[evaluate] running" in r.stdout
    assert marker_kind(tmp_path / "runs") == "run"


@pytest.mark.slow
def test_train_sft_then_dpo_through_the_cli(tmp_path):
    _run(["data", "synth", "--out", "data", "--users", "80", "--items", "30", "--genres", "3"], tmp_path)
    sft = {"model": {"name_or_path": "tiny"}, "dataset": "data", "output_dir": "runs/sft",
           "sft": {"data": "data", "epochs": 1, "batch_size": 16, "learning_rate": 0.003, "lora": None},
           "ray": {"num_workers": 1, "cpus_per_worker": 0.5}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    r = _run(["train", "sft", "sft.yaml"], tmp_path)
    assert "final model" in r.stdout and "loss" in r.stdout
    final = tmp_path / "runs" / "sft" / "final"
    assert (final / "config.json").exists() and marker_kind(tmp_path / "runs" / "sft") == "training"
    # a rerun resumes the finished plan instead of refusing or starting over
    r = _run(["train", "sft", "sft.yaml"], tmp_path)
    assert "final model" in r.stdout


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """The README's main job, as a user starts it (its own local Ray, ~10 minutes on 2 cores)."""
    r = _run(["quickstart"], tmp_path, timeout=1800)
    search = tmp_path / "runs" / "quickstart" / "tune" / "quickstart"
    trials = pd.read_csv(search / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "OK").all(), trials
    assert trials["NDCG@10"].notna().all() and trials["ORRatio@10"].notna().all()
    assert (search / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (search / "pareto.md").exists() and (search / "report.md").exists()
    assert "NDCG@10" in r.stdout
    # intervals, and which strategies differ significantly from selfplay on the 400 validation users
    assert trials["NDCG@10_ci_low"].notna().all() and (trials["NDCG@10_ci_low"] <= trials["NDCG@10"]).all()
    sig = pd.read_csv(search / "significance.csv")
    against = sig[sig["family"] == "baselines"]
    assert set(against["versus"]) == {"selfplay"}
    assert set(against["trial"]) == {"clusterout_low", "clusterin_high", "random"}
    report = (search / "report.md").read_text()
    assert "400 valid users" in report and "vs **selfplay**" in report and "±" in report
