"""``raydpo data import-candidates`` and ``raydpo data import-preferences``: the research code's
files into raydpo's tables (see :mod:`raydpo.data.research`; formats in docs/formats.md).

    raydpo data import-candidates  --data DIR --train FILE [--valid FILE] [--test FILE] --out DIR
                                   [--unknown keep|drop] [--unmatched error|skip] [--overwrite]
        -> DIR/candidates.parquet + DIR/_SUCCESS: `raydpo sample --candidates DIR` reads it

    raydpo data import-preferences --data DIR --train FILE [--valid FILE] [--test FILE] --out DIR
                                   [--unknown keep|drop] [--unmatched error|skip] [--keep-text]
                                   [--format parquet|jsonl] [--strategy LABEL] [--overwrite]
        -> DIR/<split>.parquet + DIR/import.json: `raydpo train dpo` (data: DIR/train.parquet)
"""

from __future__ import annotations

import argparse
from pathlib import Path

CANDIDATES_KIND = "imported-candidates"
PREFERENCES_KIND = "imported-preferences"


def _files(args: argparse.Namespace) -> dict[str, str]:
    from ..errors import RaydpoError

    files = {s: getattr(args, s) for s in ("train", "valid", "test") if getattr(args, s)}
    if not files:
        raise RaydpoError(f"raydpo data {args.data_command} needs at least one research file: --train, --valid "
                          "or --test FILE")
    return files


def _check(args: argparse.Namespace, kind: str) -> dict[str, str]:
    """Every path check before anything is read or written."""
    from ..outputs import check_output
    from ..readers import check_file

    files = _files(args)
    check_output(args.out, kind=kind, folder=True, inputs=[args.data, *files.values()], overwrite=args.overwrite)
    for path in files.values():
        check_file(path)
    return files


def _cmd_import_candidates(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from ..io import atomic_path, write_json
    from . import load_dataset
    from .research import format_counts, import_candidates

    files = _check(args, CANDIDATES_KIND)
    ds = load_dataset(args.data)
    table, summary = import_candidates(ds, files, unknown=args.unknown, unmatched=args.unmatched)
    out = Path(args.out)
    with atomic_path(out, kind=CANDIDATES_KIND) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(table, tmp / "candidates.parquet")
        write_json(tmp / "_SUCCESS", {**summary, "rows": table.num_rows, "data": str(args.data)})
    print(f"wrote {out / 'candidates.parquet'}: {table.num_rows} records, {summary['candidates']} candidates")
    print(format_counts(summary))
    if summary["unknown_titles_kept"]:
        print(f"  note: {summary['unknown_titles_kept']} unknown titles kept with item id -1; "
              "`raydpo sample --on-unknown-item drop` drops and counts them")
    return 0


def _cmd_import_preferences(args: argparse.Namespace) -> int:
    from ..data.preference import write_preferences
    from ..io import atomic_path, write_json
    from . import load_dataset
    from .research import format_counts, import_preferences

    files = _check(args, PREFERENCES_KIND)
    ds = load_dataset(args.data)
    frames, summary = import_preferences(ds, files, unknown=args.unknown, unmatched=args.unmatched,
                                         keep_text=args.keep_text, strategy=args.strategy)
    out = Path(args.out)
    with atomic_path(out, kind=PREFERENCES_KIND) as tmp:
        tmp.mkdir(parents=True)
        for split, frame in frames.items():
            write_preferences(frame, tmp / f"{split}.{args.format}")
        write_json(tmp / "import.json", {"data": str(args.data), "format": args.format, **summary})
    written = ", ".join(f"{out / f'{s}.{args.format}'} ({len(f)} records)" for s, f in frames.items())
    print(f"wrote {written}")
    print(format_counts(summary))
    if summary["records_without_negatives"]:
        print(f"  skipped {summary['records_without_negatives']} records left without negatives")
    return 0


def add_import_parsers(data_sub) -> None:
    """Add ``import-candidates`` and ``import-preferences`` to the ``raydpo data`` subparsers."""
    common = ("Records are matched to the rows of the dataset split by their history (input, else prompt) and "
              "their target (chosen, else output); titles are looked up in the catalog after removing "
              "surrounding quotes, spaces and newlines. Formats: docs/formats.md.")
    specs = (
        ("import-candidates", "candidate files of the research code (JSON lists of {instruction, input, "
         "output|chosen, rejected: [...]}) -> raydpo's candidates table for `raydpo sample`",
         "Writes OUT/candidates.parquet (sample_id, candidate_item_ids, candidate_titles, source_file, "
         "source_record) and OUT/_SUCCESS (the counts); `raydpo sample --candidates OUT` reads it like a "
         "generated one. ", "drop", _cmd_import_candidates),
        ("import-preferences", "preference files of the research code ({prompt, chosen, rejected}) -> "
         "raydpo preference files for `raydpo train dpo`",
         "Writes OUT/<split>.parquet (sample_id, prompt, chosen, rejected: [...], chosen_item_id, "
         "rejected_item_ids, strategy) and OUT/import.json (the counts); give a training stage "
         "`data: OUT/train.parquet`. ", "keep", _cmd_import_preferences),
    )
    for name, help_, desc, unknown_default, func in specs:
        p = data_sub.add_parser(name, help=help_, description=desc + common)
        p.add_argument("--data", required=True, help="the dataset the files were made from (raydpo or SPRec folder)")
        for split in ("train", "valid", "test"):
            p.add_argument(f"--{split}", metavar="FILE", help=f"research file of the {split} split (.json list "
                                                              "or .jsonl)")
        p.add_argument("--out", required=True, help="output folder (new, empty, or an earlier import with --overwrite)")
        unknown_help = ("titles outside the catalog: keep them (item id -1, the text kept) or drop them; "
                        f"counted either way (default: {unknown_default}")
        unknown_help += (": `raydpo sample` needs catalog items; kept ones need `raydpo sample --on-unknown-item "
                         "drop`)") if name == "import-candidates" else (": training reads the texts)")
        p.add_argument("--unknown", choices=["keep", "drop"], default=unknown_default, help=unknown_help)
        p.add_argument("--unmatched", choices=["error", "skip"], default="error",
                       help="a record no split row matches: fail naming file, record and field (default), or "
                            "skip it and count it")
        if name == "import-preferences":
            p.add_argument("--keep-text", action="store_true",
                           help="keep the file's prompt/chosen/rejected texts verbatim (default: raydpo's prompt "
                                "of the matched row and '\"Title\"' responses, without the research files' "
                                "trailing newlines)")
            p.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
            p.add_argument("--strategy", default="imported", help="the strategy column's label (default: imported)")
        p.add_argument("--overwrite", action="store_true", help="replace an earlier import raydpo wrote at --out")
        p.set_defaults(func=func)


__all__ = ["add_import_parsers"]
