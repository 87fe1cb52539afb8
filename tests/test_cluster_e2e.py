"""The cluster path for real: a two-node Ray cluster started with ``ray start`` on this machine
(own ports and temp dirs, token authentication as cluster.yaml ships it), jobs submitted with
``ray job submit`` and the shipped runtime env, as the README's cluster section does:

1. ``jobs/tune.py`` on a tiny search (``--resume`` when there is nothing to resume) -> SUCCEEDED;
   results, stage caches, Train checkpoints and the Tune experiment are under the storage root,
   nothing in the job's working dir; the job log says which cluster it joined, that both nodes see
   the run folder, and shows training progress; generation ran an actor on each node and every
   shard is there;
2. a second search stopped midway with ``ray job stop``, then resumed by its name -> SUCCEEDED;
3. (another cluster) a node that does not see the storage root (an empty tmpfs over it, in a mount
   namespace of its own, as after a failed NFS mount) stops the job before any stage, in one line.

The cluster is stopped by its own processes (never ``ray stop``, which would stop every Ray on
the machine)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SPACE = "tests/cluster/tiny_search.yaml"
pytestmark = [pytest.mark.slow]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class LocalRayCluster:
    """A head and one more node on this machine, each with ``cpus`` CPUs, its own temp dir and
    ports, token authentication on (``RAY_AUTH_MODE=token``, a token file of its own), and
    ``RAYDPO_STORAGE`` in the environment of every Ray process (as cluster.yaml sets it)."""

    def __init__(self, storage: Path, cpus: float = 1, nodes: int = 2, private_storage: tuple[int, ...] = ()) -> None:
        self.storage = storage
        self.nodes = nodes
        self.cpus = cpus
        # nodes started in a mount namespace of their own with an empty tmpfs over the storage
        # root: a node that does not see the shared folder, as with a failed NFS mount
        self.private_storage = private_storage
        # short paths: Ray's unix sockets live under the temp dir (107-character limit)
        self.temp_dirs = [Path(tempfile.mkdtemp(prefix=f"rdc{i}-", dir="/tmp")) for i in range(nodes)]
        self.token_file = self.temp_dirs[0] / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file), RAYDPO_STORAGE=str(storage),
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                   TOKENIZERS_PARALLELISM="false")
        self.env = env
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"

    def _node_ports(self, i: int) -> list[str]:
        nm, om, agent, agent_grpc, renv, metrics = free_ports(6)
        lo = 20000 + 2000 * i + (os.getpid() % 10) * 100
        return [f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={renv}",
                f"--metrics-export-port={metrics}", f"--min-worker-port={lo}", f"--max-worker-port={lo + 99}"]

    def ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(BIN / "ray"), *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"ray {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return r

    def start(self) -> None:
        common = [f"--num-cpus={self.cpus:g}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                  "--object-store-memory=400000000", "--disable-usage-stats"]
        self.ray("start", "--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dirs[0]}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=true",
                 f"--ray-client-server-port={self.client_port}", *common, *self._node_ports(0), timeout=180)
        for i in range(1, self.nodes):
            args = ["start", f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.temp_dirs[i]}", *common,
                    *self._node_ports(i)]
            if i in self.private_storage:
                self.storage.mkdir(parents=True, exist_ok=True)
                script = (f"mount -t tmpfs tmpfs {shlex.quote(str(self.storage))} && exec "
                          + " ".join(shlex.quote(a) for a in [str(BIN / "ray"), *args]))
                r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=self.env,
                                   cwd=ROOT, capture_output=True, text=True, timeout=180)
                assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            else:
                self.ray(*args, timeout=180)
        deadline = time.time() + 120
        while time.time() < deadline:
            r = self.ray("status", f"--address=127.0.0.1:{self.gcs_port}", check=False)
            if r.returncode == 0 and len(re.findall(r"^\s*\d+ node_", r.stdout, re.M)) >= self.nodes:
                return
            time.sleep(2)
        raise AssertionError(f"the cluster did not come up with {self.nodes} nodes:\n{r.stdout}\n{r.stderr}")

    def submit(self, *entrypoint: str, submission_id: str) -> str:
        self.ray("job", "submit", f"--address={self.address}", f"--submission-id={submission_id}", "--no-wait",
                 "--working-dir", ".", "--runtime-env", "jobs/runtime_env.yaml", "--", *entrypoint, timeout=300)
        return submission_id

    def status(self, job: str) -> str:
        r = self.ray("job", "status", f"--address={self.address}", job, check=False)
        out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
        for phrase, status in ((f"Job '{job}' succeeded", "SUCCEEDED"), (f"Job '{job}' was stopped", "STOPPED"),
                               (f"Job '{job}' failed", "FAILED")):
            if phrase in out:
                return status
        m = re.search(rf"Status for job '{job}': (\w+)", out)
        return m.group(1) if m else "UNKNOWN"

    def logs(self, job: str) -> str:
        return self.ray("job", "logs", f"--address={self.address}", job, timeout=120).stdout

    def wait(self, job: str, until: tuple[str, ...] = ("SUCCEEDED", "FAILED", "STOPPED"), timeout: float = 900) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.status(job)
            if st in until:
                return st
            time.sleep(3)
        raise AssertionError(f"job {job} still {self.status(job)} after {timeout} s:\n{self.logs(job)[-5000:]}")

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: every process whose command line names one of its temp dirs
        or its GCS port, and their descendants (workers, job drivers)."""
        marks = [str(d) for d in self.temp_dirs] + [f"127.0.0.1:{self.gcs_port}", f"--gcs_server_port={self.gcs_port}"]
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except (psutil.Error, TypeError):
                continue
            if p.pid != os.getpid() and any(m in cmd for m in marks):
                found[p.pid] = p
                try:
                    for c in p.children(recursive=True):
                        found[c.pid] = c
                except psutil.Error:
                    pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        procs = self.processes()
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = LocalRayCluster(tmp_path / "storage")
    t0 = time.time()
    try:
        c.start()
        print(f"two-node cluster up in {time.time() - t0:.1f} s")
        yield c
    finally:
        c.stop()
        assert not c.processes(), "processes of the test cluster survived its stop"


