"""The ``raydpo`` command line.

    raydpo demo                       run the embedded default end to end (synthetic data)
    raydpo evaluate PRED --data DIR   metrics of a predictions file (published format)
    raydpo compare A B [C ...]        intervals and paired significance tests between methods
    raydpo data synth|convert|import-logs|stats|fetch
    raydpo data import-candidates|import-preferences   the research code's files into raydpo's tables
    raydpo generate --data DIR --out DIR   self-play candidates (constrained beam search, Ray Data)
    raydpo predict --data DIR --out DIR    test predictions in the published format

Every command prints ``--help``. Bad input exits with status 2 and one line naming the file,
the record and the field.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .cli_args import (RaydpoArgumentParser, int_at_least, parse_sets, print_error, report_unexpected,
                       share)
from .errors import RaydpoError


def _check_out(args: argparse.Namespace, path, *, kind: str, folder: bool, inputs=(), option: str = "--out",
               resumable: bool = False):
    """Refuse an output path that could destroy data, before any work (see raydpo.outputs)."""
    from .outputs import check_output

    return check_output(path, kind=kind, folder=folder, inputs=inputs, option=option, resumable=resumable,
                        overwrite=getattr(args, "overwrite", False))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_file, format_table, to_json
    from .outputs import record_file

    if args.json:
        _check_out(args, args.json, kind="metrics", folder=False, inputs=[args.predictions, args.data], option="--json")
    if args.per_user:
        _check_out(args, args.per_user, kind="per-user", folder=False, inputs=[args.predictions, args.data],
                   option="--per-user")
        if args.json and Path(args.json).resolve() == Path(args.per_user).resolve():
            raise RaydpoError(f"--per-user {args.per_user}: the same path as --json; choose another file")
    results = evaluate_file(args.predictions, args.data, ks=args.k, json_out=args.json, encoder=args.encoder,
                            protocol=args.protocol, split=args.split, progress=not args.quiet,
                            per_user_out=args.per_user)
    print(format_table(results))
    if args.per_user:
        record_file(args.per_user, "per-user")
        print(f"wrote {args.per_user}")
    if args.json:
        record_file(args.json, "metrics")
        print(f"wrote {args.json}")
    elif args.print_json:
        print(json.dumps(to_json(results), indent=2))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .cli_args import check_synth_memory
    from .data.synthetic import SyntheticConfig, generate

    check_synth_memory(args.users, args.history_len)  # before any output is touched or memory is taken
    _check_out(args, args.out, kind="dataset", folder=True)
    ds = generate(SyntheticConfig(n_users=args.users, n_items=args.items, n_genres=args.genres,
                                  history_len=args.history_len, seed=args.seed))
    ds.save(args.out)
    print(f"wrote {args.out}: {len(ds.catalog)} items, {len(ds.samples)} samples")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .data import load_dataset

    _check_out(args, args.out, kind="dataset", folder=True, inputs=[args.src], option="OUT")
    ds = load_dataset(args.src)
    ds.save(args.out)
    counts = ds.samples.frame["split"].value_counts().to_dict()
    print(f"wrote {args.out}: {len(ds.catalog)} items, samples {counts}")
    return 0


def _cmd_import_logs(args: argparse.Namespace) -> int:
    from .data.interactions import read_interactions

    _check_out(args, args.out, kind="dataset", folder=True, inputs=[args.interactions, args.items])
    ds = read_interactions(args.interactions, args.items, history_len=args.history_len,
                           min_interactions=args.min_interactions, train_samples=args.train_samples)
    ds.save(args.out)
    counts = ds.samples.frame["split"].value_counts().to_dict()
    print(f"wrote {args.out}: {len(ds.catalog)} items, samples {counts}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from .data.fetch import fetch

    _check_out(args, args.out, kind="dataset", folder=True)
    fetch(args.name, args.out, base_url=args.base_url)
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from collections import Counter

    import numpy as np

    from .data import load_dataset
    from .data.stats import cluster_names, exposure, interest_clusters

    ds = load_dataset(args.data)
    counts = ds.samples.frame["split"].value_counts().to_dict()
    print(f"{ds.name}: {len(ds.catalog)} items, {len(ds.catalog.genre_vocab)} genres, samples {counts}")
    exp = exposure(ds.catalog, ds.samples, scope=args.scope, split=args.split)
    top = np.argsort(-exp.counts, kind="stable")[:5]
    print(f"exposure ({args.scope}): {int((exp.counts > 0).sum())} items seen; top: "
          + ", ".join(f"{ds.catalog.titles[i]!r} x{int(exp.counts[i])}" for i in top))
    s = ds.split(args.split)
    clusters = cluster_names(ds.catalog, interest_clusters(ds.catalog, s, k=args.cluster_k,
                                                           ignore_genres_above=args.ignore_genres_above))
    common = Counter(tuple(sorted(c)) for c in clusters).most_common(3)
    print(f"interest clusters (top-{args.cluster_k}, {args.split}): most common " +
          "; ".join(f"{list(c)} x{n}" for c, n in common))
    return 0


def _parse_sets(items: list) -> dict:
    """Every ``--set`` flag, accumulated (see :func:`raydpo.cli_args.parse_sets`)."""
    return parse_sets(items)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import run_pipeline

    cfg = load_config(args.config, _parse_sets(args.set))
    run_pipeline(cfg, from_stage=args.from_stage, until=args.until, progress=not args.quiet)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .tuning.search import run_search

    run_search(args.search_space, out_dir=args.out, resume=args.resume, num_samples=args.num_samples,
               name=args.name)
    return 0


def _cmd_tune_eval(args: argparse.Namespace) -> int:
    from .tuning.search import evaluate_best

    evaluate_best(args.search_dir, top=args.top, split=args.split)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .outputs import record_file
    from .report import report

    extras = []
    for item in args.extra or []:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise RaydpoError(f"--extra {item!r}: expected NAME=FILE (a row name and a predictions JSON file)")
        if not Path(file).is_file():
            raise RaydpoError(f"--extra {name}: {file}: no such predictions file")
        extras.append((name, file))
    if args.out:  # the default (inside the run or search folder) is raydpo's own place
        out = Path(args.out)
        for p, kind in ((out, "report"), (out.with_suffix(".png"), "report-plot"),
                        (out.with_suffix(".csv"), "report-table")):
            _check_out(args, p, kind=kind, folder=False, option="--out")
    written = report(args.path, args.out, extras=extras, data=args.data, split=args.split, ci=args.ci)
    if args.out:
        record_file(written, "report")
        record_file(Path(written).with_suffix(".png"), "report-plot")
        record_file(Path(written).with_suffix(".csv"), "report-table")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .evaluation.compare import markdown, run_compare, split_name, to_csv
    from .io import write_json
    from .outputs import record_file

    if args.json:
        _check_out(args, args.json, kind="comparison", folder=False, option="--json",
                   inputs=[split_name(m)[1] for m in args.methods] + [args.data])
    result = run_compare(args.methods, args.data, baseline=args.baseline, ks=args.k, n_resamples=args.resamples,
                         confidence=args.confidence, seed=args.seed, test=args.test, interval=args.interval,
                         metrics=args.metrics, encoder=args.encoder, protocol=args.protocol, split=args.split,
                         progress=not args.quiet)
    print(markdown(result) if args.format == "markdown" else to_csv(result), end="")
    if args.json:
        write_json(args.json, result)
        record_file(args.json, "comparison")
        print(f"wrote {args.json}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .report import report
    from .tuning.search import run_search

    root = Path(__file__).resolve().parents[1]
    # a Ray instance of its own, never a cluster that happens to run on this machine
    result = run_search(root / "search_spaces" / "quickstart.yaml", out_dir=args.out, ray_address="local")
    report(result.out_dir)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .outputs import claim_folder

    _check_out(args, args.out, kind="demo", folder=True, resumable=True)
    claim_folder(args.out, "demo")
    run_demo(Path(args.out), n_users=args.users, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = RaydpoArgumentParser(prog="raydpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("evaluate", help="evaluate a predictions file (published format)",
                       description="Evaluate a JSON list of {prompt, prediction, ground_truth} against a dataset "
                                   "split with the published protocol (SBERT L2 grounding).")
    e.add_argument("predictions", help="predictions JSON file")
    e.add_argument("--data", required=True, help="dataset folder (raydpo format or SPRec format)")
    e.add_argument("--k", type=int_at_least(1), nargs="+", default=[5, 10], help="cut-offs (default: 5 10)")
    e.add_argument("--json", help="write metrics as JSON keyed by k to this file")
    e.add_argument("--print-json", action="store_true", help="print the JSON to stdout")
    e.add_argument("--per-user", metavar="FILE.parquet",
                   help="also write per-user results (each row's target, top-k items, target rank, metric "
                        "contributions and genre masses) for intervals and paired tests (`raydpo compare`)")
    e.add_argument("--overwrite", action="store_true", help="replace a metrics or per-user file raydpo wrote earlier")
    e.add_argument("--encoder", default="minilm-onnx",
                   help="minilm-onnx (offline default), st:NAME_OR_PATH, or a .onnx file")
    e.add_argument("--protocol", default="reference", choices=["reference", "valid_only"],
                   help="reference: denominators are all rows (published); valid_only: rows with a catalog target")
    e.add_argument("--split", default="test", choices=["train", "valid", "test"])
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_evaluate)

    d = sub.add_parser("data", help="create, convert and inspect datasets").add_subparsers(
        dest="data_command", required=True, metavar="DATA_COMMAND")
    s = d.add_parser("synth", help="write a deterministic synthetic dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int_at_least(1), default=2000)
    s.add_argument("--items", type=int_at_least(3), default=500)
    s.add_argument("--genres", type=int_at_least(1), default=8)
    s.add_argument("--history-len", type=int_at_least(1), default=10)
    s.add_argument("--seed", type=int_at_least(0), default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a dataset folder raydpo wrote earlier")
    s.set_defaults(func=_cmd_synth)
    c = d.add_parser("convert", help="convert a SPRec-format folder into raydpo's format")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--overwrite", action="store_true", help="replace a dataset folder raydpo wrote earlier")
    c.set_defaults(func=_cmd_convert)
    il = d.add_parser("import-logs", help="build leave-last-out samples from (user_id, item_id, timestamp) logs")
    il.add_argument("--interactions", required=True, help="CSV or Parquet with user_id, item_id, timestamp")
    il.add_argument("--items", required=True, help="CSV or Parquet with item_id, title, genres")
    il.add_argument("--out", required=True)
    il.add_argument("--history-len", type=int_at_least(1), default=10)
    il.add_argument("--min-interactions", type=int_at_least(3, " (a test target, a valid target and one history "
                                                              "item)"), default=3,
                    help="drop users with fewer interactions (default and minimum: 3)")
    il.add_argument("--train-samples", choices=["all", "last"], default="all")
    il.add_argument("--overwrite", action="store_true", help="replace a dataset folder raydpo wrote earlier")
    il.set_defaults(func=_cmd_import_logs)
    f = d.add_parser("fetch", help="download a public dataset (goodreads: the SPRec / ClusterExposure-DPO sample)")
    f.add_argument("name", choices=["goodreads"])
    f.add_argument("--out", default="data/goodreads")
    f.add_argument("--base-url", help="fetch every file from BASE/<file> (a mirror) instead of GitHub")
    f.add_argument("--overwrite", action="store_true", help="replace a dataset folder raydpo wrote earlier")
    f.set_defaults(func=_cmd_fetch)
    st = d.add_parser("stats", help="exposure and interest-cluster summary of a dataset")
    st.add_argument("data")
    st.add_argument("--scope", choices=["split_histories", "train_interactions"], default="split_histories")
    st.add_argument("--split", default="train", choices=["train", "valid", "test"])
    st.add_argument("--cluster-k", type=int_at_least(1), default=3)
    st.add_argument("--ignore-genres-above", type=share, default=None,
                    help="leave out genres carried by more than this share of items (e.g. 0.9)")
    st.set_defaults(func=_cmd_stats)
    from .data.research_cli import add_import_parsers

    add_import_parsers(d)  # import-candidates, import-preferences (the research code's files)

    from .generation.cli import add_generation_parsers
    from .sampling.cli import add_sampling_parser
    from .training.cli import add_training_parsers

    add_generation_parsers(sub)
    add_sampling_parser(sub)
    add_training_parsers(sub)

    r = sub.add_parser("run", help="run (or resume) the whole pipeline from a YAML config",
                       description="Stages: data, sft, generate, sample, align, predict, evaluate. Finished "
                                   "stages are cached by a hash of the config that affects them.")
    r.add_argument("config", help="pipeline YAML (see configs/)")
    r.add_argument("--from", dest="from_stage", help="force a rerun from this stage on")
    r.add_argument("--until", default="evaluate", help="stop after this stage")
    r.add_argument("--set", action="append", nargs="+", metavar="KEY=VALUE",
                   help="override config fields, e.g. sampling.strategy=random (repeatable; each key once)")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(func=_cmd_run)

    t = sub.add_parser("tune", help="multi-objective Ray Tune + Optuna search (Pareto front)",
                       description="Search pipeline configs; rank trials on NDCG (max) and ORRatio (min).")
    t.add_argument("search_space", help="search space YAML (see search_spaces/)")
    t.add_argument("--out", help="result folder (default: STORAGE_ROOT/tune/NAME with a storage root "
                                 "(ray.storage_path or RAYDPO_STORAGE), else RUN_DIR/tune/NAME)")
    t.add_argument("--name", help="the search's name (default: the file's name: field, else its stem); "
                                  "--resume finds a search by it")
    t.add_argument("--resume", action="store_true",
                   help="continue the search of this name (under the storage root), or say there is none")
    t.add_argument("--num-samples", type=int_at_least(1), help="override num_samples")
    t.set_defaults(func=_cmd_tune)

    te = sub.add_parser("tune-eval", help="re-evaluate the Pareto-front trials of a search on the test split")
    te.add_argument("search_dir")
    te.add_argument("--top", type=int_at_least(1))
    te.add_argument("--split", default="test", choices=["valid", "test"])
    te.set_defaults(func=_cmd_tune_eval)

    rp = sub.add_parser("report", help="markdown table (published style) with 95% intervals and plots of a run or "
                                       "a search", description="The published-style table (one row per method, "
                                       "k = 5 and 10) with each value's 95% interval (bootstrap over users), a plot "
                                       "with interval bars, and for a search its Pareto front and significance tests.")
    rp.add_argument("path", help="a pipeline run directory or a search directory")
    rp.add_argument("--out", help="markdown file (default: PATH/report.md); the plot (.png) and the table with intervals (.csv) go beside it")
    rp.add_argument("--overwrite", action="store_true", help="replace a report raydpo wrote earlier at --out")
    rp.add_argument("--extra", action="append", metavar="NAME=FILE",
                    help="add a published predictions file (JSON, published format) as the row NAME, evaluated "
                         "with the same evaluator on the same split (repeatable)")
    rp.add_argument("--data", help="dataset folder of the --extra files (default: the one the run evaluated on)")
    rp.add_argument("--split", choices=["valid", "test"],
                    help="split of the --extra files (default: the run's evaluation split)")
    rp.add_argument("--ci", choices=["pm", "bracket", "off"], default="pm",
                    help="how intervals are shown: pm = 0.0211 ± 0.0040 (the larger half of the 95%% interval), "
                         "bracket = 0.0211 [0.0171, 0.0251], off = values only (default: pm)")
    rp.set_defaults(func=_cmd_report)

    from .cli_args import confidence_level
    from .evaluation.metrics import METRIC_NAMES

    cp = sub.add_parser(
        "compare", help="methods side by side: bootstrap intervals and paired significance tests over users",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="For every metric at every k: each method's value with its bootstrap confidence interval over "
                    "the test users, and each method's difference to the baseline on the same users with its "
                    "interval, a two-sided p-value (paired bootstrap or paired permutation test) and the "
                    "Holm-corrected p-value over all comparisons shown (* = significant).\n\n"
                    "Each METHOD is [NAME=]PATH: a predictions file (published JSON format; evaluated here on "
                    "--data), a per-user results file (raydpo evaluate --per-user), a folder holding one of these "
                    "(a published result folder, an evaluate stage), a pipeline run folder (every evaluated "
                    "configuration) or a search folder (every successful trial).\n\n"
                    "example: raydpo compare SPRec=oracle/SPRec_Reproduction/raw_results_1000.json "
                    "CE=oracle/ClusterExposure_model__Div_10_1.0__clusterout_low --data data/goodreads")
    cp.add_argument("methods", nargs="+", metavar="METHOD", help="[NAME=]PATH; one gives its intervals, two or more are compared")
    cp.add_argument("--data", help="dataset folder the predictions files were predicted on (needed to evaluate "
                                   "predictions files; run folders use their own)")
    cp.add_argument("--baseline", help="the method the others are compared with (a NAME or PATH; default: the first)")
    cp.add_argument("--k", type=int_at_least(1), nargs="+", help="cut-offs (default: 5 10, or those evaluated)")
    cp.add_argument("--metrics", nargs="+", choices=list(METRIC_NAMES), metavar="METRIC",
                    help=f"metrics to show (default: all of {' '.join(METRIC_NAMES)})")
    cp.add_argument("--resamples", type=int_at_least(1), default=10000, help="bootstrap resamples (default: 10000)")
    cp.add_argument("--confidence", type=confidence_level, default=0.95,
                    help="confidence level of the intervals; 1 - it is the significance level (default: 0.95)")
    cp.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the resampling (default: 0)")
    cp.add_argument("--test", choices=["bootstrap", "permutation"], default="bootstrap",
                    help="paired test of the differences: bootstrap (resample users) or permutation (swap the "
                         "two methods' results of random users); the difference's interval is always the paired "
                         "bootstrap one (default: bootstrap)")
    cp.add_argument("--interval", choices=["percentile", "bca"], default="percentile",
                    help="bootstrap interval: percentile, or bca (bias-corrected and accelerated; adds one "
                         "recomputation per user) (default: percentile)")
    cp.add_argument("--format", choices=["markdown", "csv"], default="markdown", help="table printed (default: markdown)")
    cp.add_argument("--json", metavar="FILE", help="write every number as JSON (per method, k and metric)")
    cp.add_argument("--overwrite", action="store_true", help="replace a JSON file raydpo wrote earlier")
    cp.add_argument("--encoder", default="minilm-onnx", help="encoder for predictions files (as in raydpo evaluate)")
    cp.add_argument("--protocol", default="reference", choices=["reference", "valid_only"],
                    help="protocol for predictions files (as in raydpo evaluate)")
    cp.add_argument("--split", default="test", choices=["train", "valid", "test"],
                    help="split of the predictions files (default: test)")
    cp.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    cp.set_defaults(func=_cmd_compare)

    q = sub.add_parser("quickstart", help="the main job on the embedded default: tiny model, synthetic data, "
                                          "a 4-strategy search, Pareto table and plot")
    q.add_argument("--out", default=None)
    q.set_defaults(func=_cmd_quickstart)

    demo = sub.add_parser("demo", help="the embedded default: synthetic data, baseline predictions, evaluation")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--users", type=int_at_least(10), default=2000)
    demo.add_argument("--seed", type=int_at_least(0), default=0)
    demo.set_defaults(func=_cmd_demo)
    return p


def _terminate_cleanly():
    """SIGTERM (``kill``, ``ray job stop``) unwinds like Ctrl-C, so temporaries are removed on the
    way out. Returns the previous handler (``None``: not installed)."""
    import signal
    import threading

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, handler)
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, one line already printed)
        return e.code if isinstance(e.code, int) else 2
    previous = _terminate_cleanly()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except RaydpoError as e:
        print_error(str(e))
        return 2
    except (OSError, UnicodeError, RecursionError, MemoryError) as e:
        # a last resort: the specific checks name the file and the record; this keeps a traceback out
        if args.verbose:
            logging.getLogger("raydpo").exception("unexpected error")
        print_error(report_unexpected(e))
        return 2
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
