"""Config and search-space validation: errors name the file and the key path."""

import pytest

from raydpo.config import ConfigError, config_fields, get_path, load_config, with_overrides
from raydpo.tuning.search import load_search_space


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_and_overrides():
    cfg = load_config(None, {"sampling.strategy": "random", "alignment.beta": 0.2})
    assert get_path(cfg, "sampling.strategy") == "random" and cfg.alignment.beta == 0.2
    assert {"sampling.strategy", "alignment.beta", "generation.temperature", "alignment.epochs"} <= config_fields()
    assert with_overrides(cfg, {"alignment.epochs": 2}).alignment.epochs == 2


def test_unknown_field_and_wrong_type_name_the_path(tmp_path):
    p = _write(tmp_path, "c.yaml", "alignment:\n  beta: -1\n  epochz: 2\nsampling:\n  n_negatives: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}: alignment.beta: Input should be greater than 0" in msg
    assert f"{p}: alignment.epochz: unknown field" in msg
    assert f"{p}: sampling.n_negatives:" in msg
    # DS-DPO settings are checked when the config loads, not when the align stage starts
    p = _write(tmp_path, "d.yaml", "alignment:\n  dsdpo: {embeddings: minilm-onnx, beta_mn: 0.1}\n")
    with pytest.raises(ConfigError, match="alignment.dsdpo.beta_mn: unknown field"):
        load_config(p)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "b.yaml", "a: [1,\n"))
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(_write(tmp_path, "d.yaml", "data: {source: path}\n"))


def test_search_space_validation(tmp_path):
    base = _write(tmp_path, "base.yaml", "name: b\n")
    good = _write(tmp_path, "s.yaml", "base: base.yaml\nspace:\n  sampling.strategy: {choice: [random, top_n]}\n"
                                      "  alignment.beta: {loguniform: [0.01, 1]}\n")
    space, cfg = load_search_space(good)
    assert cfg.evaluation.split == "valid" and space.objectives == {"NDCG@10": "max", "ORRatio@10": "min"}
    bad_field = _write(tmp_path, "s2.yaml", "base: base.yaml\nspace:\n  sampling.stratgy: {choice: [a]}\n")
    with pytest.raises(ConfigError, match=r"s2.yaml: space: sampling.stratgy: no such config field"):
        load_search_space(bad_field)
    bad_dist = _write(tmp_path, "s3.yaml", "base: base.yaml\nspace:\n  alignment.beta: {normal: [0, 1]}\n")
    with pytest.raises(ConfigError, match="space.alignment.beta: expected one of"):
        load_search_space(bad_dist)
    bad_value = _write(tmp_path, "s4.yaml", "base: base.yaml\nspace:\n  alignment.beta: {choice: [0.1, -2]}\n")
    with pytest.raises(ConfigError, match="alignment.beta: Input should be greater than 0"):
        load_search_space(bad_value)
    bad_obj = _write(tmp_path, "s5.yaml", "base: base.yaml\nobjectives: {NDCG@7: max}\n"
                                          "space:\n  alignment.beta: {choice: [0.1]}\n")
    with pytest.raises(ConfigError, match="objectives.NDCG@7"):
        load_search_space(bad_obj)
    unknown_key = _write(tmp_path, "s6.yaml", "base: base.yaml\nnum_sample: 3\nspace: {}\n")
    with pytest.raises(ConfigError, match="s6.yaml: num_sample: unknown field"):
        load_search_space(unknown_key)


def test_shipped_search_spaces_and_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for f in sorted((root / "search_spaces").glob("*.yaml")):
        text = f.read_text()
        assert text.startswith("#"), f"{f.name} must say in a comment what it answers and how long it takes"
        load_search_space(f)
    for f in sorted((root / "configs").glob("*.yaml")):
        load_config(f)
