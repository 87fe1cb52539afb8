"""Object storage for real: an S3-compatible server (moto, in server mode on a free port) as the
storage root ``s3://...``, reached the way Ray reaches it (pyarrow's S3 filesystem through
``AWS_ENDPOINT_URL``). Each driver runs as its own process with its own local Ray, as a job would.

- a search whose driver is killed midway resumes from the object store on a "new machine" (an
  empty local mirror): Tune's experiment state and trial results, the finished stages and the
  Optuna journal all come back from S3;
- Ray Train checkpoints are written to S3; a run whose driver was killed resumes from the S3
  checkpoint, and only after its SHA-256 manifest is checked (a changed file is refused)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "raydpo-test"
pytestmark = [pytest.mark.slow]


@pytest.fixture
def s3(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield env, client
    finally:
        server.stop()


def _keys(client, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        r = client.list_objects_v2(**kw)
        out += [o["Key"] for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return out
        token = r["NextContinuationToken"]


def _env(s3env: dict, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    env.update(s3env, RAY_ADDRESS="local", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def test_search_on_s3_resumes_from_the_object_store_on_another_machine(s3, tmp_path):
    s3env, client = s3
    root = f"s3://{BUCKET}/root"
    cmd = [sys.executable, "-m", "raydpo.cli", "tune", str(ROOT / "tests" / "cluster" / "tiny_search.yaml"),
           "--num-samples", "2"]
    env1 = _env(s3env, RAYDPO_STORAGE=root, RAYDPO_STORAGE_CACHE=str(tmp_path / "machine1"))
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=env1, cwd=tmp_path, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if [k for k in _keys(client, "root/runs/cluster-tiny/evaluate/") if k.endswith("/_SUCCESS")]:
                break  # a trial has finished (its stages are copied to S3 as they finish)
            time.sleep(2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
        time.sleep(8)  # Tune records the finished trial in its experiment state on S3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, as a lost head node would
        proc.wait()
    keys = _keys(client, "root/")
    assert not [k for k in keys if k.endswith("tune/cluster-tiny/trials.csv")]  # nothing looks finished
    assert [k for k in keys if k.startswith("root/tune/cluster-tiny/experiment/")]  # Ray Tune wrote to S3
    # Ray Train checkpoints went to S3, each with its manifest
    manifests = [k for k in keys if k.startswith("root/train/") and k.endswith("/raydpo_sha256-r0.json")]
    assert {k.split("/")[2].split("-")[0] for k in manifests} >= {"sft", "align"}

    # another machine: an empty local mirror; everything comes from the object store
    env2 = _env(s3env, RAYDPO_STORAGE=root, RAYDPO_STORAGE_CACHE=str(tmp_path / "machine2"))
    r = subprocess.run(cmd + ["--resume"], env=env2, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    assert f"resuming search 'cluster-tiny' from {root}/tune/cluster-tiny/experiment" in out
    assert "[data] downloaded the finished stage from s3://" in out and "[sft] downloaded the finished stage" in out
    import pandas as pd

    trials = pd.read_csv(tmp_path / "machine2" / "s3" / BUCKET / "root" / "tune" / "cluster-tiny" / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "OK").all()
    keys = _keys(client, "root/tune/cluster-tiny/")
    for f in ("trials.csv", "pareto.md", "pareto.png", "study.journal", "search.json"):
        assert f"root/tune/cluster-tiny/{f}" in keys, f
    # the Optuna study on S3 holds both trials (the first one from the killed driver)
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "study.journal"
    journal.write_bytes(client.get_object(Bucket=BUCKET, Key="root/tune/cluster-tiny/study.journal")["Body"].read())
    study = optuna.load_study(study_name="cluster-tiny", storage=JournalStorage(JournalFileBackend(str(journal))))
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2


TRAIN_SCRIPT = r"""
import json, sys
from pathlib import Path
from raydpo.data.synthetic import SyntheticConfig, generate
from raydpo.models import resolve_model_path
from raydpo.training import run_plan
from raydpo.training.data import random_preferences

tmp = Path(sys.argv[1])
if not (tmp / "prefs.parquet").exists():
    ds = generate(SyntheticConfig(n_users=120, n_items=60, seed=11))
    ds.save(tmp / "data")
    random_preferences(ds, n_negatives=1, seed=1, limit=96).to_parquet(tmp / "prefs.parquet")
base = resolve_model_path("tiny", catalog=generate(SyntheticConfig(n_users=120, n_items=60, seed=11)).catalog)
res = run_plan({"model": {"name_or_path": base}, "dataset": str(tmp / "data"), "output_dir": str(tmp / "run"),
                "stages": [{"kind": "preference", "name": "dpo", "data": str(tmp / "prefs.parquet"), "epochs": 3,
                            "batch_size": 8, "learning_rate": 3e-3}],
                "ray": {"num_workers": 1, "storage_path": sys.argv[2]}})
print("RESULT", json.dumps({"checkpoint": res.checkpoint_path, "metrics": res.metrics,
                            "stage": json.loads((Path(res.stages["dpo"]) / "stage.json").read_text())}))
"""


def test_train_checkpoints_on_s3_resume_a_killed_driver_after_their_manifest_is_checked(s3, tmp_path):
    """A Ray Train run writes its checkpoints to S3; its driver (with its Ray) is killed after the
    first epoch; a rerun resumes from the S3 checkpoint -- but only once the checkpoint matches
    its SHA-256 manifest: a changed file makes the rerun refuse to resume."""
    import json

    s3env, client = s3
    cmd = [sys.executable, "-c", TRAIN_SCRIPT, str(tmp_path), f"s3://{BUCKET}/train"]
    proc = subprocess.Popen(cmd, env=_env(s3env), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    first = "00-dpo-step0000012"  # epoch 1 of 3 (12 steps each)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if any(k.endswith(f"/{first}/raydpo_sha256-r0.json") for k in _keys(client, "train/")):
                break
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()[-5000:]
        time.sleep(3)  # Ray Train records the reported checkpoint in its snapshot
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    keys = _keys(client, "train/")
    steps = sorted(int(re.search(r"/00-dpo-step(\d+)/raydpo_sha256-r0.json$", k).group(1))
                   for k in keys if k.endswith("/raydpo_sha256-r0.json"))
    assert steps and steps[-1] < 36, steps  # killed mid-run
    latest = steps[-1]  # the checkpoint a rerun resumes from
    (opt,) = [k for k in keys if k.endswith(f"/00-dpo-step{latest:07d}/optimizer.pt")]
    good = client.get_object(Bucket=BUCKET, Key=opt)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=opt, Body=good[:-8] + b"tampered")  # same size, other bytes

    r = subprocess.run(cmd, env=_env(s3env), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "optimizer.pt does not match its recorded SHA-256; refusing to resume" in r.stdout + r.stderr

    client.put_object(Bucket=BUCKET, Key=opt, Body=good)
    r = subprocess.run(cmd, env=_env(s3env), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-8000:]
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert res["stage"]["resumed_from"] is True  # from the latest checkpoint on S3
    assert f"[train dpo] start: 36 steps, 3 epoch(s), resuming at step {latest}" in out
    assert [m["step"] for m in res["metrics"]] == [12, 24, 36] and res["metrics"][-1]["resumed_from_step"] == latest
    assert res["checkpoint"].startswith(f"{BUCKET}/train/raydpo-")
    keys = _keys(client, "train/")
    for step in (24, 36):  # Ray Train keeps the last two (checkpoint_keep)
        assert any(k.endswith(f"/00-dpo-step{step:07d}/raydpo_sha256-r0.json") for k in keys), step
