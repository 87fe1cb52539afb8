"""Training benchmarks on the tiny model, each case in its own process (clean peak memory):

1. S-DPO with 5 negatives (one packed row per example: the prompt once) against the same data
   as 5 separate DPO pairs per example (TRL, ``pairs: all``): time per step and peak memory;
   S-DPO without prompt sharing isolates the effect of the packing.
2. Precomputed reference log-probs against an on-the-fly reference forward (TRL DPO and
   S-DPO): time per step (the one-off pre-computation is reported separately).
3. raydpo's DPO step (TRL on raydpo-tokenised data, fp32, no gradient checkpointing on CPU)
   against TRL's default DPO configuration (``DPOConfig`` defaults: gradient checkpointing,
   bf16; raw text tokenised by TRL) on the same model, LoRA and data; and the same step with
   ``dtype: auto`` (``ours_dpo_auto``: a bf16 base on CPUs with AVX512-BF16/AMX-BF16, where
   bf16 autocast is not slow either), against fp32.

Every case trains the same LoRA (r 16, all projections) from the same start for ``--steps``
steps; time per step is the median over the steps after the first, and the fastest of
``--repeat`` interleaved runs is kept (the machine may be shared). Peak memory is the process's
peak RSS during training minus its RSS before training (CPU).

    python benchmarks/bench_training.py [--rows 96] [--steps 12] [--repeat 2] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    # name: (description, kwargs)
    "sdpo5": ("S-DPO, 5 negatives, prompt shared", {"kind": "sdpo", "k": 5, "share": True, "batch": 4}),
    "sdpo5_unshared": ("S-DPO, 5 negatives, prompt repeated", {"kind": "sdpo", "k": 5, "share": False, "batch": 4}),
    "dpo5_pairs": ("TRL DPO, the same rows as 5 pairs each", {"kind": "dpo", "k": 5, "pairs": "all", "batch": 20}),
    "dpo_onthefly": ("TRL DPO, reference on the fly", {"kind": "dpo", "k": 1, "batch": 8}),
    "dpo_precomputed": ("TRL DPO, reference precomputed", {"kind": "dpo", "k": 1, "batch": 8, "pre": True}),
    "sdpo5_onthefly": ("S-DPO 5 neg, reference on the fly", {"kind": "sdpo", "k": 5, "share": True, "batch": 4}),
    "sdpo5_precomputed": ("S-DPO 5 neg, reference precomputed",
                          {"kind": "sdpo", "k": 5, "share": True, "batch": 4, "pre": True}),
    "trl_default": ("TRL DPOTrainer, default DPOConfig, raw text", {"kind": "trl_default", "k": 1, "batch": 8}),
    "trl_default_fp32": ("TRL defaults but bf16=False (gradient checkpointing on)",
                         {"kind": "trl_default", "k": 1, "batch": 8, "bf16": False}),
    "ours_dpo": ("raydpo DPO step (TRL, pre-tokenised, fp32, no GC)", {"kind": "dpo", "k": 1, "batch": 8}),
    "ours_dpo_auto": ("raydpo DPO step, dtype auto (bf16 on CPUs with AVX512-BF16/AMX-BF16)",
                      {"kind": "dpo", "k": 1, "batch": 8, "dtype": "auto"}),
}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _prepare(root: Path, rows: int) -> dict:
    from raydpo.data.synthetic import SyntheticConfig, generate
    from raydpo.models import resolve_model_path
    from raydpo.training.data import random_preferences

    ds = generate(SyntheticConfig(n_users=max(400, rows * 2), n_items=300, seed=7))
    base = resolve_model_path("tiny", catalog=ds.catalog)
    for k in (1, 5):
        random_preferences(ds, n_negatives=k, seed=k, limit=rows).to_parquet(root / f"prefs{k}.parquet")
    return {"base": base, "root": str(root)}


def run_case(name: str, env: dict, steps: int, threads: int) -> dict:
    """One case, in this process."""
    import pandas as pd
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(threads)
    from raydpo.training.common import ModelState, WorkerContext, load_policy
    from raydpo.training.config import LoraSettings, PreferenceConfig
    from raydpo.training.data import tokenize_frame
    from raydpo.training.reference import ReferenceSpec, precompute_logps

    _, spec = CASES[name]
    root = Path(env["root"])
    frame = pd.read_parquet(root / f"prefs{spec['k']}.parquet")
    frame["rejected"] = [list(r) for r in frame["rejected"]]
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    ctx = WorkerContext(run_dir=out)
    epochs = 100  # bounded by max_steps
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    pre_s = 0.0
    if spec["kind"] == "trl_default":
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        from raydpo.models import load_model
        from raydpo.prompt import render_user_message

        model, tok = load_model(env["base"], dtype="float32")  # what from_pretrained gives a TRL user
        data = Dataset.from_list([{"prompt": render_user_message(tok, p), "chosen": c, "rejected": r[0]}
                                  for p, c, r in zip(frame["prompt"], frame["chosen"], frame["rejected"])])
        extra = {"bf16": False} if spec.get("bf16") is False else {}
        args = DPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=spec["batch"],
                         max_steps=steps, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=10**6,
                         **extra)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=LoraSettings().peft_config(), callbacks=[Timer()])
        setup_note = f"bf16={args.bf16}, gradient_checkpointing={args.gradient_checkpointing}, lr={args.learning_rate}"
    else:
        dtype = spec.get("dtype", "float32")  # every other raydpo case in fp32, whatever the CPU
        model, tok = load_policy(ModelState(base=env["base"]), lora=LoraSettings(), dtype=dtype, ctx=ctx, seed=0)
        loss = "sdpo" if spec["kind"] == "sdpo" else "sigmoid"
        st = PreferenceConfig(data="unused", loss=loss, beta=0.1, batch_size=spec["batch"], epochs=epochs,
                              learning_rate=1e-4, pairs=spec.get("pairs", "first"), share_prompt=spec.get("share", True))
        ex = tokenize_frame(frame, tok, max_length=1024)
        ref = ReferenceSpec()
        if spec.get("pre"):
            t = time.perf_counter()
            lps = precompute_logps(model, ex, pad_token_id=tok.pad_token_id, batch_size=16)
            pre_s = time.perf_counter() - t
            for e, lp in zip(ex, lps):
                e["ref_logps"] = lp
            ref = ReferenceSpec(from_data=True)
        if spec["kind"] == "sdpo":
            from raydpo.training.sdpo import build_trainer
        else:
            from raydpo.training.dpo import build_trainer
        trainer = build_trainer(st, model, tok, ex, None, ctx, out, [Timer()], ref)
        trainer.args.max_steps = steps
        trainer.args.save_strategy = "no"
        setup_note = f"{str(next(model.parameters()).dtype).replace('torch.', '')} base, no gradient checkpointing"
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    examples_per_step = spec["batch"] // (5 if spec.get("pairs") == "all" else 1)
    body = times[1:] or times
    return {"case": name, "description": CASES[name][0], "steps": len(times), "examples_per_step": examples_per_step,
            "step_s_median": statistics.median(body), "step_s_mean": statistics.fmean(body), "train_s": total,
            "precompute_s": pre_s, "rss_before_mb": rss0, "peak_rss_mb": peak, "peak_delta_mb": peak - rss0,
            "threads": threads, "setup": setup_note}


def _subprocess(name: str, env: dict, steps: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--env", json.dumps(env), "--steps", str(steps),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"case {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2, help="runs per case (interleaved); the fastest is kept")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--env", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, json.loads(args.env), args.steps, args.threads)))
        return
    os.environ.setdefault("RAYDPO_CACHE_DIR", str(Path(tempfile.gettempdir()) / "raydpo-bench-cache"))
    root = Path(tempfile.mkdtemp(prefix="raydpo-bench-"))
    env = _prepare(root, args.rows)
    runs: dict[str, list[dict]] = {name: [] for name in args.cases}
    for _ in range(args.repeat):
        for name in args.cases:
            runs[name].append(_subprocess(name, env, args.steps, args.threads))
    results = {}
    for name in args.cases:
        r = min(runs[name], key=lambda x: x["step_s_median"])
        r["step_s_medians_all_runs"] = [x["step_s_median"] for x in runs[name]]
        r["peak_delta_mb"] = min(x["peak_delta_mb"] for x in runs[name])
        results[name] = r
        print(f"{name:18s} {r['step_s_median'] * 1000:8.1f} ms/step  {r['examples_per_step']:3d} ex/step  "
              f"peak +{r['peak_delta_mb']:7.1f} MB  pre {r['precompute_s']:.2f} s   ({r['description']})", flush=True)

    def ratio(a: str, b: str, key: str = "step_s_median") -> float | None:
        if a in results and b in results:
            return results[b][key] / results[a][key]
        return None

    summary = {
        "sdpo5_vs_5_pairs_speedup": ratio("sdpo5", "dpo5_pairs"),
        "sdpo5_vs_5_pairs_memory_ratio": (results["dpo5_pairs"]["peak_delta_mb"] / results["sdpo5"]["peak_delta_mb"]
                                          if {"sdpo5", "dpo5_pairs"} <= results.keys() else None),
        "prompt_sharing_speedup": ratio("sdpo5", "sdpo5_unshared"),
        "dpo_precomputed_speedup": ratio("dpo_precomputed", "dpo_onthefly"),
        "sdpo_precomputed_speedup": ratio("sdpo5_precomputed", "sdpo5_onthefly"),
        "ours_vs_trl_default_speedup": ratio("ours_dpo", "trl_default"),
        "ours_vs_trl_default_fp32_speedup": ratio("ours_dpo", "trl_default_fp32"),
        "ours_auto_vs_trl_default_speedup": ratio("ours_dpo_auto", "trl_default"),
        "dtype_auto_vs_fp32_speedup": ratio("ours_dpo_auto", "ours_dpo"),
    }
    from raydpo.models.device import cpu_bf16_fast, cpu_flags

    summary["cpu_bf16_flags"] = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    summary["dtype_auto_on_this_cpu"] = "bfloat16" if cpu_bf16_fast() else "float32"
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in summary.items()}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
