"""Fidelity to the research code (issue 12 section 4): DS-DPO's default beta mapping per distance
type, the research code's exposure scope, trl_args a TRL loss would ignore."""

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from raydpo.errors import DataError, RaydpoError

# --- DS-DPO: the research code's mapping per distance type ------------------------------------------


def test_dsdpo_default_mapping_follows_the_research_code():
    from raydpo.training.config import DSDPOSettings

    assert DSDPOSettings(embeddings="e.npy", distance="dc").mapping == "linear"
    assert DSDPOSettings(embeddings="e.npy", distance="dp").mapping == "linear"
    assert DSDPOSettings(embeddings="e.npy", distance="dpc").mapping == "sigmoid"
    assert DSDPOSettings(embeddings="e.npy").mapping == "sigmoid"  # dpc is the default distance
    # the switch stays: an explicit mapping wins, for every type
    assert DSDPOSettings(embeddings="e.npy", distance="dc", mapping="sigmoid").mapping == "sigmoid"
    assert DSDPOSettings(embeddings="e.npy", distance="dpc", mapping="linear").mapping == "linear"
    # a saved config (mapping written out) loads back the same
    s = DSDPOSettings(embeddings="e.npy", distance="dp")
    assert DSDPOSettings.model_validate(s.model_dump()) == s
    from raydpo.config import PipelineConfig

    cfg = PipelineConfig.model_validate({"alignment": {"loss": "dsdpo", "dsdpo": {"embeddings": "e.npy",
                                                                                  "distance": "dc"}}})
    assert cfg.alignment.dsdpo.mapping == "linear"


@pytest.mark.parametrize("distance", ["dc", "dp", "dpc"])
def test_dsdpo_betas_per_type_by_hand(synthetic_small, tmp_path, distance):
    """add_betas with the default settings of each distance type against betas computed by hand
    from the research code's formulas (method.md 6.3)."""
    from raydpo.training.config import DSDPOSettings
    from raydpo.training.dsdpo import add_betas

    ds, _ = synthetic_small
    n = len(ds.catalog)
    emb = np.zeros((n, 2))
    row = ds.split("train").frame.iloc[0]
    hist = [int(h) for h in row["history_item_ids"] if h >= 0][:2]
    chosen, rej = int(row["target_item_id"]), []
    for i in range(n):
        if i not in hist and i != chosen and len(rej) < 3:
            rej.append(i)
    # history at (0, 0) and (2, 0) (or one item at (0, 0)); chosen at (1, 0); negatives spread out
    for k, h in enumerate(hist):
        emb[h] = [2.0 * k, 0.0]
    emb[chosen] = [1.0, 0.0]
    emb[rej] = [[1.0, 3.0], [4.0, 0.0], [1.0, -1.0]]
    ds_hist = ds.samples.frame.set_index("sample_id").loc[row["sample_id"], "history_item_ids"]
    hist_all = [int(h) for h in ds_hist if h >= 0]  # add_betas uses the whole history
    np.save(tmp_path / "emb.npy", emb)
    s = DSDPOSettings(embeddings=str(tmp_path / "emb.npy"), distance=distance, beta_min=0.05, beta_max=0.25)
    frame = pd.DataFrame({"sample_id": [row["sample_id"]], "chosen": [row["target_title"]],
                          "rejected": [[ds.catalog.titles[r] for r in rej]], "chosen_item_id": [chosen],
                          "rejected_item_ids": [rej]})
    got = add_betas(frame, ds, s)["betas"][0]

    past = np.mean([emb[h] for h in hist_all], axis=0)
    pc = np.mean([emb[h] for h in hist_all] + [emb[chosen]], axis=0)
    anchor = {"dc": emb[chosen], "dp": past, "dpc": pc}[distance]
    d = [math.dist(emb[r], anchor) for r in rej]
    lo, hi = min(d), max(d)
    x = [(v - lo) / (hi - lo) for v in d]
    if distance in ("dc", "dp"):  # linear in the research code
        want = [0.05 + xi * 0.2 for xi in x]
    else:  # dpc: sigmoid with T 0.8
        want = [0.05 + 0.2 / (1 + math.exp(-(xi - 0.5) / 0.8)) for xi in x]
    assert got == pytest.approx(want, abs=1e-12)
    assert min(got) == pytest.approx(0.05 if distance != "dpc" else 0.05 + 0.2 / (1 + math.exp(0.5 / 0.8)))


# --- exposure scope ----------------------------------------------------------------------------------


def _candidates(ds, split, n_rows, n_cands=6, seed=0):
    rng = np.random.default_rng(seed)
    frame = ds.split(split).frame.iloc[:n_rows]
    return pd.DataFrame({"sample_id": frame["sample_id"].astype(str).tolist(),
                         "candidate_item_ids": [rng.choice(len(ds.catalog), n_cands, replace=False).tolist()
                                                for _ in range(len(frame))]})


def _by_hand(ds, sample_ids):
    """The research code's build_exposure_count: a Counter over the histories of the records."""
    hist = ds.samples.frame.set_index("sample_id").loc[sample_ids, "history_item_ids"]
    c = Counter(int(h) for hs in hist for h in hs if h >= 0)
    ranks = {item: r + 1 for r, (item, _) in enumerate(c.most_common())}
    return c, ranks


