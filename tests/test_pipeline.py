"""The whole pipeline on local Ray with the tiny model: caching by config hash, partial reruns,
--from, resume; and a small Ray Tune + Optuna search with a failing trial."""

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest

from raydpo.cli import main
from raydpo.config import load_config, with_overrides
from raydpo.pipeline import STAGES, run_pipeline, stage_keys

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = """
name: test
data:
  source: synthetic
  synthetic: {n_users: 150, n_items: 60, n_genres: 5, seed: 1}
sft: {epochs: 1, learning_rate: 0.003, batch_size: 16, full_finetune: true}
generation: {mode: beam, num_return_sequences: 3, batch_size: 32, limit: 48}
sampling: {strategy: clusterout_low}
alignment: {loss: sigmoid, beta: 0.1, epochs: 1, learning_rate: 0.0005, batch_size: 16}
prediction: {mode: constrained, num_beams: 2, batch_size: 16, limit: 12}
evaluation: {split: valid, ks: [5, 10]}
ray: {num_workers: 1, cpus_per_worker: 0.5, shard_size: 24}
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    p = d / "config.yaml"
    p.write_text(CONFIG + f"run_dir: {d / 'runs'}\n")
    return p


def _mtimes(run_dir: Path, keys: dict) -> dict:
    return {s: (run_dir / s / keys[s] / "_SUCCESS").stat().st_mtime_ns for s in STAGES}


def test_stage_keys_of_an_unvalidated_copy_match_the_validated_config(config_path):
    """model_copy(update=...) skips validation (epochs=1 stays an int); the keys must still be
    those of the validated config that run_pipeline runs, or a cached stage is looked up under
    another key."""
    cfg = load_config(config_path)
    copied = cfg.model_copy(update={"alignment": cfg.alignment.model_copy(update={"epochs": 1}),
                                    "sft": cfg.sft.model_copy(update={"epochs": 2})})
    assert type(copied.alignment.epochs) is int
    validated = with_overrides(cfg, {"alignment.epochs": 1, "sft.epochs": 2})
    assert type(validated.alignment.epochs) is float
    assert stage_keys(copied) == stage_keys(validated)


def test_run_cache_partial_rerun_and_from(ray_local, config_path, capsys):
    cfg = load_config(config_path)
    run_dir = Path(cfg.run_dir)
    first = run_pipeline(cfg, progress=False)
    metrics = first["evaluate"]["metrics"]
    assert set(metrics) == {"5", "10"} and metrics["10"]["Predict_NotIn_Ratio"] == 0.0  # constrained
    keys = stage_keys(cfg)
    before = _mtimes(run_dir, keys)
    assert (run_dir / "align" / keys["align"] / "adapter" / "adapter_config.json").exists()

    # rerun: every stage cached, nothing rewritten
    capsys.readouterr()
    again = run_pipeline(cfg, progress=False)
    assert "running" not in capsys.readouterr().out
    assert again["evaluate"]["metrics"] == metrics and _mtimes(run_dir, keys) == before

    # a changed alignment parameter reruns only alignment and what depends on it
    cfg2 = with_overrides(cfg, {"alignment.beta": 0.5})
    keys2 = stage_keys(cfg2)
    assert [s for s in STAGES if keys2[s] != keys[s]] == ["align", "predict", "evaluate"]
    run_pipeline(cfg2, progress=False)
    for s in ("data", "sft", "generate", "sample"):
        assert (run_dir / s / keys[s] / "_SUCCESS").stat().st_mtime_ns == before[s]
    assert (run_dir / "align" / keys2["align"] / "_SUCCESS").exists()

    # --from sample reruns sample onward, not the upstream stages
    run_pipeline(cfg, from_stage="sample", progress=False)
    after = _mtimes(run_dir, keys)
    assert [s for s in STAGES if after[s] != before[s]] == ["sample", "align", "predict", "evaluate"]

    # an interrupted stage (no _SUCCESS) is rerun; a finished one is not
    (run_dir / "evaluate" / keys["evaluate"] / "_SUCCESS").unlink()
    (run_dir / "evaluate" / keys["evaluate"] / "metrics.json").write_text("{garbage")
    run_pipeline(cfg, progress=False)
    assert json.loads((run_dir / "evaluate" / keys["evaluate"] / "metrics.json").read_text())["5"]

    # the report renders the evaluated configurations as a published-style table
    assert main(["report", str(run_dir)]) == 0
    md = (run_dir / "report.md").read_text()
    assert "| Method | NDCG@5" in md and "DPO clusterout_low" in md
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"

    # the evaluate stage wrote per-user results that give back its metrics, and `raydpo compare`
    # reads the run folder (both evaluated configurations: beta 0.1 and 0.5)
    from raydpo.evaluation.stats import PerUser, metrics_from_per_user

    stage = run_dir / "evaluate" / keys["evaluate"]
    again = metrics_from_per_user(PerUser.read(stage / "per_user.parquet"))
    saved = json.loads((stage / "metrics.json").read_text())
    assert {k: {m: again[int(k)][m] for m in v} for k, v in saved.items()} == saved
    out = run_dir.parent / "compare.json"
    assert main(["compare", str(run_dir), "--resamples", "200", "--json", str(out), "-q"]) == 0
    assert len(json.loads(out.read_text())["methods"]) == 2


def test_search_pareto_and_failed_trial(ray_local, config_path, tmp_path):
    # an unknown strategy is refused when the space loads; a failing trial comes from an injected
    # fault: a plugin strategy that raises while sampling
    plugin = tmp_path / "faulty.py"
    plugin.write_text("from raydpo.sampling import register_strategy\n"
                      "@register_strategy('exploding', replace=True)\n"
                      "def exploding(ctx):\n"
                      "    \"\"\"Raises (fault injection).\"\"\"\n"
                      "    raise RuntimeError('injected fault in exploding')\n")
    base = tmp_path / "base.yaml"
    base.write_text(config_path.read_text().replace(
        "sampling: {strategy: clusterout_low}", f"sampling: {{strategy: clusterout_low, plugins: [{plugin}]}}"))
    space = tmp_path / "space.yaml"
    space.write_text(f"""# test search
