"""Per-user results, bootstrap intervals, paired tests and ``raydpo compare``.

Known answers: coverage of the intervals on synthetic users with a known true value; identical
inputs (diff 0, p = 1); a planted difference (significant); Holm by hand; scipy.stats on small
inputs (the same resamples: the same intervals); the oracle's published metrics recomputed
exactly from the per-user files.
"""

import json

import numpy as np
import pytest
import scipy.stats

from conftest import GOODREADS, ORACLE, require_shared
from raydpo.cli import main
from raydpo.errors import DataError
from raydpo.evaluation import METRIC_NAMES, Predictions, evaluate
from raydpo.evaluation.compare import check_json_shape
from raydpo.evaluation.stats import (PerUser, bootstrap_intervals, compare, holm, metrics_from_per_user,
                                     paired_comparison)

ORACLE_FOLDERS = (sorted(p.name for p in ORACLE.glob("*") if (p / "eval_result.json").exists())
                  if ORACLE.exists() else [])


def synthetic_table(n=200, n_items=40, n_genres=4, k_max=10, hit_rate=0.2, seed=0, popular=None,
                    invalid_rate=0.02) -> PerUser:
    """Random per-user results: each row recommends ``k_max`` distinct items (drawn with the
    popularity ``popular`` when given), hits its target with probability ``hit_rate`` at a uniform
    rank; a few rows have no catalog target."""
    rng = np.random.default_rng(seed)
    p = popular if popular is not None else np.full(n_items, 1.0 / n_items)
    topk = np.stack([rng.choice(n_items, k_max, replace=False, p=p) for _ in range(n)])
    hit = rng.random(n) < hit_rate
    ranks = np.where(hit, rng.integers(0, k_max, n), -1)
    targets = np.where(hit, topk[np.arange(n), np.maximum(ranks, 0)], rng.integers(0, n_items, n))
    miss = ~hit
    # a miss must not be in the list by accident: move such targets out of it
    for i in np.flatnonzero(miss):
        while targets[i] in topk[i]:
            targets[i] = rng.integers(0, n_items)
    targets[rng.random(n) < invalid_rate] = -1
    ranks[targets < 0] = -1
    w = np.zeros((n_items, n_genres))
    w[np.arange(n_items), rng.integers(0, n_genres, n_items)] = 1.0
    history = [rng.integers(0, n_items, rng.integers(1, 6)) for _ in range(n)]
    return PerUser(np.arange(n), targets, topk, ranks, rng.random(n) < 0.3, history, w, (5, 10))


def with_more_hits(table: PerUser, n_more: int) -> PerUser:
    """A copy of ``table`` in which ``n_more`` users that missed now find their target first."""
    import copy

    out = copy.deepcopy(table)
    rows = np.flatnonzero((out.ranks < 0) & (out.targets >= 0))[:n_more]
    assert len(rows) == n_more
    out.topk[rows, 0] = out.targets[rows]
    out.ranks[rows] = 0
    return out


# --- per-user results ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle_tables(goodreads, tmp_path_factory):
    """Each oracle file evaluated once with per-user results, written and read back."""
    out = {}
    d = tmp_path_factory.mktemp("per_user")
    for folder in ORACLE_FOLDERS:
        preds = Predictions.read(ORACLE / folder / "raw_results_1000.json")
        metrics, table = evaluate(preds, goodreads, (5, 10), per_user=True)
        table.write(d / f"{folder}.parquet")
        out[folder] = (metrics, PerUser.read(d / f"{folder}.parquet"), d / f"{folder}.parquet")
    return out


@pytest.mark.slow  # evaluates the three oracle files (~1 min on 2 busy cores)
@pytest.mark.parametrize("folder", ORACLE_FOLDERS or ["<no oracle>"])
def test_per_user_file_reproduces_the_published_metrics_exactly(folder, oracle_tables):
    require_shared()
    metrics, table, _ = oracle_tables[folder]
    again = metrics_from_per_user(table)
    published = json.loads((ORACLE / folder / "eval_result.json").read_text())
    for entry in published:
        k = entry["topK"]
        for name in METRIC_NAMES:
            assert again[k][name] == metrics[k][name], (k, name)  # bit for bit, through the Parquet file
            assert abs(again[k][name] - entry[name]) <= 1e-9, (folder, k, name)
    frame = table.frame()
    assert len(frame) == 1000 and {"row", "target", "rank", "topk", "NDCG@5", "HR@10", "rec_genre_mass@10",
                                   "hist_genre_mass"} <= set(frame.columns)
    assert frame["HR@10"].sum() / 1000 == pytest.approx(metrics[10]["HR"])


