"""``raydpo report RUN_DIR``: a run or a search as a markdown table in the style of the
published tables (one row per method, metrics at k = 5 and 10), with plots.

A pipeline run directory holds ``evaluate/<key>/`` folders (one per evaluated configuration);
a search directory holds ``trials.csv``. Either is rendered to ``report.md`` beside a
``report.png`` (NDCG@10 against ORRatio@10, one point per method, with interval bars) and
``report.csv`` (every value with its interval).

Each value comes with its 95% interval: for a run, the bootstrap over users of the evaluate
stage's per-user results; for a search, the intervals in ``trials.csv``. ``--extra NAME=FILE``
adds published prediction files as rows, evaluated with the same evaluator on the same split
(and their intervals likewise). A search's ``significance.md`` is included.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import DataError, RaydpoError
from .readers import json_kind, one_line, read_json, read_text
from .io import atomic_path, write_text

COLUMNS = ["NDCG", "HR", "DivRatio", "ORRatio", "MGU", "DGU"]
REPORT_RESAMPLES = 2000  # bootstrap resamples over users for the intervals the report computes


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
        from .evaluation.stats import PER_USER_FILE, PerUser, flatten_metrics

        row.update(flatten_metrics(metrics))
        if (done.parent / PER_USER_FILE).exists():
            row.update(interval_row(PerUser.read(done.parent / PER_USER_FILE)))
        rows.append(row)
    return pd.DataFrame(rows)


def interval_row(per_user, confidence: float = 0.95) -> dict[str, float]:
    """``{"NDCG@10_ci_low": ..., "NDCG@10_ci_high": ...}``: bootstrap over the users of ``per_user``."""
    from .evaluation.stats import bootstrap_intervals

    res = bootstrap_intervals(per_user, n_resamples=REPORT_RESAMPLES, confidence=confidence, seed=0)
    return {f"{name}@{k}_ci_{side}": d[f"ci_{side}"] for k, m in res.items() for name, d in m.items()
            for side in ("low", "high")}


def extra_row(name: str, predictions: str | Path, data: str | Path, split: str, ks=(5, 10),
              encoder: str = "minilm-onnx", protocol: str = "reference") -> dict:
    """A row for a published prediction file, evaluated as ``raydpo evaluate`` does, with intervals."""
    from .data import load_dataset
    from .evaluation import evaluate
    from .evaluation.evaluate import Predictions

    ds = load_dataset(data)
    metrics, per_user = evaluate(Predictions.read(predictions), ds, ks, encoder=encoder, protocol=protocol,
                                 split=split, progress=False, per_user=True)
    row = {"method": name, "split": split, "source": str(predictions)}
    for k, m in metrics.items():
        for metric, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                row[f"{metric}@{k}"] = v
    row.update(interval_row(per_user))
    return row


def run_dataset(path: Path, kind: str) -> tuple[Path | None, dict]:
    """The dataset folder a run or search evaluated on, and its evaluation settings."""
    from .config import PipelineConfig
    from .pipeline import stage_keys

    if kind == "search" and (path / "base_config.json").exists():
        cfg = PipelineConfig.model_validate(read_json(path / "base_config.json"))
        key = stage_keys(cfg)["data"]
        return Path(cfg.run_dir) / "data" / key / "dataset", cfg.evaluation.model_dump()
    if kind == "run" and (path / "last_run.json").exists():
        last = read_json(path / "last_run.json")
        if isinstance(last, dict) and isinstance(last.get("keys"), dict) and "data" in last["keys"]:
            ev = (last.get("config") or {}).get("evaluation") or {}
            return path / "data" / str(last["keys"]["data"]) / "dataset", ev
    return None, {}


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


def cell(r: pd.Series, col: str, ci: str = "pm") -> str:
    """``0.0211``, or with its interval ``0.0211 ± 0.0040`` (ci ``pm``: the larger half-width) or
    ``0.0211 [0.0171, 0.0251]`` (``bracket``)."""
    from .evaluation.stats import format_interval

    v = r.get(col)
    if v is None or pd.isna(v):
        return ""
    lo, hi = r.get(col + "_ci_low"), r.get(col + "_ci_high")
    if ci == "off" or lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return f"{v:.4f}"
    return format_interval(float(v), float(lo), float(hi), style=ci)


def markdown_table(frame: pd.DataFrame, ks=(5, 10), ci: str = "pm") -> str:
    head = ["Method"] + [f"{c}@{k}" for k in ks for c in COLUMNS]
    if "Predict_NotIn_Ratio@5" in frame.columns:
        head.append("NotIn")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in frame.iterrows():
        cells = [str(r["method"])]
        for k in ks:
            for c in COLUMNS:
                cells.append(cell(r, f"{c}@{k}", ci))
        if "Predict_NotIn_Ratio@5" in frame.columns:
            cells.append(f"{r['Predict_NotIn_Ratio@5']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_methods(frame: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .tuning.pareto import error_bars

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    xerr, yerr = error_bars(frame, "ORRatio@10"), error_bars(frame, "NDCG@10")
    if xerr is not None or yerr is not None:  # 95% intervals
        ax.errorbar(frame["ORRatio@10"], frame["NDCG@10"], xerr=xerr, yerr=yerr, fmt="none", ecolor="#9cc3d5",
                    elinewidth=1, capsize=2, zorder=1)
    ax.scatter(frame["ORRatio@10"], frame["NDCG@10"], color="#2e86ab", zorder=2)
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


def report(path: str | Path, out: str | Path | None = None, extras: list[tuple[str, str]] = (),
           data: str | Path | None = None, split: str | None = None, ci: str = "pm") -> Path:
    """Write ``report.md`` / ``.png`` / ``.csv`` for a run or search folder; ``extras``: (name,
    predictions file) rows evaluated on ``data`` (default: the dataset the run evaluated on) and
    ``split`` (default: the run's evaluation split)."""
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
    if extras:
        own_data, ev = run_dataset(path, kind)
        data = Path(data) if data is not None else own_data
        if data is None or not data.exists():
            raise RaydpoError(f"{path}: --extra needs the dataset the predictions were made on; give --data DIR")
        split = split or (ev.get("split") if ev else None) or "test"
        rows = [extra_row(name, file, data, split, encoder=ev.get("encoder", "minilm-onnx"),
                          protocol=ev.get("protocol", "reference")) for name, file in extras]
        frame = pd.concat([frame, pd.DataFrame(rows)], ignore_index=True)
    out = Path(out or path / "report.md")
    png = plot_methods(frame, out.with_suffix(".png"))
    keep = ["method"] + [c for c in ("split", "source") if c in frame.columns] + \
        [c for c in frame.columns if "@" in c and c.split("@")[0] in COLUMNS + ["Predict_NotIn_Ratio"]]
    write_text(out.with_suffix(".csv"), frame[keep].to_csv(index=False))
    has_ci = any(c.endswith("_ci_low") for c in frame.columns) and ci != "off"
    note = ("\n± : the larger half of the 95% interval (bootstrap over users; a search's trials: of the mean "
            "over their seeds)\n" if has_ci and ci == "pm" else
            "\n[low, high]: 95% interval (bootstrap over users)\n" if has_ci else "")
    parts = [f"# raydpo {kind} report: {path.name}\n", markdown_table(frame, ci=ci) + note,
             f"\n![NDCG vs ORRatio]({png.name})\n"]
    if (path / "pareto.png").exists():
        parts.append("\n## Pareto front\n\n" + read_text(path / "pareto.md") + "\n![Pareto front](pareto.png)\n")
    if (path / "significance.md").exists():
        parts.append("\n" + read_text(path / "significance.md"))
    write_text(out, "\n".join(parts))
    print("\n".join(parts[:2] + parts[3:]))
    print(f"wrote {out}")
    return out
