"""QLoRA against LoRA: memory and step time of the same training step with the base model in
fp32, in bf16, and quantised to 4-bit NF4 (the published recipe: bf16 compute, no double
quantisation; and NF4 with fp32 compute) or LLM.int8, for SmolLM2-135M-Instruct (the
``smollm2-135m`` preset) by default.

Each case runs in its own process (clean peak memory) through raydpo's own training path:
``load_policy`` (``prepare_model_for_kbit_training`` for the quantised bases, a new LoRA r 16 /
alpha 32 on q_proj and v_proj as the published 1.7B SFT) and raydpo's trainers:

* ``sft``: an SFT step (loss on the response), ``--batch`` rows;
* ``dpo``: a DPO step (TRL on raydpo-tokenised pairs), ``--batch`` pairs, reference = the base
  with the adapter disabled (one no-grad forward per step).

Reported per case: the model's memory (the bytes of its tensors: parameters, buffers, 4-bit
quantisation states; RSS after loading minus before is also recorded, on CUDA the allocated
memory), the training step's extra peak memory (peak RSS during training minus RSS before; on
CUDA ``max_memory_allocated``), and the median time per step after the first. Ratios are against
the fp32 LoRA case measured in the same run. Synthetic prompts of raydpo's format (10 history
titles, ~200 SmolLM2 tokens) and quoted-title responses.

    python benchmarks/bench_qlora.py                       # CPU, smollm2-135m, sft + dpo, all cases
    python benchmarks/bench_qlora.py --kinds dpo --cases fp32 nf4_bf16 --steps 4
    # GPU variant (e.g. one A10G): the published model, bf16 baseline instead of fp32 on CPU
    python benchmarks/bench_qlora.py --device cuda --model HuggingFaceTB/SmolLM2-1.7B-Instruct \\
        --cases fp32 bf16 nf4_bf16 --batch 2 --steps 20 --json qlora_gpu.json
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
sys.path.insert(0, str(ROOT))

CASES = {
    # name: (description, load settings)
    "fp32": ("LoRA, fp32 base", {"dtype": "float32", "quantization": "none"}),
    "bf16": ("LoRA, bf16 base", {"dtype": "bfloat16", "quantization": "none"}),
    "nf4_bf16": ("QLoRA, NF4 base, bf16 compute (published)", {"quantization": "nf4", "compute_dtype": "bfloat16"}),
    "nf4_fp32": ("QLoRA, NF4 base, fp32 compute", {"quantization": "nf4", "compute_dtype": "float32"}),
    "int8": ("LoRA on an LLM.int8 base", {"quantization": "int8"}),
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _prepare(root: Path, rows: int, model: str) -> dict:
    from raydpo.data.synthetic import SyntheticConfig, generate
    from raydpo.models import resolve_model_path
    from raydpo.training.data import random_preferences

    ds = generate(SyntheticConfig(n_users=max(200, rows * 2), n_items=300, seed=7))
    ds.save(root / "data")
    base = resolve_model_path(model, catalog=ds.catalog)  # converts smollm2-135m once (cached)
    random_preferences(ds, n_negatives=1, seed=1, limit=rows).to_parquet(root / "prefs.parquet")
    return {"base": base, "root": str(root)}


def run_case(name: str, kind: str, env: dict, steps: int, batch: int, threads: int, device: str) -> dict:
    import pandas as pd
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    torch.set_num_threads(threads)
    from raydpo.training.common import ModelState, WorkerContext, load_policy
    from raydpo.training.config import LoraSettings, PreferenceConfig, SFTConfig
    from raydpo.training.data import tokenize_frame
    from raydpo.training.reference import ReferenceSpec

    cuda = device == "cuda"
    _, load = CASES[name]
    root = Path(env["root"])
    out = Path(tempfile.mkdtemp(prefix=f"bench-qlora-{name}-"))
    ctx = WorkerContext(run_dir=out, use_gpu=cuda)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    rss_start = _rss_mb()
    t_load = time.perf_counter()
    model, tok = load_policy(ModelState(base=env["base"]), lora=LoraSettings(**LORA), ctx=ctx, seed=0,
                             dtype=load.get("dtype", "auto"), quantization=load.get("quantization", "none"),
                             compute_dtype=load.get("compute_dtype", "auto"))
    load_s = time.perf_counter() - t_load
    model_mb = _model_mb(model)
    rss_model_mb = (torch.cuda.memory_allocated() / 2**20) if cuda else _rss_mb() - rss_start
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    frame = pd.read_parquet(root / "prefs.parquet")
    frame["rejected"] = [list(r) for r in frame["rejected"]]
    common = dict(data="unused", batch_size=batch, epochs=100, learning_rate=1e-4)
    if kind == "sft":
        from raydpo.training.sft import build_trainer

        st = SFTConfig(**common, lora=LoraSettings(**LORA))
        ex = tokenize_frame(frame, tok, max_length=1024, with_negatives=False)
        trainer = build_trainer(st, model, tok, ex, None, ctx, out, [Timer()])
    else:
        from raydpo.training.dpo import build_trainer

        st = PreferenceConfig(**common, loss="sigmoid", beta=0.1)
        ex = tokenize_frame(frame, tok, max_length=1024)
        trainer = build_trainer(st, model, tok, ex, None, ctx, out, [Timer()], ReferenceSpec())
    trainer.args.max_steps = steps
    trainer.args.save_strategy = "no"
    trainer.remove_callback(PrinterCallback)
    tokens = sum(len(e["prompt_ids"]) + sum(len(r) for r in e["responses"][: 1 if kind == "sft" else 2])
                 for e in ex[: batch * steps]) / steps
    rss0 = _rss_mb()
    trainer.train()
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - alloc0) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0
    body = times[1:] or times
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"case": name, "kind": kind, "description": CASES[name][0], "device": device,
            "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(), "threads": threads,
            "steps": len(times), "batch": batch, "tokens_per_step": tokens, "step_s_median": statistics.median(body),
            "load_s": load_s, "model_mb": model_mb, "rss_model_mb": rss_model_mb, "train_peak_mb": peak,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "trainable_params": n_params}


def _model_mb(model) -> float:
    """Bytes of the model's tensors (parameters, buffers, 4-bit quantisation states, int8 scales),
    each storage once: what the weights occupy, independent of lazy loading and the allocator."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for x in (getattr(qs, "absmax", None), getattr(qs, "code", None)):
                add(x)
        add(getattr(t, "SCB", None))
    return total / 2**20


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _subprocess(name: str, kind: str, env: dict, args) -> dict | None:
    cmd = [sys.executable, __file__, "--one", name, "--kind", kind, "--env", json.dumps(env), "--steps",
           str(args.steps), "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    print(f"case {name}/{kind} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a preset, local folder or hub id")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--kinds", nargs="*", default=["sft", "dpo"], choices=["sft", "dpo"])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2, help="rows (sft) or pairs (dpo) per step (published: 2)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="runs per case (interleaved); the fastest is kept")
    ap.add_argument("--json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--env", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.kind, json.loads(args.env), args.steps, args.batch, args.threads,
                                  args.device)))
        return
    os.environ.setdefault("RAYDPO_CACHE_DIR", str(Path(tempfile.gettempdir()) / "raydpo-bench-cache"))
    env = _prepare(Path(tempfile.mkdtemp(prefix="raydpo-bench-qlora-")), args.rows, args.model)
    results: dict[str, dict[str, dict]] = {k: {} for k in args.kinds}
    for kind in args.kinds:
        runs: dict[str, list[dict]] = {c: [] for c in args.cases}
        for _ in range(args.repeat):
            for case in args.cases:
                r = _subprocess(case, kind, env, args)
                if r is not None:
                    runs[case].append(r)
        for case, rs in runs.items():
            if rs:
                best = min(rs, key=lambda x: x["step_s_median"])
                best["step_s_all_runs"] = [x["step_s_median"] for x in rs]
                results[kind][case] = best
        base = results[kind].get("fp32")
        print(f"\n{kind} step, {args.model}, {args.device}, batch {args.batch}, {args.threads} threads "
              f"(ratios against fp32 LoRA in this run)")
        print(f"{'case':10s} {'ms/step':>9s} {'x time':>7s} {'model MB':>9s} {'x mem':>6s} {'train peak MB':>14s} "
              f"{'x peak':>7s}")
        for case, r in results[kind].items():
            rt = r["step_s_median"] / base["step_s_median"] if base else float("nan")
            rm = r["model_mb"] / base["model_mb"] if base else float("nan")
            rp = r["train_peak_mb"] / base["train_peak_mb"] if base and base["train_peak_mb"] > 0 else float("nan")
            r.update(time_ratio_vs_fp32=rt, model_mem_ratio_vs_fp32=rm, train_peak_ratio_vs_fp32=rp)
            print(f"{case:10s} {r['step_s_median'] * 1000:9.0f} {rt:7.2f} {r['model_mb']:9.0f} {rm:6.2f} "
                  f"{r['train_peak_mb']:14.0f} {rp:7.2f}   {r['description']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
