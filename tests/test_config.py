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


def test_repeated_set_flags_accumulate():
    from raydpo.cli import _parse_sets, build_parser

    args = build_parser().parse_args(["run", "c.yaml", "--set", "alignment.beta=0.2", "sampling.strategy=random",
                                      "--set", "alignment.epochs=2"])
    sets = _parse_sets(args.set)
    assert sets == {"alignment.beta": 0.2, "sampling.strategy": "random", "alignment.epochs": 2}
    cfg = load_config(None, sets)
    assert (cfg.alignment.beta, cfg.sampling.strategy, cfg.alignment.epochs) == (0.2, "random", 2)


def test_yaml_duplicate_keys_are_refused_but_merge_keys_may_override(tmp_path):
    with pytest.raises(ConfigError, match=r"d.yaml: alignment.beta: duplicate key 'beta' \(lines 2 and 3\)"):
        load_config(_write(tmp_path, "d.yaml", "alignment:\n  beta: 0.1\n  beta: -1\n"))
    from raydpo.readers import loads_yaml

    assert loads_yaml("b: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", "m.yaml") == {"b": {"x": 1, "y": 2},
                                                                                 "c": {"x": 3, "y": 2}}


def test_strategies_of_config_plugins_are_known_at_load(tmp_path):
    from raydpo.sampling import unregister_strategy

    plugin = _write(tmp_path, "myplug.py", "from raydpo.sampling import register_strategy\n\n"
                                           "@register_strategy('cfg_plugin_first')\n"
                                           "def first(ctx):\n    '''The first candidate.'''\n"
                                           "    return list(ctx.items[:1])\n")
    try:
        cfg = load_config(_write(tmp_path, "c.yaml", f"sampling: {{plugins: [{plugin}], strategy: cfg_plugin_first}}\n"))
        assert cfg.sampling.strategy == "cfg_plugin_first"
        # validated again (search-space choices, Tune trials): the plugin is not re-imported
        assert with_overrides(cfg, {"alignment.beta": 0.3}).sampling.plugins == [str(plugin)]
    finally:
        unregister_strategy("cfg_plugin_first")
    with pytest.raises(ConfigError, match="sampling.strategy: unknown strategy 'cfg_plugin_second'"):
        load_config(_write(tmp_path, "d.yaml", "sampling: {strategy: cfg_plugin_second}\n"))


def test_names_that_become_paths_are_checked_at_load(tmp_path):
    from raydpo.training.config import Plan, build
    from raydpo.errors import RaydpoError

    for text, where in (("name: ../x\n", "name: name '../x'"),
                        ("alignment:\n  stages:\n    - {name: /abs}\n", "alignment.stages.0.name: name '/abs'")):
        with pytest.raises(ConfigError, match=where):
            load_config(_write(tmp_path, "c.yaml", text))
    base = {"model": {"name_or_path": "org/some-model"}, "output_dir": str(tmp_path / "o"), "ray": {"num_workers": 0}}
    with pytest.raises(RaydpoError, match=r"stage name '\.\./\.\./somewhere' is not a safe name"):
        build(Plan, {**base, "dataset": str(tmp_path), "stages": [{"kind": "selfplay", "name": "../../somewhere"}]})
    with pytest.raises(RaydpoError, match=r"run name 'a/b' is not a safe name"):
        build(Plan, {**base, "ray": {"num_workers": 0, "name": "a/b"}, "stages": [{"kind": "sft", "data": "x"}]})
    # hub ids stay allowed without a local folder; local-looking paths must exist
    assert build(Plan, {**base, "stages": [{"kind": "sft", "data": "x"}]}).model.name_or_path == "org/some-model"
