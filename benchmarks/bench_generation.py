"""Constrained candidate generation: raydpo against the reference setting, measured in one run.

Reference setting (method.md section 3): transformers' beam search with a
``prefix_allowed_tokens_fn`` that, per beam and per step, scans the sequence for the response
start and walks a Python trie from the root; batch size 1. Ours: the compiled trie (candidates
are the allowed edges, found by a few batched tensor ops per step), our beam search with one
prompt pass per prompt (a prefix common to the batch once), prompt-shared attention during
decoding, finished prompts leaving the batch, prompts batched by length. Same model, prompts,
number of beams and returned candidates. Rounds are interleaved and medians reported. Also
measured: the share of our decode time spent in the constraint (trie masks and steps).

    python benchmarks/bench_generation.py --model tiny --prompts 64 --ref-prompts 8 --batch 64 --ablation
    python benchmarks/bench_generation.py --model smollm2-135m --prompts 16 --ref-prompts 2 --batch 16
    python benchmarks/bench_generation.py --ray   # Ray Data rows/s with 1 and 2 actors
    python benchmarks/bench_generation.py --model smollm2-1.7b-random --prompts 64 --ref-prompts 4 --batch 64  # GPU
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raydpo.data import load_dataset
from raydpo.generation.decoding import beam_search
from raydpo.generation.trie import TitleTrie
from raydpo.models import load_model
from raydpo.prompt import encode_response, render_prompt

ROOT = Path(__file__).resolve().parents[1]
GOODREADS = ROOT.parent / "shared" / "data" / "goodreads"


def reference_candidates(model, tok, prompts, titles, num_beams, max_new):
    """Batch size 1, per-beam Python trie walk from the root, as the research code does."""
    root: dict = {}
    for t in titles:
        node = root
        for x in encode_response(tok, t):
            node = node.setdefault(x, {})
    n = 0
    for p in prompts:
        enc = tok([p], return_tensors="pt", add_special_tokens=False).to(model.device)
        plen = enc.input_ids.shape[1]

        marker = enc.input_ids[0, -3:].tolist()  # the response marker (end of the assistant tag)

        def prefix_fn(batch_id, ids):
            # the reference converts the whole sequence to a list and scans it for the response
            # marker on every call, then walks the trie from the root
            seq = ids.tolist()
            start = len(seq)
            for i in range(len(seq) - len(marker) + 1):
                if seq[i:i + len(marker)] == marker:
                    start = i + len(marker)
                    break
            node = root
            for x in seq[start:]:
                node = node.get(x)
                if not node:
                    return [tok.eos_token_id]
            return list(node)

        out = model.generate(**enc, num_beams=num_beams, num_return_sequences=num_beams, do_sample=False,
                             max_new_tokens=max_new, prefix_allowed_tokens_fn=prefix_fn,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        n += out.shape[0]
    return n


class TimedTrie:
    """Wraps a TitleTrie and accumulates the time spent in its batched operations."""

    def __init__(self, trie):
        self.trie, self.seconds = trie, 0.0

    def __getattr__(self, name):
        attr = getattr(self.trie, name)
        if name not in ("allowed_mask", "allowed_edges", "step", "exclusion_index"):
            return attr

        def timed(*a, **k):
            t0 = time.perf_counter()
            r = attr(*a, **k)
            self.seconds += time.perf_counter() - t0
            return r
        return timed


def ours(model, tok, prompts, trie, num_beams, batch, **options):
    """Our path as ``raydpo generate`` runs it: prompts batched by token length, one
    ``beam_search`` call per batch."""
    n = 0
    timed = TimedTrie(trie)
    lengths = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    for i in range(0, len(prompts), batch):
        part = [prompts[j] for j in order[i:i + batch]]
        enc = tok(part, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = beam_search(model, enc.input_ids, enc.attention_mask, timed, num_beams, num_beams, **options)
        n += out.items.numel()
    return n, timed.seconds


# the steps of our path, each added to the previous one (``--ablation``)
ABLATION = {
    "batched, per-beam prompt (as transformers)": {"shared_prefill": False},
    "+ one prompt pass per prompt, in-place beam cache": {"shared_prefill": True, "shared_attention": False},
    "+ prompt-shared attention, shared prefix, finished prompts leave": {"shared_attention": True},
}


def random_smollm2_1_7b(device, layers: int = 24):
    """SmolLM2-1.7B's architecture, randomly initialised (throughput needs no real weights),
    with SmolLM2's tokenizer. ``layers`` < 24 only to dry-run this path on a small machine."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from raydpo.models import load_tokenizer, resolve_dtype

    tok = load_tokenizer("smollm2-135m")
    cfg = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                               num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                               max_position_embeddings=8192, rope_theta=130000, tie_word_embeddings=True,
                               bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=resolve_dtype("auto", device)).to(device).eval()
    return model, tok


