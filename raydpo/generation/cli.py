"""``raydpo generate`` and ``raydpo predict``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import int_at_least, number_above, share
from .candidates import DecodeConfig


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (raydpo or SPRec format)")
    p.add_argument("--out", required=True, help="output folder (resumable: finished shards are reused)")
    p.add_argument("--model", default="tiny", help="tiny | smollm2-135m | hub id | local folder (default: tiny)")
    p.add_argument("--adapter", help="LoRA adapter folder")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on GPU and on CPUs with AVX512-BF16/AMX-BF16, else fp32) | float32 | bfloat16 | float16")
    p.add_argument("--quantization", default="none", choices=["none", "nf4", "int8"],
                   help="load the base quantised with bitsandbytes (nf4: the QLoRA recipe; needs raydpo[quant])")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype of the nf4 matmuls (auto: as --dtype auto)")
    p.add_argument("--actors", type=int_at_least(1), default=1, help="Ray Data actors, one model each (default 1)")
    p.add_argument("--gpus-per-actor", type=number_above(0, inclusive=True), default=0.0)
    p.add_argument("--cpus-per-actor", type=number_above(0), default=None,
                   help="default: 1 with GPUs, else a fraction that leaves room for Ray Data's own tasks")
    p.add_argument("--shard-size", type=int_at_least(1), default=256, help="rows per shard (the unit of resume)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16, help="prompts per decoding batch")
    p.add_argument("--limit", type=int_at_least(1), help="only the first N selected samples")
    p.add_argument("--overwrite", action="store_true", help="discard a previous run with another configuration")
    p.add_argument("--beam-cache", default="shared", choices=list(BEAM_CACHES),
                   help="shared: prompt keys/values once per prompt, prompt-shared attention (default; falls "
                        "back to per-beam for models without transformers' attention interface); per-beam: "
                        "one prompt pass, keys/values repeated per beam; transformers: prompt run per beam")
    p.add_argument("-q", "--quiet", action="store_true")


# --beam-cache -> (shared_prefill, shared_attention)
BEAM_CACHES = {"shared": (True, None), "per-beam": (True, False), "transformers": (False, False)}


def _run(task: str, args: argparse.Namespace, decode: DecodeConfig, splits: list[str]) -> int:
    from ..outputs import check_output
    from .distributed import ModelSpec, Resources, run_sharded

    _check_inputs(args)  # model, adapter and data before Ray starts or a model is loaded
    local = [p for p in (args.model, args.adapter) if p and Path(p).exists()]
    check_output(args.out, kind=task, folder=True, inputs=[args.data, *local], overwrite=args.overwrite,
                 resumable=True)
    spec = ModelSpec(args.model, args.adapter, args.dtype, quantization=args.quantization,
                     compute_dtype=args.compute_dtype)
    run_sharded(task, args.data, args.out, spec, decode, splits,
                Resources(args.actors, args.gpus_per_actor, args.cpus_per_actor, args.shard_size),
                limit=args.limit, overwrite=args.overwrite, progress=not args.quiet)
    return 0


def _check_inputs(args: argparse.Namespace) -> None:
    from ..checks import check_model_name
    from ..data import load_dataset
    from ..errors import RaydpoError
    from ..readers import check_folder

    try:
        check_model_name(args.model)
    except ValueError as e:
        raise RaydpoError(f"--model: {e}") from None
    if args.adapter:
        check_folder(args.adapter, "adapter folder")
    if str(args.dtype).lower() not in ("auto", "float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16",
                                       "half"):
        raise RaydpoError(f"--dtype: expected auto, float32, bfloat16 or float16, got {args.dtype!r}")
    if args.quantization != "none":
        from ..models.quantization import require_bitsandbytes

        require_bitsandbytes(args.quantization)
    load_dataset(args.data)  # every data file is checked here, naming the file and the record


def _beam_cache(args: argparse.Namespace) -> dict:
    prefill, attention = BEAM_CACHES[args.beam_cache]
    return {"shared_prefill": prefill, "shared_attention": attention}


def _cmd_generate(args: argparse.Namespace) -> int:
    decode = DecodeConfig(mode=args.mode, num_return_sequences=args.n, num_beams=args.beams,
                          num_beam_groups=args.groups, diversity_penalty=args.diversity_penalty,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          exclude_history=not args.keep_history, exclude_target=not args.keep_target,
                          batch_size=args.batch_size, seed=args.seed, reference_logprobs=args.reference_logprobs,
                          **_beam_cache(args))
    return _run("candidates", args, decode, args.splits)


def _cmd_predict(args: argparse.Namespace) -> int:
    decode = DecodeConfig(mode="greedy" if not args.constrained else "beam", num_return_sequences=1,
                          num_beams=args.beams if args.constrained else 1, constrained=args.constrained,
                          exclude_history=False, exclude_target=False, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, **_beam_cache(args))
    return _run("predictions", args, decode, [args.split])


def add_generation_parsers(sub) -> None:
    g = sub.add_parser("generate", help="self-play candidates: trie-constrained (diverse) beam search on Ray Data",
                       description="Generate candidate items for each sample with the model's own decoding, "
                                   "constrained to catalog titles. Writes OUT/candidates.parquet.")
    _model_args(g)
    g.add_argument("--splits", nargs="+", default=["train", "valid"])
    g.add_argument("--mode", default="diverse_beam", choices=["diverse_beam", "beam", "sample"])
    g.add_argument("--n", type=int_at_least(1), default=10, help="candidates per sample (num_return_sequences)")
    g.add_argument("--beams", type=int_at_least(1), help="default: 2n (diverse_beam) or n (beam)")
    g.add_argument("--groups", type=int_at_least(1), help="beam groups (default: n for diverse_beam)")
    g.add_argument("--diversity-penalty", type=number_above(0, inclusive=True), default=1.0)
    g.add_argument("--temperature", type=number_above(0), default=1.0)
    g.add_argument("--top-k", type=int_at_least(0), default=50)
    g.add_argument("--top-p", type=share, default=1.0)
    g.add_argument("--keep-history", action="store_true", help="do not exclude history items inside the constraint")
    g.add_argument("--keep-target", action="store_true", help="do not exclude the ground truth inside the constraint")
    g.add_argument("--reference-logprobs", action="store_true",
                   help="also store each candidate's log-prob under the model by teacher forcing")
    g.add_argument("--seed", type=int_at_least(0), default=0)
    g.set_defaults(func=_cmd_generate)

    p = sub.add_parser("predict", help="test predictions in the published format (greedy or constrained)",
                       description="Write OUT/predictions.json ({prompt, prediction, ground_truth}) for "
                                   "`raydpo evaluate`.")
    _model_args(p)
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--constrained", action="store_true", help="top trie-constrained beam instead of free greedy")
    p.add_argument("--beams", type=int_at_least(1), default=1)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None, help="default 50 (free) or the trie depth")
    p.set_defaults(func=_cmd_predict)
