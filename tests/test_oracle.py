"""raydpo's evaluator reproduces every published metric of every oracle file to within 1e-9."""

import json

import pytest

from conftest import ORACLE, require_shared
from raydpo.evaluation import METRIC_NAMES, Predictions, evaluate

FOLDERS = sorted(p.name for p in ORACLE.glob("*") if (p / "eval_result.json").exists()) if ORACLE.exists() else []


@pytest.mark.parametrize("folder", FOLDERS or ["<no oracle>"])
def test_reproduces_published_metrics(folder, goodreads):
    require_shared()
    path = ORACLE / folder
    expected = json.loads((path / "eval_result.json").read_text())
    ks = sorted({e["topK"] for e in expected})
    assert set(ks) >= {5, 10}
    ours = evaluate(Predictions.read(path / "raw_results_1000.json"), goodreads, ks)
    for entry in expected:
        got = ours[entry["topK"]]
        for name in METRIC_NAMES:
            assert abs(got[name] - entry[name]) <= 1e-9, (folder, entry["topK"], name, got[name], entry[name])
        assert got["Dis_genre"] == pytest.approx(entry["Dis_genre"], abs=1e-9)
