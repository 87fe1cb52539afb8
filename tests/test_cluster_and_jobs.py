"""The cluster path without a cluster: cluster.yaml against Ray's own schema and the commands it
runs; the jobs and their runtime envs; the storage root (relative paths, a job's temporary
working dir, checkpoint manifests); the GPUs each search space requests against what its stages
use. The real two-node cluster is tests/test_cluster_e2e.py; object storage is
tests/test_cluster_s3.py."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema():
    cfg = _cluster()
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    # and Ray's own loader accepts it (fills defaults, checks node types) -- no cloud call
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(json.loads(json.dumps(cfg))))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu_types = [n for n in cfg["available_node_types"] if n.startswith("gpu")]
    assert gpu_types and all(cfg["available_node_types"][n]["max_workers"] > 0 for n in gpu_types)
    assert cfg["available_node_types"]["head"]["resources"].get("GPU", 0) == 0


def test_cluster_yaml_security():
    cfg = _cluster()
    perms = cfg["provider"]["security_group"]["IpPermissions"]
    assert [p["FromPort"] for p in perms] == [22]  # nothing but SSH is open
    ranges = [r["CidrIp"] for p in perms for r in p["IpRanges"]]
    assert ranges == [cfg["metadata"]["raydpo_settings"]["ssh_source_range"]] and "0.0.0.0/0" not in ranges
    for name, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        assert nc["MetadataOptions"]["HttpTokens"] == "required", name  # IMDSv2 only
        assert "IamInstanceProfile" in nc, name  # never the launcher's default (full EC2 + S3) profile
    head = cfg["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]
    assert all(n["node_config"]["IamInstanceProfile"] != head
               for k, n in cfg["available_node_types"].items() if k != "head")  # workers cannot launch instances
    start = "\n".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    # token authentication: the token is copied to every node and every Ray process runs with it
    assert cfg["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    setup = "\n".join(cfg["setup_commands"])
    assert "export RAY_AUTH_MODE=token" in setup
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert all("source /home/ubuntu/raydpo.env" in c for c in cmds if " ray start" in c)


def test_cluster_yaml_setup_is_idempotent_and_fails_loudly():
    cfg = _cluster()
    cmds = cfg["setup_commands"] + cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
    text = "\n".join(cmds)
    assert "|| true" not in text and "; true" not in text
    # the shared mount: mounted, then checked again (a failed mount stops the setup)
    i = next(i for i, c in enumerate(cfg["setup_commands"]) if "mount -t nfs4" in c)
    assert cfg["setup_commands"][i + 1].strip() == "mountpoint -q /mnt/shared"
    # .bashrc: appended only when the line is not there yet; the env file is rewritten, not appended
    for c in cmds:
        if ">> " in c:
            assert c.startswith("grep -qxF "), c
    assert "RAYDPO_STORAGE=/mnt/shared/raydpo" in text
    # never copy the venv, outputs or git history to the nodes
    assert {".venv", ".git", "runs", "data"} <= set(cfg["rsync_exclude"])
    assert cfg["file_mounts"]["/home/ubuntu/raydpo"] == "."
    # files of this repository that the setup commands name
    for rel in re.findall(r"/home/ubuntu/raydpo/([\w./-]+)", text):
        assert (ROOT / rel.rstrip('/"[')).exists(), rel


# Commands of Ubuntu 24.04 (the DLAMI base): coreutils, util-linux, apt, sudo, grep, bash builtins.
UBUNTU_BASE = {"sudo", "apt-get", "mkdir", "mount", "mountpoint", "chown", "chmod", "grep", "echo", "printf", "test",
               "python3.12"}
SHELL_BUILTINS = {"source", "ulimit", "export", "cd", "test", "echo", "printf"}


def _simple_commands(line: str):
    for part in re.split(r"&&|\|\||;|\(|\)", line):
        words = shlex.split(part, comments=True)
        while words and (re.match(r"^\w+=", words[0]) or words[0] == "sudo"):
            words = words[1:]
        if words:
            yield words


def test_cluster_yaml_commands_exist_in_the_image():
    """Every command the setup and start commands run is a shell builtin, an Ubuntu 24.04 base
    command (checked here with `which` where this machine has it), or a program of the venv the
    setup creates -- which scripts/install.sh creates here with the same pip recipe, so it must
    be in this venv too (ray, python)."""
    cfg = _cluster()
    setup = "\n".join(cfg["setup_commands"])
    # the interpreter: Ubuntu 24.04's python3.12, inside requires-python
    requires = SpecifierSet(re.search(r'requires-python = "([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1))
    (venv_python,) = set(re.findall(r"(python3\.\d+) -m venv /home/ubuntu/venv", setup))
    assert venv_python.removeprefix("python") + ".0" in requires
    # the same install recipe as scripts/install.sh: torch first, then the pinned stack with the
    # cluster extra (boto3 for the autoscaler) and ray[default] (the Jobs API)
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert setup.index("pip install -q torch==2.13.0") < setup.index("-c /home/ubuntu/raydpo/constraints.txt -e")
    assert re.search(r"\[[\w,]*cluster[\w,]*\]", setup) and "cluster" in install
    assert '"ray[default,' in (ROOT / "pyproject.toml").read_text()
    import boto3  # noqa: F401 - `ray up` on the laptop and the head's autoscaler need it
    from ray.dashboard.modules.job.sdk import JobSubmissionClient  # noqa: F401 - ray[default]: the Jobs API

    seen = set()
    for line in cfg["setup_commands"] + cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        for words in _simple_commands(line):
            cmd = words[0]
            seen.add(Path(cmd).name)
            if cmd.startswith("/home/ubuntu/venv/bin/"):
                assert (VENV_BIN / Path(cmd).name).exists(), cmd
            elif cmd == "ray":  # on PATH through raydpo.env (the venv's bin first)
                assert "export PATH=/home/ubuntu/venv/bin:$PATH" in setup
                assert (VENV_BIN / "ray").exists()
            else:
                assert cmd in SHELL_BUILTINS | UBUNTU_BASE, f"{cmd!r} (in {line!r}) is not known to be in the image"
                if cmd not in SHELL_BUILTINS and cmd not in ("python3.12", "apt-get", "sudo"):
                    assert shutil.which(cmd), cmd
    assert {"ray", "python", "mount", "mountpoint"} <= seen


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_jobs_have_submit_command_and_help(job):
    text = (ROOT / "jobs" / job).read_text()
    assert "ray job submit" in text and "--runtime-env jobs/runtime_env.yaml" in text and f"jobs/{job}" in text
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout


def test_runtime_envs_are_valid_and_keep_outputs_out():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert "pip" not in env and "conda" not in env and "uv" not in env  # nodes have the stack
    assert {".venv", ".git", "runs", "data", "storage", "mlruns"} <= set(env["excludes"])
    # the alternative for nodes without the stack: pip on the node, from the uploaded working dir
    alt = yaml.safe_load((ROOT / "jobs" / "runtime_env_pip.yaml").read_text())
    RuntimeEnv(**alt)
    pkgs = alt["pip"]["packages"]
    assert pkgs[0] == "torch==2.13.0"
    assert "-c ${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}/constraints.txt" in pkgs
    assert any(p.startswith("${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}[") for p in pkgs)
    assert not any(re.search(r"(^|\s)(-c|-r|-e)\s+[^$/]", p) for p in pkgs)  # no path relative to pip's folder
    assert alt["excludes"] == env["excludes"]
    assert "constraints.txt" not in env["excludes"] and "pyproject.toml" not in env["excludes"]


# --- the storage root ------------------------------------------------------------------------------


def test_storage_root_and_relative_paths(tmp_path, monkeypatch):
    from raydpo.config import load_config
    from raydpo.storage import resolve_config, storage_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAYDPO_STORAGE", raising=False)
    assert storage_root(None) is None
    cfg = resolve_config(load_config(None))
    assert Path(cfg.run_dir) == tmp_path / "runs" and cfg.ray.storage_path is None
    monkeypatch.setenv("RAYDPO_STORAGE", str(tmp_path / "root"))
    root = storage_root(None)
    assert root.uri == str(tmp_path / "root") and root.source == "RAYDPO_STORAGE" and not root.remote
    cfg = resolve_config(load_config(None, {"data.source": "path", "data.path": "data/goodreads"}))
    assert cfg.run_dir == str(tmp_path / "root" / "runs") and cfg.ray.storage_path == str(tmp_path / "root")
    assert cfg.data.path == str(tmp_path / "root" / "data" / "goodreads")  # fetched there when missing
    assert resolve_config(cfg) == cfg  # idempotent
    # the config's storage_path wins over the environment; an object store keeps a local mirror
    monkeypatch.setenv("RAYDPO_STORAGE_CACHE", str(tmp_path / "mirror"))
    s3 = storage_root("s3://bucket/some/prefix")
    assert s3.remote and s3.source == "ray.storage_path" and s3.local == tmp_path / "mirror" / "s3" / "bucket" / "some" / "prefix"
    assert s3.remote_of(s3.local / "runs" / "x") == "s3://bucket/some/prefix/runs/x"
    assert s3.join("train") == "s3://bucket/some/prefix/train"


def test_a_job_never_writes_into_its_temporary_working_dir(tmp_path, monkeypatch, capsys):
    """Inside Ray's copy of the working dir, relative outputs go under the storage root, or are
    refused in one line when there is none."""
    from raydpo.cli import main
    from raydpo.storage import job_working_dir

    wd = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    (wd / "search_spaces").mkdir(parents=True)
    shutil.copy(ROOT / "search_spaces" / "quickstart.yaml", wd / "search_spaces")
    (wd / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "quickstart.yaml", wd / "configs")
    monkeypatch.chdir(wd / "search_spaces")
    assert job_working_dir() == wd
    monkeypatch.delenv("RAYDPO_STORAGE", raising=False)
    assert main(["tune", "search_spaces/quickstart.yaml".split("/")[-1]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run_dir 'runs/quickstart'" in err and "RAYDPO_STORAGE" in err
    assert not (wd / "search_spaces" / "runs").exists() and not (wd / "runs").exists()
    assert main(["run", str(wd / "configs" / "quickstart.yaml")]) == 2
    assert "Ray deletes" in capsys.readouterr().err
    # a relative storage root inside the working dir is refused too
    monkeypatch.setenv("RAYDPO_STORAGE", "out")
    assert main(["run", str(wd / "configs" / "quickstart.yaml")]) == 2
    assert "relative path inside Ray's temporary copy" in capsys.readouterr().err


def test_missing_data_is_fetched_into_the_storage_root(tmp_path, monkeypatch, capsys):
    from conftest import GOODREADS, require_shared
    from raydpo.config import load_config
    from raydpo.pipeline import run_pipeline

    require_shared()
    monkeypatch.setenv("RAYDPO_STORAGE", str(tmp_path / "root"))
    cfg = load_config(None, {"data.source": "path", "data.path": "data/goodreads", "data.fetch": "goodreads",
                             "data.fetch_url": str(GOODREADS)})
    out = run_pipeline(cfg, until="data", progress=False)
    assert out["data"]["items"] == 4058
    assert (tmp_path / "root" / "data" / "goodreads" / "train.json").read_bytes() == \
        (GOODREADS / "train.json").read_bytes()
    assert "is missing: fetching the goodreads sample" in capsys.readouterr().out
    # the next run finds it there (and the data stage is cached)
    run_pipeline(cfg, until="data", progress=False)
    assert "cached" in capsys.readouterr().out


def test_checkpoint_manifest_detects_changed_missing_and_extra_files(tmp_path):
    from raydpo.errors import RaydpoError
    from raydpo.storage import verify_manifests, write_manifest

    ck = tmp_path / "ck"
    (ck / "global_step4").mkdir(parents=True)
    (ck / "optimizer.pt").write_bytes(b"a" * 100)
    (ck / "global_step4" / "zero_pp_rank_0.pt").write_bytes(b"r0")
    write_manifest(ck, rank=0)
    (ck / "global_step4" / "zero_pp_rank_1.pt").write_bytes(b"r1")  # rank 1's file, merged by Ray
    rank1 = tmp_path / "r1"
    (rank1 / "global_step4").mkdir(parents=True)
    (rank1 / "global_step4" / "zero_pp_rank_1.pt").write_bytes(b"r1")
    shutil.copy(write_manifest(rank1, rank=1), ck)
    assert verify_manifests(ck) == 3
    (ck / "optimizer.pt").write_bytes(b"b" * 100)
    with pytest.raises(RaydpoError, match="optimizer.pt does not match its recorded SHA-256"):
        verify_manifests(ck)
    (ck / "optimizer.pt").write_bytes(b"a" * 100)
    (ck / "evil.pkl").write_bytes(b"x")
    with pytest.raises(RaydpoError, match="evil.pkl is not in the checkpoint's manifest"):
        verify_manifests(ck)
    (ck / "evil.pkl").unlink()
    (ck / "global_step4" / "zero_pp_rank_0.pt").unlink()
    with pytest.raises(RaydpoError, match="zero_pp_rank_0.pt is missing"):
        verify_manifests(ck)
    for m in ck.glob("raydpo_sha256-*.json"):
        m.unlink()
    with pytest.raises(RaydpoError, match="no raydpo_sha256 manifest"):
        verify_manifests(ck)


# --- GPUs: requested where they are used ----------------------------------------------------------


GPU_SPACES = {"strategy_comparison", "beta_epochs_temperature", "combined"}


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=lambda p: p.stem)
def test_search_space_requests_the_gpus_its_stages_use(path):
    """A trial reserves no GPU (its own process never computes on one); every Ray stage that
    computes on a GPU requests it (Ray Train workers: use_gpu; decoding actors: gpus_per_actor)
    and none computes on a GPU it did not request (actors decode on the CPU when they request no
    GPU, as Ray 2.60 leaves every GPU visible to them)."""
    from raydpo.config import with_overrides
    from raydpo.pipeline import stage_resources
    from raydpo.tuning.search import load_search_space

    space, cfg = load_search_space(path)
    assert space.resources_per_trial.get("gpu", 0) == 0
    # every trial's config (the first value of each searched field is enough: none searches ray.*)
    assert not any(k.startswith("ray.") for k in space.space)
    for field, dist in space.space.items():
        kind, arg = next(iter(dist.items()))
        cfg = with_overrides(cfg, {field: arg[0]})
    stages = {k: v for k, v in stage_resources(cfg).items() if v}
    for name, r in stages.items():
        assert (r["device"] == "cuda") == (r["GPU"] > 0), (name, r)  # used <=> requested
    uses_gpu = {name for name, r in stages.items() if r["GPU"] > 0}
    if path.stem in GPU_SPACES:
        assert uses_gpu == set(stages), (path.stem, stages)  # train and generate on GPUs, all of them
        assert cfg.ray.use_gpu and cfg.ray.gpus_per_actor >= 1
    else:
        assert not uses_gpu


def test_a_gpu_reserved_for_a_trial_is_refused(tmp_path):
    from raydpo.config import ConfigError
    from raydpo.tuning.search import load_search_space

    p = tmp_path / "s.yaml"
    p.write_text(f"base: {ROOT / 'configs' / 'quickstart.yaml'}\nresources_per_trial: {{cpu: 1, gpu: 1}}\n"
                 "space:\n  sampling.strategy: {choice: [random]}\n")
    with pytest.raises(ConfigError, match=r"resources_per_trial.gpu: 1 GPU\(s\) per trial would stay idle"):
        load_search_space(p)
