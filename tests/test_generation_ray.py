"""Candidate generation and prediction sharded on a local Ray Data actor pool; resume after faults."""

import json

import pandas as pd
import pytest

from raydpo.cli import main
from raydpo.errors import RaydpoError
from raydpo.generation.candidates import DecodeConfig
from raydpo.generation.distributed import ModelSpec, Resources, read_candidates, run_sharded, shard_path

pytestmark = pytest.mark.ray


def test_candidates_on_two_actors_and_resume_after_a_fault(ray_local, synthetic_small, tmp_path):
    ds, data = synthetic_small
    out = tmp_path / "cands"
    decode = DecodeConfig(mode="diverse_beam", num_return_sequences=4, batch_size=8)
    # 0.4 CPU per actor: the pool of the failed run may still hold its actors when the resumed run
    # starts its own in this same process (a CLI run exits instead); 2 x 2 x 0.4 fits in 2 CPUs
    res = Resources(num_actors=2, shard_size=16, num_cpus_per_actor=0.4)
    with pytest.raises(Exception, match="injected fault"):
        run_sharded("candidates", data, out, ModelSpec("tiny"), decode, ["train"], res, limit=64,
                    progress=False, fail_shards=[2])
    assert not (out / "_SUCCESS").exists() and not (out / "candidates.parquet").exists()
    with pytest.raises(RaydpoError, match="not complete"):
        read_candidates(out)
    done = {i: shard_path(out, i).stat().st_mtime_ns for i in range(4) if shard_path(out, i).exists()}
    assert 2 not in done
    summary = run_sharded("candidates", data, out, ModelSpec("tiny"), decode, ["train"], res, limit=64,
                          progress=False)
    assert summary["reused_shards"] == len(done) and summary["rows"] == 64
    for i, mtime in done.items():  # finished shards were not recomputed
        assert shard_path(out, i).stat().st_mtime_ns == mtime
    c = read_candidates(out)
    assert c["sample_id"].tolist() == ds.split("train").frame["sample_id"].iloc[:64].tolist()
    assert all(0 < len(x) <= 4 for x in c["candidate_item_ids"])
    # the same samples decoded in-process give the same candidates: sharding changes nothing
    from raydpo.generation.candidates import CandidateGenerator
    from raydpo.models import load_model

    m, tok = load_model("tiny", catalog=ds.catalog)
    local = CandidateGenerator(m, tok, ds.catalog, decode, ds.instruction).candidates(
        ds.split("train").frame.iloc[16:32])
    assert local["candidate_item_ids"].apply(list).tolist() == c["candidate_item_ids"].iloc[16:32].apply(list).tolist()
    # a changed configuration refuses to mix into the same folder
    with pytest.raises(RaydpoError, match="another configuration"):
        run_sharded("candidates", data, out, ModelSpec("tiny"), DecodeConfig(num_return_sequences=3), ["train"],
                    res, limit=64, progress=False)


def test_predict_then_evaluate_cli(ray_local, synthetic_small, tmp_path, capsys):
    ds, data = synthetic_small
    out = tmp_path / "pred"
    rc = main(["predict", "--data", str(data), "--out", str(out), "--constrained", "--beams", "2",
               "--shard-size", "16", "--batch-size", "8", "-q"])
    assert rc == 0
    rows = json.loads((out / "predictions.json").read_text())
    assert len(rows) == len(ds.split("test"))
    assert all(r["prediction"][1:-1] in ds.catalog.title_to_id for r in rows)  # constrained: real titles
    assert "predictions: 30 samples" in capsys.readouterr().out
    metrics = tmp_path / "m.json"
    assert main(["evaluate", str(out / "predictions.json"), "--data", str(data), "--json", str(metrics), "-q"]) == 0
    got = json.loads(metrics.read_text())
    assert got["5"]["Predict_NotIn_Ratio"] == 0.0
    assert 0 < got["10"]["diversity"] <= 10 * len(rows)