base: {base}
sampler: grid
num_samples: 3
max_failures: 0
resources_per_trial: {{cpu: 0.5}}
space:
  sampling.strategy: {{choice: [clusterout_low, random, exploding]}}
""")
    bad = tmp_path / "bad.yaml"
    bad.write_text(space.read_text().replace("exploding]", "no_such_strategy]"))
    assert main(["tune", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "search"
    from raydpo.sampling import unregister_strategy

    try:
        assert main(["tune", str(space), "--out", str(out)]) == 0
    finally:  # the plugin registered its strategy in this process too: leave the registry as it was
        unregister_strategy("exploding")
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(trials["sampling.strategy"]) == ["clusterout_low", "exploding", "random"]
    failed = trials[trials["status"] == "ERROR"]
    assert failed["sampling.strategy"].tolist() == ["exploding"]
    assert "injected fault in exploding" in failed["error"].iloc[0]
    ok = trials[trials["status"] == "OK"]
    assert ok["NDCG@10"].notna().all() and ok["ORRatio@10"].notna().all()
    front = pd.read_csv(out / "pareto.csv")
    assert 1 <= len(front) <= 2 and set(front["sampling.strategy"]) <= {"clusterout_low", "random"}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    # the Optuna study is persisted where optuna-dashboard can open it
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name="space", storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
    assert len(study.trials) == 3
    # the best trials are re-evaluated on the test split with one command
    assert main(["tune-eval", str(out), "--top", "1"]) == 0
    best = pd.read_csv(out / "best_test.csv")
    assert len(best) == 1 and best["NDCG@10"].notna().all()


def test_search_resumes_after_the_driver_is_killed(ray_local, config_path, tmp_path, capsys):
    """Kill ``raydpo tune`` (driver and its local Ray) once a trial has finished; ``--resume``
    completes the search without redoing finished stage work, and nothing looked finished before."""
    import os
    import signal
    import subprocess
    import sys
    import time

    space = tmp_path / "space.yaml"
    space.write_text(f"""# resume test
base: {config_path}
sampler: grid
num_samples: 3
max_concurrent: 1
resources_per_trial: {{cpu: 0.5}}
space:
  alignment.beta: {{choice: [0.05, 0.2, 0.4]}}
""")
    out = tmp_path / "search"
    run_dir = Path(load_config(config_path).run_dir)

    def finished_align() -> dict:
        return {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "align").glob("*/_SUCCESS")}

    before = finished_align()
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from raydpo.cli import main; sys.exit(main(sys.argv[1:]))",
         "tune", str(space), "--out", str(out)],
        env={**os.environ, "RAY_ADDRESS": "local"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 900
        while time.time() < deadline and proc.poll() is None:
            if len(set(finished_align()) - set(before)) >= 1:
                break
            time.sleep(1)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        assert len(set(finished_align()) - set(before)) >= 1, "no trial finished in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "trials.csv").exists()  # an interrupted search leaves no result that looks complete
    done_at_kill = {k: v for k, v in finished_align().items() if k not in before}

    capsys.readouterr()
    assert main(["tune", str(space), "--out", str(out), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out  # Tuner.restore, not a fresh experiment
    trials = pd.read_csv(out / "trials.csv")
    assert sorted(trials["alignment.beta"]) == [0.05, 0.2, 0.4]
    assert (trials["status"] == "OK").all() and trials["NDCG@10"].notna().all()
    after = finished_align()
    assert len(set(after) - set(before)) == 3
    assert all(after[k] == v for k, v in done_at_kill.items())  # finished alignments were not redone
