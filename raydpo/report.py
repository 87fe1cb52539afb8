"""``raydpo report RUN_DIR``: a run or a search as a markdown table in the style of the
published tables (one row per method, metrics at k = 5 and 10), with plots.

A pipeline run directory holds ``evaluate/<key>/`` folders (one per evaluated configuration);
a search directory holds ``trials.csv``. Either is rendered to ``report.md`` beside a
``report.png`` (NDCG@10 against ORRatio@10, one point per method).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import DataError, RaydpoError
from .readers import json_kind, one_line, read_json, read_text
from .io import atomic_path, write_text

COLUMNS = ["NDCG", "HR", "DivRatio", "ORRatio", "MGU", "DGU"]


def _method_label(cfg: dict) -> str:
    a, s = cfg.get("alignment", {}), cfg.get("sampling", {})
    loss = a.get("loss", "sigmoid")
    trainer = {"sigmoid": "DPO", "sdpo": "S-DPO", "dsdpo": "DS-DPO"}.get(loss, loss)
    label = f"{trainer} {s.get('strategy', '?')}"
    if s.get("n_negatives", 1) > 1:
        label += f" x{s['n_negatives']}"
    if a.get("stages"):
        label = "curriculum " + " > ".join(st["name"] for st in a["stages"])
    return f"{label} (beta {a.get('beta')}, {a.get('epochs')} ep)"


def collect_run(run_dir: Path) -> pd.DataFrame:
    rows = []
    for done in sorted((run_dir / "evaluate").glob("*/_SUCCESS")):
        summary = read_json(done)
        if not isinstance(summary, dict):
            raise DataError(f"expected a JSON object, got a JSON {json_kind(summary)}", path=done)
        metrics = summary.get("metrics") or read_json(done.parent / "metrics.json")
        _check_metrics(metrics, done if summary.get("metrics") else done.parent / "metrics.json")
        # the config of the whole chain lives in the align stage's sibling runs; the run's
        # last_run.json or the evaluate stage's params tell the split; the method comes from
        # the matching align stage config
        cfg = _chain_config(run_dir, summary.get("key"))
        row = {"method": _method_label(cfg) if cfg else done.parent.name, "split": cfg.get("split", "")}
        for k, m in metrics.items():
            for name, v in m.items():
                row[f"{name}@{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def _chain_config(run_dir: Path, evaluate_key: str | None) -> dict:
    # each stage writes the params that made its key; walk the recorded chains
    chains = run_dir / "chains"
    if evaluate_key and (chains / f"{evaluate_key}.json").exists():
        cfg = read_json(chains / f"{evaluate_key}.json")
        if not isinstance(cfg, dict):
            raise DataError(f"expected a JSON object, got a JSON {json_kind(cfg)}", path=chains / f"{evaluate_key}.json")
        return cfg
    return {}


def _check_metrics(metrics, path: Path) -> None:
    """``{k: {metric: number}}``, else a DataError naming the file and the key path."""
    if not isinstance(metrics, dict):
        raise DataError(f"expected a JSON object of metrics keyed by k, got a JSON {json_kind(metrics)}",
                        path=path, field="metrics")
    for k, m in metrics.items():
        if not isinstance(m, dict):
            raise DataError(f"expected a JSON object of metrics, got a JSON {json_kind(m)}", path=path,
                            field=f"metrics.{k}")
        for name, v in m.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DataError(f"expected a number, got {v!r:.40}", path=path, field=f"metrics.{k}.{name}")


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    import io

    text = read_text(path)
    try:
        frame = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DataError(f"not a readable CSV file: {one_line(e)}", path=path) from None
    for c in required:
        if c not in frame.columns:
            raise DataError(f"missing column (the file has columns {list(frame.columns)[:10]})", path=path, field=c)
    for c in frame.columns:
        if "@" in c:
            vals = pd.to_numeric(frame[c], errors="coerce")
            bad = vals.isna() & frame[c].notna()
            if bad.any():
                r = int(bad.to_numpy().nonzero()[0][0])
                raise DataError(f"expected a number, got {frame[c].iloc[r]!r:.40}", path=path, record=r, field=c)
            frame[c] = vals
    return frame


def collect_search(search_dir: Path) -> pd.DataFrame:
    trials = _read_csv(search_dir / "trials.csv", ("trial", "status"))
    trials = trials[trials["status"] == "OK"].copy()
    params = [c for c in trials.columns if "." in c and "@" not in c]
    trials["method"] = trials[params].astype(str).agg(", ".join, axis=1) if params else trials["trial"]
    return trials


def markdown_table(frame: pd.DataFrame, ks=(5, 10)) -> str:
    head = ["Method"] + [f"{c}@{k}" for k in ks for c in COLUMNS]
    if "Predict_NotIn_Ratio@5" in frame.columns:
        head.append("NotIn")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in frame.iterrows():
        cells = [str(r["method"])]
        for k in ks:
            for c in COLUMNS:
                v = r.get(f"{c}@{k}")
                cells.append("" if v is None or pd.isna(v) else f"{v:.4f}")
        if "Predict_NotIn_Ratio@5" in frame.columns:
            cells.append(f"{r['Predict_NotIn_Ratio@5']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_methods(frame: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.scatter(frame["ORRatio@10"], frame["NDCG@10"], color="#2e86ab")
    for _, r in frame.iterrows():
        ax.annotate(str(r["method"])[:40], (r["ORRatio@10"], r["NDCG@10"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=7)
    ax.set_xlabel("ORRatio@10 (lower: less popularity concentration)")
    ax.set_ylabel("NDCG@10 (higher: more accurate)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def report(path: str | Path, out: str | Path | None = None) -> Path:
    path = Path(path)
    if not path.exists():
        raise RaydpoError(f"{path}: not found")
    if not path.is_dir():
        raise RaydpoError(f"{path}: is a file; expected a run directory or a search directory")
    if (path / "trials.csv").exists() or (path / "trials.csv").is_symlink():
        frame, kind = collect_search(path), "search"
    elif (path / "evaluate").exists():
        frame, kind = collect_run(path), "run"
    else:
        raise RaydpoError(f"{path}: neither a run directory (evaluate/) nor a search directory (trials.csv)")
    if frame.empty:
        raise RaydpoError(f"{path}: no finished evaluations to report")
    for c in ("NDCG@10", "ORRatio@10"):
        if c not in frame.columns:
            raise DataError(f"no {c} in the results (the report plots NDCG@10 against ORRatio@10)",
                            path=path / "trials.csv" if kind == "search" else path, field=c)
    out = Path(out or path / "report.md")
    png = plot_methods(frame, out.with_suffix(".png"))
    parts = [f"# raydpo {kind} report: {path.name}\n", markdown_table(frame), f"\n![NDCG vs ORRatio]({png.name})\n"]
    if (path / "pareto.png").exists():
        parts.append("\n## Pareto front\n\n" + read_text(path / "pareto.md") + "\n![Pareto front](pareto.png)\n")
    write_text(out, "\n".join(parts))
    print("\n".join(parts[:2]))
    print(f"wrote {out}")
    return out
