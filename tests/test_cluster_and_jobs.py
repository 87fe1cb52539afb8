"""cluster.yaml validates against Ray's autoscaler schema and names commands that exist; every
job has a submit command and starts; the runtime env is a valid Ray runtime_env."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_ray_schema():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    gpu_types = [n for n in cfg["available_node_types"] if n.startswith("gpu")]
    assert gpu_types and all(cfg["available_node_types"][n]["max_workers"] > 0 for n in gpu_types)
    assert cfg["available_node_types"]["head"]["resources"].get("GPU", 0) == 0


def test_cluster_yaml_commands_exist_and_dashboard_is_private():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    setup = "\n".join(cfg["setup_commands"])
    # files of this repository that the setup commands name
    for rel in re.findall(r"/home/ubuntu/raydpo/([\w./-]+)", setup):
        assert (ROOT / rel.rstrip('/"[')).exists() or rel.startswith("["), rel
    assert "torch==2.13.0" in setup and "constraints.txt" in setup
    head = "\n".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    ports = [p["FromPort"] for p in cfg["provider"]["security_group"]["IpPermissions"]]
    assert ports == [22]  # nothing but SSH is open to the internet
    # the console commands the cluster and the jobs rely on are installed
    bindir = Path(sys.executable).parent
    for cmd in ("ray", "raydpo"):
        assert (bindir / cmd).exists(), cmd
    assert "/mnt/shared" in setup


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_jobs_have_submit_command_and_help(job):
    text = (ROOT / "jobs" / job).read_text()
    assert "ray job submit" in text and "--runtime-env jobs/runtime_env.yaml" in text and f"jobs/{job}" in text
    r = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout


def test_runtime_env_is_valid():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert env["pip"]["packages"][0] == "torch==2.13.0"
    assert (ROOT / "constraints.txt").exists()