@pytest.mark.slow
def test_metrics_on_a_subset_equal_the_evaluation_of_that_subset(goodreads, oracle_tables):
    """Every metric (population ones included) on the first 300 users equals evaluating only them."""
    require_shared()
    from raydpo.data import Dataset, Samples

    folder = ORACLE_FOLDERS[0]
    _, table, _ = oracle_tables[folder]
    preds = Predictions.read(ORACLE / folder / "raw_results_1000.json")
    sub = Predictions(preds.prompts[:300], preds.predictions[:300], preds.ground_truths[:300], preds.path)
    f = goodreads.samples.frame
    keep = (f["split"] != "test") | (f.groupby("split").cumcount() < 300)
    ds = Dataset(goodreads.catalog, Samples(f[keep].reset_index(drop=True)), goodreads.name, goodreads.instruction)
    direct = evaluate(sub, ds, (5, 10))
    mine = metrics_from_per_user(table, users=np.arange(300))
    for k in (5, 10):
        for name in METRIC_NAMES:
            assert mine[k][name] == pytest.approx(direct[k][name], abs=1e-12), (k, name)
    mask = np.zeros(len(table), dtype=bool)
    mask[:300] = True
    assert metrics_from_per_user(table, users=mask)[10]["ORRatio"] == mine[10]["ORRatio"]


