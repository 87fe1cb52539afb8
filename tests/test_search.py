"""The search itself: every sampler the shipped search spaces use (and random), every
distribution type, the trial-retry path, seed repeats with intervals, significance against
baselines, and the report's intervals and --extra rows. Real Optuna studies, real Ray Tune,
the tiny model; the slow tests share one run folder (one SFT model, one candidate set)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from raydpo.cli import main
from raydpo.config import ConfigError, load_config
from raydpo.tuning.search import (DISTRIBUTIONS, SearchSpace, _sampler, load_search_space, optuna_space,
                                  resolve_baselines)
from raydpo.tuning.uncertainty import SEED_FIELDS, seed_overrides, summarize_seeds, t_interval

ROOT = Path(__file__).resolve().parents[1]
# the samplers and distributions the slow tests below run in a real search (grid: test_pipeline)
SAMPLERS_RUN = {"tpe", "nsga2", "random", "grid"}
DISTRIBUTIONS_RUN = {"choice", "uniform", "loguniform", "int"}

CONFIG = """
name: searchtest
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

# every distribution type; alignment-only fields, so SFT and candidates are shared by every trial
SPACE = """
  alignment.beta: {loguniform: [0.05, 0.5]}
  alignment.learning_rate: {uniform: [0.0002, 0.001]}
  alignment.warmup_steps: {int: [0, 3]}
"""


# --- fast: the pure parts ------------------------------------------------------------------------


def test_every_shipped_sampler_and_distribution_is_run_by_a_test():
    spaces = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert spaces
    samplers, kinds = set(), set()
    for p in spaces:
        space, _ = load_search_space(p)
        samplers.add(space.sampler)
        kinds.update(next(iter(d)) for d in space.space.values())
    assert samplers <= SAMPLERS_RUN, f"a shipped space uses a sampler no test runs: {samplers - SAMPLERS_RUN}"
    assert set(DISTRIBUTIONS) == DISTRIBUTIONS_RUN


@pytest.mark.parametrize("name,cls", [("tpe", optuna.samplers.TPESampler), ("nsga2", optuna.samplers.NSGAIISampler),
                                      ("random", optuna.samplers.RandomSampler)])
def test_sampler_classes(name, cls):
    space = SearchSpace(sampler=name, space={"alignment.beta": {"uniform": [0.1, 0.2]}})
    assert type(_sampler(space)) is cls


