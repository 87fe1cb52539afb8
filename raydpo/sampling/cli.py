"""``raydpo sample``: choose negatives from self-play candidates and write preference datasets.

Wire it into the main parser with ``add_sampling_parser(subparsers)``.

    raydpo sample --data DIR --candidates CAND_DIR_OR_PARQUET --strategy NAME [NAME ...]
                  [--n-negatives N] [--seed S] [--out FILE.parquet|FILE.jsonl|DIR] [--ray]
    raydpo sample --list
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import int_at_least, number_above, share
from ..errors import RaydpoError


def _cmd_sample(args: argparse.Namespace) -> int:
    from .strategies import describe_strategies, load_plugin

    for plugin in args.plugin or []:
        load_plugin(plugin)
    if args.list:
        print(describe_strategies())
        return 0
    if not args.strategy or not args.data or not args.candidates:
        raise RaydpoError("raydpo sample needs --data, --candidates and --strategy (or --list)")
    from ..data import load_dataset
    from .lightgcn import LightGCN, LightGCNConfig
    from .run import sample_to_file
    from .strategies import get_strategy

    strategies = [get_strategy(s) for s in args.strategy]  # unknown names fail here, listing the known ones
    ds = load_dataset(args.data)
    cand = Path(args.candidates)
    # default: a folder beside the candidates (never inside an input)
    out = Path(args.out) if args.out else cand.parent / ("negatives" if cand.is_file() else f"{cand.name}-negatives")
    if args.out is None and len(strategies) == 1:
        out = out / f"{strategies[0].name}.{args.format}"
    from ..outputs import check_output

    inputs = [args.data, args.candidates, args.lightgcn, *(p for p in (args.plugin or []) if p.endswith(".py"))]
    as_file = out.suffix in (".parquet", ".jsonl")
    check_output(out, kind="negatives", folder=not as_file, inputs=inputs, overwrite=args.overwrite)
    if as_file:
        from .run import summary_path

        check_output(summary_path(out), kind="negatives-summary", folder=False, inputs=inputs,
                     overwrite=args.overwrite)
    if args.save_lightgcn:
        check_output(Path(args.save_lightgcn).with_suffix(".npz"), kind="lightgcn", folder=False,
                     inputs=[*inputs, out], overwrite=args.overwrite, option="--save-lightgcn")
    # every input and option is checked before any expensive work (LightGCN training, selection)
    if as_file and len(strategies) != 1:
        raise RaydpoError(f"{out}: one output file but {len(strategies)} strategies; give a folder instead")
    from .annotate import annotate

    ann = annotate(ds, args.candidates, exposure_scope=args.exposure_scope, cluster_k=args.cluster_k,
                   ignore_genres=tuple(args.ignore_genres), ignore_genres_above=args.ignore_genres_above,
                   on_unknown_item=args.on_unknown_item)
    lightgcn = LightGCN.load(args.lightgcn) if args.lightgcn else None
    if lightgcn is None and any(s.needs_embeddings for s in strategies):
        cfg = LightGCNConfig(seed=args.seed, epochs=args.lightgcn_epochs)
        model = LightGCN.fit(ds, cfg)
        if not args.quiet:
            print(f"lightgcn: {model.n_users} users, {model.n_interactions} interactions, {int(model.seen.sum())} "
                  f"items seen; BPR loss {model.initial_loss:.4f} -> {model.losses[-1]:.4f} in {model.seconds:.1f} s")
        if args.save_lightgcn:
            from ..outputs import record_file

            record_file(model.save(args.save_lightgcn), "lightgcn")
        lightgcn = model
    kwargs = dict(lightgcn=lightgcn, embedding_kind=args.embedding_kind, batch_size=args.batch_size)
    if args.ray:
        kwargs["num_cpus"] = args.num_cpus
    sample_to_file(ds, ann, [s.name for s in strategies], out, seed=args.seed,
                   n_negatives=args.n_negatives, use_ray=args.ray, quiet=args.quiet, fmt=args.format,
                   pairs=args.pairs, **kwargs)
    return 0


def add_sampling_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sample`` command to an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "sample", help="choose negatives from self-play candidates (DPO / S-DPO preference data)",
        description="Annotate candidates (exposure, interest cluster) and choose negatives with one or more "
                    "strategies; writes each preference dataset with a summary.json beside it and prints the "
                    "summary. `raydpo sample --list` shows every strategy with its rule.")
    p.add_argument("--data", help="dataset folder")
    p.add_argument("--candidates", help="candidate-generation folder (with _SUCCESS) or a candidates .parquet")
    p.add_argument("--strategy", nargs="+", help="strategy name(s); several share one annotation")
    p.add_argument("--n-negatives", type=int_at_least(1), default=None, help="negatives per pick (default: the strategy's)")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out", help="FILE.parquet | FILE.jsonl (one strategy) or a folder (default: "
                                 "negatives/<strategy>.<format> beside a candidates file; CAND_DIR-negatives/ beside a candidates folder)")
    p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet", help="file format inside a folder")
    p.add_argument("--pairs", choices=["first", "explode"], default=None,
                   help="write TRL pairs (rejected: str): the first negative, or one row per negative "
                        "(default: lists, rejected: [...], for S-DPO)")
    p.add_argument("--ray", action="store_true", help="select in a Ray Data map (large candidate sets)")
    p.add_argument("--num-cpus", type=number_above(0), default=0.5, help="CPUs per Ray task (fractional)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16384, help="records per vectorised chunk")
    p.add_argument("--exposure-scope", choices=["split_histories", "split", "candidates", "train_interactions"],
                   default="split_histories",
                   help="what item exposure counts: split_histories (alias split; default) the history slots of "
                        "the whole split of each record; candidates the history slots of the candidate records of "
                        "that split only, as the research code counted over the file it annotated (differs when "
                        "the candidates cover part of a split); train_interactions the distinct train interactions")
    p.add_argument("--cluster-k", type=int_at_least(1), default=3)
    p.add_argument("--ignore-genres", nargs="*", default=[], help="genres never part of an interest cluster")
    p.add_argument("--ignore-genres-above", type=share, default=None,
                   help="leave genres carried by more than this share of items out of clusters (e.g. 0.9)")
    p.add_argument("--on-unknown-item", choices=["error", "drop"], default="error",
                   help="candidate ids outside the catalog: fail (default) or drop and count")
    p.add_argument("--lightgcn", help="LightGCN embeddings (.npz from --save-lightgcn); default: train one")
    p.add_argument("--save-lightgcn", help="save the trained LightGCN embeddings here (.npz)")
    p.add_argument("--lightgcn-epochs", type=int_at_least(1), default=30)
    p.add_argument("--embedding-kind", choices=["propagated", "layer0"], default="propagated",
                   help="LightGCN output (default) or the layer-0 vectors the reference used")
    p.add_argument("--plugin", action="append", help="module or .py file registering extra strategies (repeatable)")
    p.add_argument("--list", action="store_true", help="list the strategies and exit")
    p.add_argument("--overwrite", action="store_true", help="replace negatives (and LightGCN files) raydpo wrote earlier")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_sample)
    return p