def _can_unshare_mounts() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _experiment_results(storage: Path, name: str) -> int:
    exp = storage / "tune" / name / "experiment"
    return sum(1 for f in exp.glob("*/result.json") if f.stat().st_size > 0) if exp.is_dir() else 0


def test_two_node_cluster_jobs_submit_stop_resume(cluster):
    storage = cluster.storage
    # Ray's convention, printed: RAY_ADDRESS joins this cluster; "local" (the quickstart, the test
    # fixture) starts an instance of its own even while this cluster runs
    probe = "from raydpo.storage import ray_init; import sys; ray_init(sys.argv[1] if len(sys.argv) > 1 else None)"
    env = {**cluster.env, "RAY_ADDRESS": f"127.0.0.1:{cluster.gcs_port}"}
    r = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert re.search(rf"ray: joined the Ray cluster at [\d.]+:{cluster.gcs_port} \(RAY_ADDRESS\): 2 node\(s\), 2 CPUs",
                     r.stdout), r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", probe, "local"], env=cluster.env, capture_output=True, text=True,
                       timeout=120)
    assert "ray: started a new local Ray instance: 1 node(s)" in r.stdout, r.stdout + r.stderr
    t0 = time.time()

    # 1. a search from a clean checkout: --resume with nothing to resume starts it
    job_a = cluster.submit("python", "jobs/tune.py", SPACE, "--resume", submission_id="raydpo-a")
    assert cluster.wait(job_a) == "SUCCEEDED", cluster.logs(job_a)[-8000:]
    log = cluster.logs(job_a)
    t_a = time.time() - t0
    assert re.search(rf"ray: joined the Ray cluster at [\d.]+:{cluster.gcs_port} \(RAY_ADDRESS\): 2 node\(s\)", log)
    assert "storage: all 2 nodes see" in log
    assert "nothing to resume: no search 'cluster-tiny'" in log
    assert f"storage root:      {storage} (from RAYDPO_STORAGE)" in log
    assert re.search(r"\[train sft\] epoch [\d.]+/1 step \d+/\d+ loss [\d.]+ .* [\d.]+ steps/s", log)  # training progress
    assert re.search(r"\[train align\] epoch .* steps/s", log)
    search = storage / "tune" / "cluster-tiny"
    trials = pd.read_csv(search / "trials.csv")
    assert len(trials) == 1 and (trials["status"] == "OK").all() and trials["NDCG@10"].notna().all()
    for f in ("pareto.md", "pareto.csv", "pareto.png", "study.journal", "mlruns/mlflow.db"):
        assert (search / f).is_file(), f
    assert (search / "experiment").is_dir()
    # MLflow (Ray Tune's MLflow callback, local store): the trial's parameters, each training
    # step it reported (SFT and alignment) and its final metrics
    from mlflow.tracking import MlflowClient

    ml = MlflowClient(tracking_uri=f"sqlite:///{search / 'mlruns' / 'mlflow.db'}")
    (run_,) = ml.search_runs([ml.get_experiment_by_name("cluster-tiny").experiment_id])
    assert run_.data.params == {"sampling.strategy": trials["sampling.strategy"].iloc[0]}
    assert run_.data.metrics["NDCG_at_10"] == pytest.approx(trials["NDCG@10"].iloc[0])
    assert [m.step for m in ml.get_metric_history(run_.info.run_id, "sft/loss")] == [8]  # 1 epoch of 8 steps
    assert ml.get_metric_history(run_.info.run_id, "align/reward_accuracy")
    run = storage / "runs" / "cluster-tiny"
    assert len(list(run.glob("*/*/_SUCCESS"))) == 7  # every stage of the one trial (upstream shared)
    ckpts = list((storage / "train").glob("*/*/*/raydpo_sha256-r0.json"))
    assert {p.parts[-4].split("-")[0] for p in ckpts} == {"sft", "align"}
    assert list(run.glob("*/*/train/tensorboard/*/events.out.tfevents.*"))
    # nothing in Ray's temporary copies of the working dir on either node
    for d in cluster.temp_dirs:
        for wd in d.glob("session_*/runtime_resources/working_dir_files/*"):
            assert not any((wd / x).exists() for x in ("runs", "storage", "mlruns")), wd
    # generation: an actor on each node, every shard written, merged and complete
    (gen,) = list(run.glob("generate/*/candidates"))
    assert json.loads((gen / "_SUCCESS").read_text())["rows"] == 48
    assert sorted(p.name for p in (gen / "shards").iterdir()) == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert len(pd.read_parquet(gen / "candidates.parquet")) == 48
    actors = json.loads(cluster.ray("list", "actors", f"--address={cluster.address}", "--detail", "--format=json",
                                    "--limit=10000").stdout)
    shard_nodes = {a["node_id"] for a in actors if "ShardWorker" in a.get("class_name", "") and a.get("node_id")}
    assert len(shard_nodes) == 2, [(a.get("class_name"), a.get("node_id"), a.get("state")) for a in actors]

    # 2. a second search, stopped midway by `ray job stop`, then resumed by its name
    job_b = cluster.submit("python", "jobs/tune.py", SPACE, "--name", "resumed", "--num-samples", "3",
                           submission_id="raydpo-b")
    deadline = time.time() + 600
    while time.time() < deadline and _experiment_results(storage, "resumed") < 1:
        assert cluster.status(job_b) in ("PENDING", "RUNNING"), cluster.logs(job_b)[-5000:]
        time.sleep(2)
    cluster.ray("job", "stop", f"--address={cluster.address}", job_b, timeout=120)
    assert cluster.wait(job_b) == "STOPPED"
    assert not (storage / "tune" / "resumed" / "trials.csv").exists()  # nothing looks finished
    job_c = cluster.submit("python", "jobs/tune.py", SPACE, "--name", "resumed", "--num-samples", "3", "--resume",
                           submission_id="raydpo-c")
    assert cluster.wait(job_c) == "SUCCEEDED", cluster.logs(job_c)[-8000:]
    log_c = cluster.logs(job_c)
    assert f"resuming search 'resumed' from {storage}/tune/resumed/experiment" in log_c
    trials = pd.read_csv(storage / "tune" / "resumed" / "trials.csv")
    assert sorted(trials["sampling.strategy"]) == ["clusterin_high", "clusterout_low", "random"]
    assert (trials["status"] == "OK").all()
    print(f"job A {t_a:.0f} s; all jobs {time.time() - t0:.0f} s")


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs mount namespaces (unshare -m) to hide a folder from a node")
def test_a_node_that_does_not_see_the_run_folder_stops_the_job_before_any_work(tmp_path):
    c = LocalRayCluster(tmp_path / "storage", private_storage=(1,))
    try:
        c.start()
        job = c.submit("python", "jobs/tune.py", SPACE, submission_id="raydpo-unshared")
        assert c.wait(job, timeout=300) == "FAILED"
        log = c.logs(job)
        errors = [line for line in log.splitlines() if line.startswith("raydpo: error:")]
        assert len(errors) == 1 and "does not see the run folder" in errors[0], log[-5000:]
        assert "/mnt/shared" in errors[0]  # says what to do
        assert not (c.storage / "runs" / "cluster-tiny" / "data").exists()  # no stage ran
    finally:
        c.stop()
    assert not c.processes()