def test_per_user_write_read_round_trip_and_bad_files(tmp_path):
    t = synthetic_table(seed=3)
    t.write(tmp_path / "a.parquet")
    back = PerUser.read(tmp_path / "a.parquet")
    for name in ("rows", "targets", "topk", "ranks", "not_in", "genre_weights"):
        assert np.array_equal(getattr(back, name), getattr(t, name)), name
    assert all(np.array_equal(a, b) for a, b in zip(back.history, t.history))
    assert metrics_from_per_user(back) == metrics_from_per_user(t)
    with pytest.raises(DataError, match="not found"):
        PerUser.read(tmp_path / "missing.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        PerUser.read(tmp_path / "bad.parquet")
    import pandas as pd

    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(DataError, match="not a raydpo per-user results file"):
        PerUser.read(tmp_path / "other.parquet")


# --- intervals -----------------------------------------------------------------------------------


def test_intervals_cover_the_true_value_at_the_nominal_rate():
    """200 synthetic test sets of 300 users with a known HR@10, NDCG@10 and ORRatio@1: the 95%
    intervals cover the truth in 95% of them (binomial tolerance for 200 repetitions)."""
    p_hit, k = 0.15, 10
    true_ndcg = p_hit * np.mean(1.0 / np.log2(np.arange(k) + 2.0))  # a hit's rank is uniform on 0..k-1
    popular = np.r_[0.25, 0.15, 0.1, np.full(37, 0.5 / 37)]          # ORRatio@1 -> sum of the 3 largest
    covered = {"HR": 0, "NDCG": 0, "ORRatio": 0}
    reps = 200
    for rep in range(reps):
        # every row a catalog target (the known answers hold exactly); the first item of each list
        # drawn with the popularity above, independently per user
        t = synthetic_table(n=300, hit_rate=p_hit, seed=1000 + rep, invalid_rate=0.0)
        t.topk[:, 0] = np.random.default_rng(rep).choice(len(popular), 300, p=popular)
        ci = bootstrap_intervals(t, ks=(1, k), n_resamples=500, seed=rep, metrics=["HR", "NDCG", "ORRatio"])
        for name, truth, kk in (("HR", p_hit, k), ("NDCG", true_ndcg, k), ("ORRatio", 0.5, 1)):
            covered[name] += ci[kk][name]["ci_low"] <= truth <= ci[kk][name]["ci_high"]
    for name, c in covered.items():
        assert 0.90 <= c / reps <= 0.99, (name, c / reps)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_mean_metric_intervals_equal_scipy_bootstrap(method):
    """The same resamples (seeded) as scipy.stats.bootstrap: the same interval for the mean metrics."""
    t = synthetic_table(n=400, seed=5)
    ours = bootstrap_intervals(t, n_resamples=999, seed=7, method=method, metrics=["NDCG", "HR", "Predict_NotIn_Ratio"])
    for k in (5, 10):
        ndcg, hr = t.contributions(k)
        for name, x in (("NDCG", ndcg), ("HR", hr), ("Predict_NotIn_Ratio", t.not_in.astype(float))):
            ref = scipy.stats.bootstrap((x,), np.mean, n_resamples=999, method=method, vectorized=True,
                                        rng=np.random.default_rng(7))
            assert ours[k][name]["ci_low"] == pytest.approx(ref.confidence_interval.low, abs=1e-12), (k, name)
            assert ours[k][name]["ci_high"] == pytest.approx(ref.confidence_interval.high, abs=1e-12), (k, name)
            assert ours[k][name]["value"] == pytest.approx(x.mean(), abs=1e-15)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_population_metric_intervals_equal_scipy_on_the_recomputed_metric(method):
    """The vectorised population metrics (count and genre-mass matrices) against scipy resampling
    user indices and recomputing each metric from scratch (metrics_from_per_user)."""
    t = synthetic_table(n=40, n_items=25, seed=11)
    ours = bootstrap_intervals(t, ks=(5,), n_resamples=199, seed=3, method=method,
                               metrics=["DGU", "MGU", "ORRatio", "diversity"])
    for name in ("DGU", "MGU", "ORRatio", "diversity"):
        ref = scipy.stats.bootstrap((np.arange(len(t)),),
                                    lambda idx: float(metrics_from_per_user(t, (5,), users=idx)[5][name]),
                                    n_resamples=199, method="percentile" if name == "diversity" else method,
                                    vectorized=False, rng=np.random.default_rng(3))
        lo, hi = ref.confidence_interval
        if name == "diversity":  # distinct counts: the distribution is centred on the point estimate
            shift = metrics_from_per_user(t, (5,))[5][name] - ref.bootstrap_distribution.mean()
            lo, hi = lo + shift, hi + shift
        assert ours[5][name]["ci_low"] == pytest.approx(lo, rel=1e-9, abs=1e-12), name
        assert ours[5][name]["ci_high"] == pytest.approx(hi, rel=1e-9, abs=1e-12), name


def test_intervals_are_seeded_and_checked():
    t = synthetic_table(seed=2)
    a = bootstrap_intervals(t, n_resamples=300, seed=4)
    assert a == bootstrap_intervals(t, n_resamples=300, seed=4)
    assert a != bootstrap_intervals(t, n_resamples=300, seed=5)
    narrow = bootstrap_intervals(t, n_resamples=300, seed=4, confidence=0.5)
    assert narrow[10]["HR"]["ci_high"] - narrow[10]["HR"]["ci_low"] < a[10]["HR"]["ci_high"] - a[10]["HR"]["ci_low"]
    with pytest.raises(DataError, match="confidence"):
        bootstrap_intervals(t, confidence=1.5)
    with pytest.raises(DataError, match="exceeds"):
        bootstrap_intervals(t, ks=(20,))
    with pytest.raises(DataError, match="unknown metric"):
        bootstrap_intervals(t, metrics=["nDCG"])


# --- paired tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("test", ["bootstrap", "permutation"])
def test_identical_inputs_give_zero_difference_and_p_one(test):
    t = synthetic_table(seed=8)
    res = paired_comparison(t, synthetic_table(seed=8), n_resamples=500, method=test)
    for k in (5, 10):
        for name in METRIC_NAMES:
            e = res[k][name]
            assert e["diff"] == 0.0 and e["diff_ci_low"] == 0.0 and e["diff_ci_high"] == 0.0, (k, name)
            assert e["p_value"] == 1.0, (k, name, e["p_value"])


@pytest.mark.parametrize("test", ["bootstrap", "permutation"])
def test_a_planted_difference_is_significant(test):
    base = synthetic_table(n=500, hit_rate=0.05, seed=9)
    better = synthetic_table(n=500, hit_rate=0.05, seed=9)
    # plant: 60 more users find their target first in the list
    rows = np.flatnonzero((better.ranks < 0) & (better.targets >= 0))[:60]
    better.topk[rows, 0] = better.targets[rows]
    better.ranks[rows] = 0
    res = paired_comparison(better, base, n_resamples=2000, method=test, metrics=["HR", "NDCG"])
    for k in (5, 10):
        assert res[k]["HR"]["diff"] == pytest.approx(60 / 500)
        assert res[k]["HR"]["diff_ci_low"] > 0
        assert res[k]["HR"]["p_value"] < 0.001 and res[k]["NDCG"]["p_value"] < 0.001
    out = compare({"base": base, "better": better}, n_resamples=2000, test=test, metrics=["HR", "NDCG"])
    assert out["methods"]["better"]["10"]["HR"]["significant"] is True
    assert out["methods"]["better"]["10"]["HR"]["p_holm"] <= 4 * out["methods"]["better"]["10"]["HR"]["p_value"]


def test_paired_permutation_p_value_agrees_with_scipy():
    a = synthetic_table(n=60, hit_rate=0.3, seed=21)
    b = synthetic_table(n=60, hit_rate=0.3, seed=21)
    rows = np.flatnonzero((b.ranks >= 0))[:6]  # b loses 6 hits: another item in the target's place
    for r in rows:
        b.topk[r, b.ranks[r]] = next(i for i in range(40) if i not in b.topk[r] and i != b.targets[r])
    b.ranks[rows] = -1
    ours = paired_comparison(a, b, ks=(10,), n_resamples=20000, method="permutation", metrics=["HR", "NDCG"])
    for name in ("HR", "NDCG"):
        x = a.contributions(10)[0 if name == "NDCG" else 1]
        y = b.contributions(10)[0 if name == "NDCG" else 1]
        ref = scipy.stats.permutation_test((x, y), lambda u, v, axis: u.mean(axis) - v.mean(axis),
                                           permutation_type="samples", vectorized=True, n_resamples=20000,
                                           rng=np.random.default_rng(1))
        assert ours[10][name]["diff"] == pytest.approx(ref.statistic)
        assert ours[10][name]["p_value"] == pytest.approx(ref.pvalue, abs=0.012), name


def test_paired_bootstrap_difference_interval_equals_scipy_paired():
    a, b = synthetic_table(n=70, seed=31), synthetic_table(n=70, seed=31)
    b.ranks = np.where(b.ranks >= 0, np.minimum(b.ranks + 2, 9), -1)  # hits pushed down the list
    ours = paired_comparison(a, b, ks=(10,), n_resamples=999, seed=2, metrics=["NDCG"])
    x, y = a.contributions(10)[0], b.contributions(10)[0]
    ref = scipy.stats.bootstrap((x, y), lambda u, v, axis: u.mean(axis) - v.mean(axis), paired=True,
                                vectorized=True, n_resamples=999, method="percentile", rng=np.random.default_rng(2))
    assert ours[10]["NDCG"]["diff_ci_low"] == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert ours[10]["NDCG"]["diff_ci_high"] == pytest.approx(ref.confidence_interval.high, abs=1e-12)


def test_holm_matches_hand_computed_values():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # capped at 1
    out = holm([0.02, float("nan"), 0.01])
    assert np.isnan(out[1]) and out[[0, 2]].tolist() == pytest.approx([0.02, 0.02])


def test_unpaired_inputs_are_refused():
    a = synthetic_table(n=100, seed=1)
    with pytest.raises(DataError, match="has 90 rows but A has 100"):
        paired_comparison(a, synthetic_table(n=90, seed=1))
    other = synthetic_table(n=100, seed=1)
    other.targets[7] = (other.targets[7] + 1) % 40
    with pytest.raises(DataError, match="row 7 of B has target"):
        paired_comparison(a, other)


# --- raydpo compare ------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_cli_on_the_published_prediction_files(oracle_tables, tmp_path, capsys):
    """The issue's done-when: intervals and paired tests on the oracle's published files, through
    the CLI (a predictions file, a published result folder, a per-user file), with --json."""
    require_shared()
    sprec, ce, sdpo = "SPRec_Reproduction", "ClusterExposure_model__Div_10_1.0__clusterout_low", "S-DPO__Div_10_1.0"
    out = tmp_path / "cmp.json"
    rc = main(["compare", f"SPRec={ORACLE / sprec / 'raw_results_1000.json'}", f"CE={ORACLE / ce}",
               f"SDPO={oracle_tables[sdpo][2]}", "--data", str(GOODREADS), "--resamples", "2000", "--json", str(out),
               "-q"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| NDCG | CE | 0.0211 [" in text and "diff vs SPRec" in text and " *" in text
    result = json.loads(out.read_text())
    check_json_shape(result)
    assert result["baseline"] == "SPRec" and list(result["methods"]) == ["SPRec", "CE", "SDPO"]
    for name, folder in (("SPRec", sprec), ("CE", ce), ("SDPO", sdpo)):
        published = {e["topK"]: e for e in json.loads((ORACLE / folder / "eval_result.json").read_text())}
        for k in ("5", "10"):
            for m in METRIC_NAMES:
                e = result["methods"][name][k][m]
                assert abs(e["value"] - published[int(k)][m]) <= 1e-9
                assert set(e) >= {"value", "ci_low", "ci_high"}
                if name != "SPRec":
                    assert e["diff"] == pytest.approx(e["value"] - result["methods"]["SPRec"][k][m]["value"])
                    assert 0 < e["p_value"] <= e["p_holm"] <= 1
    assert "diff" not in result["methods"]["SPRec"]["5"]["NDCG"]
    # S-DPO's Predict_NotIn_Ratio (0.915 vs 0.701 of 1000 users) cannot be chance
    assert result["methods"]["SDPO"]["10"]["Predict_NotIn_Ratio"]["significant"] is True


def test_compare_cli_on_per_user_files(tmp_path, capsys):
    """raydpo compare on per-user files: identical files (diff 0, p = 1), a planted difference
    (significant), CSV, --json shape and output safety, and one-line errors."""
    path, better = tmp_path / "base.parquet", tmp_path / "better.parquet"
    base = synthetic_table(n=400, hit_rate=0.05, seed=4)
    base.write(path)
    rows = np.flatnonzero((base.ranks < 0) & (base.targets >= 0))[:50]
    base.topk[rows, 0] = base.targets[rows]
    base.ranks[rows] = 0
    base.write(better)
    assert main(["compare", f"base={path}", f"better={better}", "--resamples", "1000", "--json",
                 str(tmp_path / "planted.json")]) == 0
    text = capsys.readouterr().out
    assert "| HR | better |" in text and "diff vs base" in text
    planted = json.loads((tmp_path / "planted.json").read_text())
    check_json_shape(planted)
    assert planted["methods"]["better"]["10"]["HR"]["significant"] is True
    assert planted["methods"]["better"]["10"]["HR"]["diff"] == pytest.approx(50 / 400)

    assert main(["compare", f"A={path}", f"B={path}", "--resamples", "300", "--format", "csv",
                 "--json", str(tmp_path / "same.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("method,k,metric,value,ci_low,ci_high")
    same = json.loads((tmp_path / "same.json").read_text())
    for k, by_m in same["methods"]["B"].items():
        for m, e in by_m.items():
            assert e["diff"] == 0.0 and e["p_value"] == 1.0 and e["p_holm"] == 1.0, (k, m)
    # the JSON is not replaced without --overwrite (and only because raydpo wrote it)
    assert main(["compare", f"A={path}", f"B={path}", "--resamples", "300", "--json", str(tmp_path / "same.json")]) == 2
    assert "--overwrite" in capsys.readouterr().err

    # bad input: one line each
    small = synthetic_table(n=50)
    small.write(tmp_path / "small.parquet")
    cases = [
        (["compare", str(path), str(tmp_path / "nope.json"), "--data", str(GOODREADS)], "nope.json: not found"),
        (["compare", str(path), str(tmp_path / "small.parquet")], "has 50 rows but"),
        (["compare", str(path), str(tmp_path)], "not a run folder"),
        (["compare", f"A={path}", f"B={path}", "--baseline", "C"], "--baseline 'C' is none of"),
        (["compare", str(path), "--confidence", "95"], "between 0 and 1"),
    ]
    if GOODREADS.exists():
        cases.append((["compare", str(ORACLE / ORACLE_FOLDERS[0] / "raw_results_1000.json"), str(path)], "--data"))
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("raydpo: error:") and msg in err and len(err.splitlines()) == 1, (argv, err)


@pytest.mark.slow
def test_evaluate_cli_writes_per_user_results(tmp_path, capsys):
    require_shared()
    folder = ORACLE_FOLDERS[0]
    pred = ORACLE / folder / "raw_results_1000.json"
    out = tmp_path / "pu.parquet"
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--per-user", str(out), "-q"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    published = {e["topK"]: e for e in json.loads((ORACLE / folder / "eval_result.json").read_text())}
    assert metrics_from_per_user(PerUser.read(out))[10]["ORRatio"] == pytest.approx(published[10]["ORRatio"], abs=1e-12)
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--per-user", str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "mine.parquet").write_bytes(b"user data")
    assert main(["evaluate", str(pred), "--data", str(GOODREADS), "--per-user", str(tmp_path / "mine.parquet"),
                 "--overwrite", "-q"]) == 2
    assert "not written by raydpo" in capsys.readouterr().err
    assert (tmp_path / "mine.parquet").read_bytes() == b"user data"


def test_compare_finds_run_and_search_folders(tmp_path, capsys):
    """A run folder gives every evaluated configuration; a search folder every successful trial
    (through trials.csv's evaluate_keys and base_config.json's run folder), labelled by parameters."""
    run = tmp_path / "runs"
    base = synthetic_table(n=200, seed=7, hit_rate=0.05)
    better = with_more_hits(base, 40)
    for key, table in (("aaa", base), ("bbb", better)):
        stage = run / "evaluate" / key
        stage.mkdir(parents=True)
        (stage / "_SUCCESS").write_text(json.dumps({"stage": "evaluate", "key": key}))
        table.write(stage / "per_user.parquet")
    (run / "chains").mkdir()
    (run / "chains" / "aaa.json").write_text(json.dumps({"sampling": {"strategy": "selfplay"},
                                                         "alignment": {"beta": 0.1, "epochs": 1}}))
    out = tmp_path / "run.json"
    assert main(["compare", str(run), "--resamples", "500", "--metrics", "HR", "ORRatio", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["methods"]) == ["DPO selfplay (beta 0.1, 1 ep)", "bbb"]
    assert result["methods"]["bbb"]["10"]["HR"]["significant"] is True
    assert set(result["methods"]["bbb"]["10"]) == {"HR", "ORRatio"}
    capsys.readouterr()

    search = tmp_path / "search"
    search.mkdir()
    (search / "base_config.json").write_text(json.dumps({"run_dir": str(run)}))
    (search / "search.json").write_text(json.dumps({"space": {"space": {"sampling.strategy": {}}}}))
    (search / "trials.csv").write_text("trial,sampling.strategy,NDCG@10,evaluate_keys,status,error\n"
                                       "t1,selfplay,0.1,aaa,OK,\nt2,clusterout_low,0.2,bbb,OK,\nt3,random,,,ERROR,boom\n")
    assert main(["compare", str(search), "--baseline", "strategy=selfplay", "--resamples", "500", "--metrics", "HR",
                 "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].startswith("strategy=selfplay,5,HR,") and any(r.startswith("strategy=clusterout_low,10,HR,")
                                                                 for r in rows)
    (run / "evaluate" / "bbb" / "per_user.parquet").unlink()
    assert main(["compare", str(search)]) == 2
    assert "per-user results are missing" in capsys.readouterr().err


def test_the_pipeline_evaluate_stage_writes_per_user_results(synthetic_small, tmp_path):
    """run_evaluate (the stage itself, on predictions already made) writes per_user.parquet next
    to metrics.json, and the file gives back metrics.json exactly."""
    from raydpo.config import load_config, with_overrides
    from raydpo.evaluation.stats import PER_USER_FILE
    from raydpo.pipeline import Context, run_evaluate, stage_keys

    ds, data_dir = synthetic_small
    split = ds.split("valid").frame
    rows = [{"prompt": "".join(f'"{t}" ' for t in h), "prediction": f'"{title}"', "ground_truth": f'"{title}"'}
            for h, title in zip(split["history_titles"], split["target_title"])]
    rows[1]["prediction"] = '"not a title"'
    predict = tmp_path / "predict"
    (predict / "predictions").mkdir(parents=True)
    (predict / "predictions" / "predictions.json").write_text(json.dumps(rows))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset").symlink_to(data_dir)
    cfg = with_overrides(load_config(), {"evaluation.split": "valid", "prediction.limit": 0})
    out = tmp_path / "evaluate"
    out.mkdir()
    ctx = Context(cfg, tmp_path, stage_keys(cfg), outputs={"data": tmp_path / "data", "predict": predict},
                  progress=False)
    summary = run_evaluate(ctx, out)
    saved = json.loads((out / "metrics.json").read_text())
    table = PerUser.read(out / PER_USER_FILE)
    assert len(table) == len(rows) and table.meta["split"] == "valid"
    again = metrics_from_per_user(table)
    assert {k: {m: again[int(k)][m] for m in v} for k, v in saved.items()} == saved == summary["metrics"]
    assert saved["10"]["HR"] > 0.5 and saved["10"]["Predict_NotIn_Ratio"] == pytest.approx(1 / len(rows))