def bench_decoding(args):
    ds = load_dataset(args.data)
    if args.model == "smollm2-1.7b-random":
        from raydpo.models import resolve_device

        model, tok = random_smollm2_1_7b(resolve_device("auto"), args.random_layers)
    else:
        model, tok = load_model(args.model, catalog=ds.catalog)
    device = next(model.parameters()).device
    trie = TitleTrie.from_titles(tok, ds.catalog.titles).to(device)
    frame = ds.split("train").frame
    prompts = [render_prompt(tok, list(h), ds.instruction) for h in frame["history_titles"][: args.prompts]]
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), catalog "
          f"{len(ds.catalog)} titles, trie {trie.n_nodes} nodes / depth {trie.max_depth}, {args.beams} beams, "
          f"torch threads {torch.get_num_threads()}")
    ours(model, tok, prompts[:2], trie, args.beams, 2)  # warm-up
    ref_prompts = prompts[: args.ref_prompts]
    rates: dict[str, list[float]] = {}
    shares: dict[str, list[float]] = {}

    forwards: dict[str, float] = {}  # model token positions computed per candidate (padding included)
    counted = {"tokens": 0}
    model_forward = model.forward

    def counting_forward(*a, **k):
        ids = k.get("input_ids", a[0] if a else None)
        counted["tokens"] += ids.numel()
        return model_forward(*a, **k)

    model.forward = counting_forward

    def measure(name, fn):
        counted["tokens"] = 0
        t0 = time.perf_counter()
        n, trie_s = fn()
        total = time.perf_counter() - t0
        rates.setdefault(name, []).append(n / total)
        shares.setdefault(name, []).append(trie_s / total)
        forwards[name] = counted["tokens"] / n

    ref = "reference (batch 1, per-beam Python trie walk)"
    b1, bn = "raydpo batch 1", f"raydpo batch {args.batch}"
    for r in range(args.repeats):  # interleaved rounds: load changes hit every setting alike
        measure(ref, lambda: (reference_candidates(model, tok, ref_prompts, ds.catalog.titles, args.beams,
                                                   trie.max_depth), 0.0))
        measure(b1, lambda: ours(model, tok, ref_prompts, trie, args.beams, 1))
        measure(bn, lambda: ours(model, tok, prompts, trie, args.beams, args.batch))
        if args.ablation:
            for name, options in ABLATION.items():
                measure(f"batch {args.batch}: {name}",
                        lambda o=options: ours(model, tok, prompts, trie, args.beams, args.batch, **o))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k.split(' (')[0]} {v[-1]:.1f}"
                                                          for k, v in rates.items()), flush=True)
    base = statistics.median(rates[ref])
    print(f"candidates/s, median of {args.repeats} interleaved rounds (best in brackets); speed-up = "
          f"median / reference median; constraint = share of decode time in trie masks and steps")
    for name, v in rates.items():
        med = statistics.median(v)
        extra = "" if name == ref else (f" -> {med / base:.1f}x reference; constraint "
                                        f"{100 * statistics.median(shares[name]):.1f}% of decode time")
        print(f"  {name}: {med:.2f} ({max(v):.2f}){extra}")
    print("model work: token positions run through the model per candidate (prompt passes, padding and "
          "decode steps; the speed-up a compute-bound device can show is bounded by the ratio)")
    for name, f in forwards.items():
        print(f"  {name}: {f:.1f}" + ("" if name == ref else f" ({forwards[ref] / f:.1f}x fewer than the reference)"))


def bench_ray(args):
    import ray

    from raydpo.generation.candidates import DecodeConfig
    from raydpo.generation.distributed import ModelSpec, Resources, run_sharded

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s")
    decode = DecodeConfig(mode="diverse_beam", num_return_sequences=10, batch_size=16)
    for actors in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            s = run_sharded("candidates", args.data, out, ModelSpec(args.model), decode, ["train"],
                            Resources(num_actors=actors, shard_size=32), limit=args.ray_rows, progress=False)
            print(f"Ray Data, {actors} actor(s): {s['rows_per_second']:.2f} rows/s over {s['rows']} rows "
                  f"(wall {s['seconds']:.1f} s including actor start-up and model load)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(GOODREADS))
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--ref-prompts", type=int, default=8)
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved measurement rounds")
    ap.add_argument("--random-layers", type=int, default=24,
                    help="layers of smollm2-1.7b-random (fewer only to dry-run the GPU path on a CPU)")
    ap.add_argument("--ablation", action="store_true", help="also time each step of our path on its own")
    ap.add_argument("--ray", action="store_true", help="measure Ray Data scaling instead")
    ap.add_argument("--ray-rows", type=int, default=128)
    args = ap.parse_args()
    bench_ray(args) if args.ray else bench_decoding(args)


if __name__ == "__main__":
    main()
