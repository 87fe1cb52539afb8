"""Paired evaluation of the SFT model and an aligned model on the test users whose aligned
predictions are finished (the whole shards of an interrupted predict stage), for docs/results.md:
    python scripts/eval_finished_shards.py runs/goodreads_smollm2_cpu_nf4 OUT.json
(the SFT predictions come from RUN_DIR_sft_only, written by scripts/goodreads_smollm2_cpu.sh)."""
import glob, json, sys
from pathlib import Path
import pandas as pd
from raydpo.data import Dataset, Samples, load_dataset
from raydpo.evaluation import evaluate, to_json
from raydpo.evaluation.evaluate import Predictions

run = Path(sys.argv[1])
shards = sorted(glob.glob(str(run / "predict" / "*" / "predictions" / "shards" / "*.parquet")))
aligned = pd.concat([pd.read_parquet(f) for f in shards], ignore_index=True)
ds = load_dataset(next(run.glob("data/*/dataset")))
f = ds.samples.frame
ids = set(aligned["sample_id"])
keep = (f["split"] != "test") | f["sample_id"].isin(ids)
sub = Dataset(ds.catalog, Samples(f[keep].reset_index(drop=True)), ds.name, ds.instruction)
order = sub.split("test").frame["sample_id"].tolist()
sft = pd.concat([pd.read_parquet(g) for g in sorted(glob.glob(str(run) + "_sft_only/shards/*.parquet"))])
out = {"shards": [Path(s).name for s in shards], "users": len(order)}
for name, frame in (("sft", sft), ("aligned", aligned)):
    fr = frame.set_index("sample_id").loc[order]
    preds = Predictions(fr["prompt"].tolist(), fr["prediction"].tolist(), fr["ground_truth"].tolist())
    out[name] = to_json(evaluate(preds, sub, (5, 10), split="test"))
a = aligned.set_index("sample_id").loc[order]["prediction"]
b = sft.set_index("sample_id").loc[order]["prediction"]
out["same_prediction_as_sft"] = int((a.values == b.values).sum())
print(json.dumps({k: v for k, v in out.items() if k not in ("sft", "aligned")}))
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