def test_seed_overrides_and_t_interval():
    from scipy import stats

    cfg = load_config(None, {"sampling.seed": 5, "alignment.seed": 7})
    assert seed_overrides(cfg, 0) == {}
    assert seed_overrides(cfg, 2) == {"sampling.seed": 7, "alignment.seed": 9}
    assert set(seed_overrides(cfg, 1)) == set(SEED_FIELDS)
    v = [0.1, 0.14, 0.12, 0.19]
    mean, lo, hi, sd = t_interval(v, 0.9)
    ref = stats.t.interval(0.9, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert mean == pytest.approx(np.mean(v)) and (lo, hi) == pytest.approx(ref) and sd == pytest.approx(np.std(v, ddof=1))
    assert np.isnan(t_interval([0.3])[1])
    s = summarize_seeds([{"NDCG@10": 0.1}, {"NDCG@10": 0.3}])
    assert s["NDCG@10"] == pytest.approx(0.2) and s["NDCG@10_seed_ci_low"] < 0.1 < 0.3 < s["NDCG@10_seed_ci_high"]
    assert "NDCG@10_seed_ci_low" not in summarize_seeds([{"NDCG@10": 0.1}])


def test_baselines_resolve_to_searched_values(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(CONFIG + f"run_dir: {tmp_path / 'runs'}\n")
    p = tmp_path / "space.yaml"
    p.write_text(f"base: {base}\nbaselines: [selfplay]\nspace:\n  sampling.strategy: {{choice: [selfplay, random]}}\n"
                 "  alignment.epochs: {choice: [1, 2]}\n")
    space, _ = load_search_space(p)
    assert resolve_baselines(space) == {"selfplay": {"sampling.strategy": "selfplay"}}
    p.write_text(p.read_text().replace("[selfplay]", "[clusterin_high]"))
    with pytest.raises(ConfigError, match=r"baselines: 'clusterin_high': no searched choice offers it"):
        load_search_space(p)
    p.write_text(p.read_text().replace("baselines: [clusterin_high]", "baselines: {sp: {alignment.beta: 0.1}}"))
    with pytest.raises(ConfigError, match="baselines.sp.alignment.beta: not a searched parameter"):
        load_search_space(p)
    assert main(["tune", str(p), "--out", str(tmp_path / "out")]) == 2  # one line, before any work
    assert not (tmp_path / "out").exists()


def test_comparisons_pick_front_pairs_and_baselines():
    from raydpo.tuning.significance import comparisons, trial_labels

    ok = pd.DataFrame({"sampling.strategy": ["a", "selfplay", "c", "d"], "NDCG@10": [0.3, 0.2, 0.25, 0.1],
                       "ORRatio@10": [0.3, 0.1, 0.2, 0.4]})
    objectives = {"NDCG@10": "max", "ORRatio@10": "min"}
    front = ok.loc[[0, 2, 1]]  # sorted best NDCG first
    base = {"selfplay": {"sampling.strategy": "selfplay"}}
    pairs, notes = comparisons(ok, front, objectives, ["sampling.strategy"], base, "best")
    assert pairs == [("front pairs", 0, 2), ("front pairs", 0, 1), ("front pairs", 2, 1), ("baselines", 0, 1)]
    pairs, _ = comparisons(ok, front, objectives, ["sampling.strategy"], base, "all")
    assert [p[1:] for p in pairs if p[0] == "baselines"] == [(0, 1), (2, 1), (3, 1)]
    _, notes = comparisons(ok, front, objectives, ["sampling.strategy"], {"x": {"sampling.strategy": "zz"}}, "best")
    assert "no finished trial ran it" in notes[0]
    labels = trial_labels(pd.DataFrame({"a.beta": [0.1234, 0.1234], "a.epochs": [1, 1]}), ["a.beta", "a.epochs"])
    assert labels.tolist() == ["beta=0.123, epochs=1 #0", "beta=0.123, epochs=1 #1"]


def test_pareto_markdown_and_plot_show_intervals(tmp_path):
    from raydpo.tuning.pareto import plot_front
    from raydpo.tuning.search import pareto_markdown

    f = pd.DataFrame({"trial": ["a", "b"], "NDCG@10": [0.3, 0.2], "NDCG@10_ci_low": [0.25, 0.1],
                      "NDCG@10_ci_high": [0.35, 0.3], "ORRatio@10": [0.2, 0.1], "ORRatio@10_ci_low": [0.15, 0.05],
                      "ORRatio@10_ci_high": [0.3, 0.2], "seeds": [2, 2]})
    md = pareto_markdown(f, [], ["NDCG@10", "ORRatio@10"])
    assert "| a | 0.3000 [0.2500, 0.3500] | 0.2000 [0.1500, 0.3000] | 2 |" in md
    png = plot_front(f, {"NDCG@10": "max", "ORRatio@10": "min"}, tmp_path / "p.png")
    no_bars = plot_front(f[["trial", "NDCG@10", "ORRatio@10"]], {"NDCG@10": "max", "ORRatio@10": "min"},
                         tmp_path / "q.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.read_bytes() != no_bars.read_bytes()


# --- slow: real searches -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    p = d / "base.yaml"
    p.write_text(CONFIG + f"run_dir: {d / 'runs'}\n")
    return p


FLAKY = """from raydpo.sampling import get_strategy, register_strategy
import os
MARKER = {marker!r}

@register_strategy('flaky', replace=True)
def flaky(ctx):
    \"\"\"random, but raises the first time it is called (fault injection for the retry path).\"\"\"
    if not os.path.exists(MARKER):
        open(MARKER, 'w').write('failed once')
        raise RuntimeError('injected fault in flaky')
    return get_strategy('random').fn(ctx)
"""


def _journal_trials(out: Path, name: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal")))).trials


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random"])
def test_search_each_sampler(ray_local, base_config, tmp_path, sampler):
    """A real 2-trial search per sampler over uniform, loguniform and int distributions. The
    random one also runs every configuration with 2 seeds and its first trial fails once through
    an injected fault and succeeds when Tune retries it."""
    base, extra = base_config, ""
    marker = tmp_path / "fault-fired"
    if sampler == "random":
        plugin = tmp_path / "flaky.py"
        plugin.write_text(FLAKY.format(marker=str(marker)))
        base = tmp_path / "base.yaml"
        base.write_text(base_config.read_text().replace(
            "sampling: {strategy: clusterout_low}", f"sampling: {{strategy: flaky, plugins: [{plugin}]}}"))
        extra = "repeats: 2\n"
    space_file = tmp_path / f"{sampler}.yaml"
    space_file.write_text(f"name: s_{sampler}\nbase: {base}\nsampler: {sampler}\nseed: 3\nnum_samples: 2\n"
                          f"max_failures: 1\nresources_per_trial: {{cpu: 0.5}}\n{extra}space:{SPACE}")
    out = tmp_path / "out"
    assert main(["tune", str(space_file), "--out", str(out)]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "OK").all(), trials[["status", "error"]]
    # the study's trials are the sampler's own seeded suggestions, with their distribution types
    space, _ = load_search_space(space_file)
    fresh = optuna.create_study(directions=["maximize", "minimize"], sampler=_sampler(space))
    expected = [fresh.ask(fixed_distributions=optuna_space(space)).params for _ in range(2)]
    journal = sorted(_journal_trials(out, f"s_{sampler}"), key=lambda t: t.number)
    assert [t.params for t in journal] == expected
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in journal)
    d = journal[0].distributions
    assert d["alignment.beta"].log and not d["alignment.learning_rate"].log
    assert isinstance(d["alignment.warmup_steps"], optuna.distributions.IntDistribution)
    for t in journal:
        assert 0.05 <= t.params["alignment.beta"] <= 0.5 and isinstance(t.params["alignment.warmup_steps"], int)
        row = trials[np.isclose(trials["alignment.beta"], t.params["alignment.beta"])]
        assert len(row) == 1 and row["alignment.warmup_steps"].iloc[0] == t.params["alignment.warmup_steps"]
        # the objectives Optuna was told are the trial's means
        assert t.values == pytest.approx([row["NDCG@10"].iloc[0], row["ORRatio@10"].iloc[0]])
    front = pd.read_csv(out / "pareto.csv")
    assert 1 <= len(front) <= 2
    if sampler == "random":
        assert marker.read_text() == "failed once"  # the fault fired, and the retried trial finished
        assert (trials["seeds"] == 2).all()
        keys = [k.split() for k in trials["evaluate_keys"]]
        assert all(len(set(k)) == 2 for k in keys)
        run_dir = Path(load_config(base).run_dir)
        for seeds in keys:  # each seed of a configuration: its own sampling and alignment, one SFT and one
            chains = [json.loads((run_dir / "chains" / f"{k}.json").read_text()) for k in seeds]  # candidate set
            assert [c["sampling"]["seed"] for c in chains] == [0, 1] and [c["alignment"]["seed"] for c in chains] == [0, 1]
            for stage in ("data", "sft", "generate"):
                assert chains[0]["keys"][stage] == chains[1]["keys"][stage]
            for stage in ("sample", "align", "predict"):
                assert chains[0]["keys"][stage] != chains[1]["keys"][stage]
            metrics = [json.loads((run_dir / "evaluate" / k / "metrics.json").read_text())["10"]["NDCG"] for k in seeds]
            row = trials[trials["evaluate_keys"] == " ".join(seeds)].iloc[0]
            assert row["NDCG@10"] == pytest.approx(np.mean(metrics))  # the trial reports the mean over seeds
            assert row["NDCG@10_seed_ci_low"] <= row["NDCG@10"] <= row["NDCG@10_seed_ci_high"]
        for col in ("NDCG@10_seed_ci_low", "NDCG@10_seed_ci_high", "ORRatio@10_seed_ci_low", "ORRatio@10_seed_ci_high"):
            assert col in front.columns and trials[col].notna().all()
    for col in ("NDCG@10_ci_low", "NDCG@10_ci_high", "ORRatio@10_ci_low", "ORRatio@10_ci_high"):
        assert col in trials.columns and col in front.columns and trials[col].notna().all()
        assert (trials[col.rsplit("_ci", 1)[0]].between(trials[col.rsplit("_ci", 1)[0] + "_ci_low"] - 1e-12,
                                                        trials[col.rsplit("_ci", 1)[0] + "_ci_high"] + 1e-12)).all()


@pytest.mark.slow
def test_report_extra_rows_are_the_published_files_evaluated(tmp_path, capsys):
    """``raydpo report DIR --extra NAME=FILE``: the published prediction files become rows with the
    evaluator's values (the published eval_result.json numbers) and bootstrap intervals."""
    from conftest import GOODREADS, ORACLE, require_shared

    require_shared()
    search = tmp_path / "search"
    search.mkdir()
    # a finished search's table (one trial) to report on
    pd.DataFrame({"trial": ["t1"], "sampling.strategy": ["selfplay"], "NDCG@5": [0.01], "NDCG@10": [0.02],
                  "ORRatio@10": [0.1], "status": ["OK"]}).to_csv(search / "trials.csv", index=False)
    names = ["SPRec_Reproduction", "ClusterExposure_model__Div_10_1.0__clusterout_low"]
    extra = [x for n in names for x in ("--extra", f"{n[:12]}={ORACLE / n / 'raw_results_1000.json'}")]
    assert main(["report", str(search), "--data", str(GOODREADS), "--split", "test", *extra]) == 0
    table = pd.read_csv(search / "report.csv")
    assert table["method"].tolist() == ["selfplay", "SPRec_Reprod", "ClusterExpos"]
    for n in names:
        row = table[table["method"] == n[:12]].iloc[0]
        for ref in json.loads((ORACLE / n / "eval_result.json").read_text()):
            k = ref["topK"]
            for m in ("NDCG", "HR", "DivRatio", "ORRatio", "MGU", "DGU"):
                assert row[f"{m}@{k}"] == pytest.approx(ref[m], abs=1e-9)
                assert row[f"{m}@{k}_ci_low"] <= ref[m] + 1e-12 and ref[m] - 1e-12 <= row[f"{m}@{k}_ci_high"]
            assert row[f"NDCG@{k}_ci_low"] < row[f"NDCG@{k}_ci_high"]
    md = (search / "report.md").read_text()
    from raydpo.evaluation.stats import format_interval

    r = table.iloc[1]
    assert format_interval(r["NDCG@10"], r["NDCG@10_ci_low"], r["NDCG@10_ci_high"]) in md and "±" in md
    assert "| selfplay | 0.0100 |" in md  # no interval known for it: the value alone
    # bracket style; a missing file or a malformed --extra is one line, exit 2
    assert main(["report", str(search), "--data", str(GOODREADS), "--split", "test", "--ci", "bracket", *extra[:2],
                 "--out", str(tmp_path / "r.md")]) == 0
    assert f"[{r['NDCG@10_ci_low']:.4f}, {r['NDCG@10_ci_high']:.4f}]" in (tmp_path / "r.md").read_text()
    capsys.readouterr()
    assert main(["report", str(search), "--extra", "nofile"]) == 2
    assert main(["report", str(search), "--extra", f"x={tmp_path / 'missing.json'}"]) == 2
    assert capsys.readouterr().err.count("raydpo: error:") == 2


@pytest.mark.slow
@pytest.mark.ray
def test_search_significance_against_baseline_and_report(ray_local, base_config, tmp_path):
    """A grid over two strategies with ``baselines: [random]``: significance.md/.csv hold the paired
    tests (the same numbers as the stats API on the trials' per-user files, Holm-corrected), and
    ``raydpo report`` shows intervals, the significance section and an --extra row equal to
    ``raydpo evaluate`` of that file."""
    from raydpo.data import load_dataset
    from raydpo.demo import popularity_predictions, write_predictions
    from raydpo.evaluation.stats import PerUser, holm, paired_comparison
    from raydpo.tuning.uncertainty import per_user_path

    space_file = tmp_path / "sig.yaml"
    space_file.write_text(f"name: sig\nbase: {base_config}\nsampler: grid\nnum_samples: 2\nn_resamples: 500\n"
                          "resources_per_trial: {cpu: 0.5}\nbaselines: [random]\ncompare_to_baselines: all\n"
                          "space:\n  sampling.strategy: {choice: [clusterout_low, random]}\n")
    out = tmp_path / "out"
    assert main(["tune", str(space_file), "--out", str(out)]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert (trials["status"] == "OK").all()
    sig = pd.read_csv(out / "significance.csv")
    base = sig[sig["family"] == "baselines"]
    assert base[["trial", "versus"]].drop_duplicates().values.tolist() == [["clusterout_low", "random"]]
    assert sorted(base["metric"]) == ["NDCG@10", "ORRatio@10"]
    run_dir = Path(load_config(base_config).run_dir)
    pu = {s: PerUser.read(per_user_path(run_dir, trials.loc[trials["sampling.strategy"] == s, "evaluate_keys"].iloc[0]))
          for s in ("clusterout_low", "random")}
    ref = paired_comparison(pu["clusterout_low"], pu["random"], n_resamples=500, seed=0, metrics=["NDCG", "ORRatio"])
    for _, r in base.iterrows():
        name, k = r["metric"].split("@")
        assert r["diff"] == pytest.approx(ref[int(k)][name]["diff"]) and r["p_value"] == pytest.approx(ref[int(k)][name]["p_value"])
    assert base["p_holm"].tolist() == pytest.approx(list(holm(base["p_value"].to_numpy())))
    assert (base["significant"] == (base["p_holm"] < 0.05)).all()
    md = (out / "significance.md").read_text()
    assert "**clusterout_low** vs **random**" in md and "Holm" in md
    # the report: intervals, the significance section, and an --extra row = raydpo evaluate of the file
    data_dir = next(run_dir.glob("data/*/dataset"))
    ds = load_dataset(data_dir)
    pred = tmp_path / "popularity.json"
    write_predictions(ds, popularity_predictions(ds, "valid"), pred, split="valid")
    assert main(["evaluate", str(pred), "--data", str(data_dir), "--split", "valid", "--json",
                 str(tmp_path / "m.json"), "-q"]) == 0
    direct = json.loads((tmp_path / "m.json").read_text())
    assert main(["report", str(out), "--extra", f"popularity={pred}"]) == 0  # the search's dataset and split
    table = pd.read_csv(out / "report.csv")
    row = table[table["method"] == "popularity"].iloc[0]
    for k in ("5", "10"):
        for m in ("NDCG", "HR", "DivRatio", "ORRatio", "MGU", "DGU"):
            assert row[f"{m}@{k}"] == pytest.approx(direct[k][m], abs=1e-12)
    assert table["NDCG@10_ci_low"].notna().all()
    report_md = (out / "report.md").read_text()
    assert "## Significance" in report_md and "±" in report_md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # a run folder's report: intervals from the evaluate stages' per-user results
    assert main(["report", str(run_dir)]) == 0
    run_table = pd.read_csv(run_dir / "report.csv")
    assert run_table["NDCG@10_ci_low"].notna().all() and (run_table["NDCG@10_ci_low"] <= run_table["NDCG@10"]).all()


def _per_user(seed: int, n: int = 60, hit_rate: float = 0.3):
    """Synthetic per-user results of one seed: the same users and targets, random top-10 lists
    that contain the target (at a random rank) with probability ``hit_rate``."""
    from raydpo.evaluation.stats import PerUser

    rng = np.random.default_rng(seed)
    targets = np.arange(n) % 40
    topk = np.array([[x for x in np.argsort(rng.random(40)) if x != t][:10] for t in targets])  # no hit
    hit = rng.random(n) < hit_rate
    topk[hit, rng.integers(0, 10, n)[hit]] = targets[hit]  # planted hits
    ranks = np.where((topk == targets[:, None]).any(1), (topk == targets[:, None]).argmax(1), -1)
    return PerUser(np.arange(n), targets, topk, ranks, np.zeros(n, bool), [np.array([1, 2])] * n, np.eye(40)[:, :4],
                   (5, 10))


def test_seed_pooled_intervals_and_paired_differences():
    """Several seeds: the interval brackets the seed-averaged metric; identical sides differ by
    exactly 0 with p = 1; a planted large difference is significant; one seed matches the stats API."""
    from raydpo.evaluation.stats import metrics_from_per_user, paired_comparison
    from raydpo.tuning.uncertainty import paired_difference, user_intervals

    a = [_per_user(1), _per_user(2)]
    b = [_per_user(3, hit_rate=0.0), _per_user(4, hit_rate=0.0)]
    a_big = [_per_user(1, n=300), _per_user(2, n=300)]
    b_big = [_per_user(3, n=300, hit_rate=0.0), _per_user(4, n=300, hit_rate=0.0)]
    iv = user_intervals(a, n_resamples=500)
    mean = np.mean([metrics_from_per_user(p)[10]["NDCG"] for p in a])
    assert iv["NDCG@10"][0] < mean < iv["NDCG@10"][1]
    same = paired_difference(a, a, ["NDCG@10", "ORRatio@10"], n_resamples=500)
    assert same["NDCG@10"]["diff"] == 0 and same["NDCG@10"]["p_value"] == 1.0
    planted = paired_difference(a_big, b_big, ["NDCG@10", "HR@10"], n_resamples=500)
    assert planted["HR@10"]["diff"] > 0.2 and planted["HR@10"]["p_value"] < 0.01
    assert planted["HR@10"]["diff_ci_low"] > 0
    one = paired_difference(a[:1], b[:1], ["NDCG@10"], n_resamples=500)
    ref = paired_comparison(a[0], b[0], n_resamples=500, seed=0, metrics=["NDCG"])[10]["NDCG"]
    assert one["NDCG@10"] == pytest.approx(ref)