def test_exposure_scope_candidates_is_the_research_codes(synthetic_small):
    from raydpo.sampling.annotate import annotate

    ds, _ = synthetic_small
    n_train = len(ds.split("train"))
    part = _candidates(ds, "train", n_train // 4)
    cand = annotate(ds, part, exposure_scope="candidates").to_frame(ds.catalog, long=True)
    split = annotate(ds, part, exposure_scope="split").to_frame(ds.catalog, long=True)
    counts, ranks = _by_hand(ds, part["sample_id"].tolist())
    assert cand["exposure"].tolist() == [counts.get(int(i), 0) for i in cand["item_id"]]
    assert cand["exposure_rank"].tolist() == [ranks.get(int(i), -1) for i in cand["item_id"]]
    # the whole split counts more histories: the two scopes differ when candidates cover a part
    assert (split["exposure"] >= cand["exposure"]).all() and (split["exposure"] > cand["exposure"]).any()
    # candidates covering the whole split: both scopes agree (counts and ranks)
    whole = _candidates(ds, "train", n_train)
    a = annotate(ds, whole, exposure_scope="candidates").to_frame(ds.catalog, long=True)
    b = annotate(ds, whole, exposure_scope="split_histories").to_frame(ds.catalog, long=True)
    assert a["exposure"].tolist() == b["exposure"].tolist()
    assert a["exposure_rank"].tolist() == b["exposure_rank"].tolist()
    # records of two splits: each split counts its own candidate records only
    mixed = pd.concat([part, _candidates(ds, "valid", 5, seed=1)], ignore_index=True)
    m = annotate(ds, mixed, exposure_scope="candidates").to_frame(ds.catalog, long=True)
    vc, _ = _by_hand(ds, mixed["sample_id"].tolist()[len(part):])
    mv = m[m["split"] == "valid"]
    assert mv["exposure"].tolist() == [vc.get(int(i), 0) for i in mv["item_id"]]
    with pytest.raises(DataError, match="exposure scope"):
        annotate(ds, part, exposure_scope="file")


def test_exposure_scope_cli_and_config(synthetic_small, tmp_path, capsys):
    from raydpo.cli import main
    from raydpo.config import PipelineConfig

    cfg = PipelineConfig.model_validate({"sampling": {"exposure_scope": "candidates"}})
    assert cfg.sampling.exposure_scope == "candidates"
    ds, data = synthetic_small
    n_train = len(ds.split("train"))
    part = _candidates(ds, "train", n_train // 4)
    part.to_parquet(tmp_path / "cands.parquet")
    outs = {}
    for scope in ("split", "candidates"):
        out = tmp_path / f"{scope}.parquet"
        rc = main(["sample", "--data", str(data), "--candidates", str(tmp_path / "cands.parquet"), "--strategy",
                   "low_exposure", "--exposure-scope", scope, "--out", str(out), "-q"])
        assert rc in (0, None)
        outs[scope] = pd.read_parquet(out)
    # low_exposure picks the least exposed candidate: the scope changes some picks
    assert outs["split"]["rejected"].tolist() != outs["candidates"]["rejected"].tolist()
    capsys.readouterr()


# --- trl_args a loss ignores -------------------------------------------------------------------------


def test_trl_args_that_the_loss_ignores_are_rejected(tmp_path):
    from raydpo.training.config import Plan, PreferenceConfig, build, load_config

    ok = build(PreferenceConfig, {"data": "p.parquet", "loss": "robust", "trl_args": {"label_smoothing": 0.1}})
    assert ok.trl_args == {"label_smoothing": 0.1}
    build(PreferenceConfig, {"data": "p.parquet", "loss": "sigmoid", "trl_args": {"label_smoothing": 0.0}})  # default
    cases = [("sigmoid", {"label_smoothing": 0.1}, "trl_args.label_smoothing: TRL's 'sigmoid' loss ignores it"),
             ("ipo", {"discopop_tau": 0.1}, "trl_args.discopop_tau: TRL's 'ipo' loss ignores it"),
             ("bco_pair", {"f_divergence_type": "js_divergence"}, "trl_args.f_divergence_type"),
             ("sigmoid", {"f_alpha_divergence_coef": 0.2}, "trl_args.f_alpha_divergence_coef"),
             ("sdpo", {"ld_alpha": 0.5}, "trl_args.ld_alpha: loss 'sdpo'")]
    for loss, args, msg in cases:
        with pytest.raises(RaydpoError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            build(PreferenceConfig, {"data": "p.parquet", "loss": loss, "trl_args": args})
    # at config load: one line naming the file and the key path
    cfg = tmp_path / "plan.yaml"
    cfg.write_text("model: {name_or_path: tiny}\ndataset: d\noutput_dir: o\nstages:\n"
                   "  - {kind: preference, data: p.parquet, loss: sigmoid, trl_args: {label_smoothing: 0.1}}\n")
    with pytest.raises(RaydpoError) as e:
        load_config(cfg, Plan)
    text = str(e.value)
    assert "\n" not in text and str(cfg) in text and "stages.0" in text and "trl_args.label_smoothing" in text
