"""``raydpo compare A B [C ...]``: methods side by side with bootstrap intervals and paired tests.

Each argument is ``[NAME=]PATH`` where PATH is

* a predictions file in the published format (a JSON list of {prompt, prediction, ground_truth};
  evaluated here against ``--data``), or a folder holding one (``raw_results_*.json``,
  ``predictions.json``: a published result folder);
* a per-user results file (``raydpo evaluate --per-user``, or an evaluate stage's
  ``per_user.parquet``), or an evaluate stage folder holding one;
* a pipeline run folder: every evaluated configuration in it (``evaluate/<key>/``);
* a search folder (``trials.csv``): every successful trial.

The statistics are :func:`raydpo.evaluation.stats.compare`; this module finds the per-user
results and renders the tables.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..readers import check_folder, read_json
from .stats import PER_USER_FILE, PerUser

PREDICTION_NAMES = ("predictions.json",)


class _Evaluator:
    """Evaluates prediction files on demand (the dataset and the encoder are loaded once)."""

    def __init__(self, data_dir: str | Path | None, ks: Sequence[int], encoder: str, protocol: str, split: str,
                 progress: bool):
        self.data_dir, self.ks, self.encoder, self.protocol, self.split = data_dir, ks, encoder, protocol, split
        self.progress = progress
        self._datasets: dict[str, object] = {}

    def dataset(self, data_dir: str | Path | None, needed_by: Path):
        from ..data import load_dataset

        data_dir = data_dir or self.data_dir
        if data_dir is None:
            raise DataError("a predictions file needs the dataset it was predicted on: pass --data DIR",
                            path=needed_by)
        key = str(data_dir)
        if key not in self._datasets:
            self._datasets[key] = load_dataset(data_dir)
        return self._datasets[key]

    def __call__(self, path: Path, data_dir: str | Path | None = None, limit: int | None = None) -> PerUser:
        from ..data import Dataset, Samples
        from .evaluate import Predictions, evaluate

        preds = Predictions.read(path)  # bad files fail before the dataset or encoder is loaded
        ds = self.dataset(data_dir, path)
        if limit:  # a run that predicted only the first `limit` rows (as its evaluate stage did)
            f = ds.samples.frame
            keep = (f["split"] != self.split) | (f.groupby("split").cumcount() < limit)
            ds = Dataset(ds.catalog, Samples(f[keep].reset_index(drop=True)), ds.name, ds.instruction)
        if self.progress:
            print(f"evaluating {path} ...", file=sys.stderr, flush=True)
        _, table = evaluate(preds, ds, self.ks, encoder=self.encoder, protocol=self.protocol, split=self.split,
                            per_user=True)
        return table


def split_name(spec: str) -> tuple[str | None, str]:
    """``NAME=PATH`` -> (NAME, PATH); a plain path (even one with ``=`` in it, if it exists) -> (None, PATH)."""
    if "=" in spec and not Path(spec).exists():
        name, path = spec.split("=", 1)
        if name and "/" not in name:
            return name, path
    return None, spec


def _label(path: Path) -> str:
    if path.is_file() and (path.name.startswith("raw_results") or path.name in PREDICTION_NAMES
                           or path.name == PER_USER_FILE):
        return path.parent.name or path.stem
    return path.name or str(path)


def _prediction_file(folder: Path) -> Path | None:
    found = sorted(folder.glob("raw_results_*.json")) + [folder / n for n in PREDICTION_NAMES if (folder / n).is_file()]
    return found[0] if len(found) == 1 else None


def _run_entries(run_dir: Path, evaluator: _Evaluator) -> list[tuple[str, PerUser]]:
    """Every evaluated configuration of a pipeline run folder."""
    from ..report import _chain_config, _method_label

    out = []
    for done in sorted((run_dir / "evaluate").glob("*/_SUCCESS")):
        stage = done.parent
        cfg = _chain_config(run_dir, stage.name)
        label = _method_label(cfg) if cfg else stage.name
        if (stage / PER_USER_FILE).is_file():
            out.append((label, PerUser.read(stage / PER_USER_FILE)))
            continue
        keys = cfg.get("keys") or {}
        pred = run_dir / "predict" / str(keys.get("predict")) / "predictions" / "predictions.json"
        if not keys.get("predict") or not pred.is_file():
            raise DataError(f"the evaluate stage has no {PER_USER_FILE} and its predictions were not found "
                            "(rerun the evaluate stage: `raydpo run CONFIG --from evaluate`)", path=stage)
        data = run_dir / "data" / str(keys.get("data")) / "dataset"
        limit = (cfg.get("prediction") or {}).get("limit")
        out.append((label, evaluator(pred, data if data.is_dir() else None, limit)))
    if not out:
        raise DataError("no finished evaluate stage in the run folder (evaluate/<key>/_SUCCESS)", path=run_dir)
    return out


def _nested(cfg: dict, dotted: str):
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        except (TypeError, ValueError):
            return False
    return str(a) == str(b)


def _fmt_param(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _search_entries(search_dir: Path, evaluator: _Evaluator) -> list[tuple[str, PerUser]]:
    """Every successful trial of a search folder, labelled by its parameters: its per-user results
    (the ``per_user`` column of trials.csv, else its ``evaluate_keys`` (one per seed) in the
    search's run folder, else the evaluate stage whose recorded config matches its parameters)."""
    from ..report import _read_csv

    trials = _read_csv(search_dir / "trials.csv", ("trial",))
    if "status" in trials.columns:
        trials = trials[trials["status"] == "OK"]
    if trials.empty:
        raise DataError("no successful trial", path=search_dir / "trials.csv")
    params: list[str] = []
    info_path = search_dir / "search.json"
    if info_path.is_file():
        info = read_json(info_path)
        if isinstance(info, dict) and isinstance(info.get("space"), dict):
            params = list((info["space"].get("space") or {}).keys())
    params = [p for p in params if p in trials.columns]
    run_dir: Path | None = None
    chains: list[tuple[Path, dict]] = []
    if "per_user" not in trials.columns:
        base = read_json(search_dir / "base_config.json") if (search_dir / "base_config.json").is_file() else {}
        run_dir = Path(base["run_dir"]) if isinstance(base, dict) and base.get("run_dir") else None
        if run_dir is None or not (run_dir / "evaluate").is_dir():
            raise DataError("cannot find the trials' runs: base_config.json names no run folder with evaluate/ "
                            "stages", path=search_dir / "base_config.json", field="run_dir")
        if "evaluate_keys" not in trials.columns and (run_dir / "chains").is_dir():
            for c in sorted((run_dir / "chains").glob("*.json")):
                cfg = read_json(c)
                if isinstance(cfg, dict):
                    chains.append((c, cfg))
    out = []
    for i, row in trials.reset_index(drop=True).iterrows():
        label = ", ".join(f"{p.split('.')[-1]}={_fmt_param(row[p])}" for p in params) or str(row["trial"])
        if "per_user" in trials.columns:
            paths = [Path(p) for p in str(row["per_user"]).split(";") if p.strip() and p != "nan"]
            paths = [p if p.is_absolute() else search_dir / p for p in paths]
        elif "evaluate_keys" in trials.columns:
            keys = str(row["evaluate_keys"]).split() if isinstance(row["evaluate_keys"], str) else []
            paths = [run_dir / "evaluate" / key / PER_USER_FILE for key in keys]
        else:
            matches = [cfg for _, cfg in chains
                       if cfg.get("split") == evaluator.split and all(_same(_nested(cfg, p), row[p]) for p in params)]
            paths = [run_dir / "evaluate" / str((cfg.get("keys") or {}).get("evaluate")) / PER_USER_FILE
                     for cfg in matches[-1:]]
        if not paths:
            raise DataError("no per-user results of this trial", path=search_dir / "trials.csv", record=i,
                            field="trial")
        for j, p in enumerate(paths):
            if not p.is_file():
                raise DataError("the trial's per-user results are missing (an evaluate stage cached before "
                                "per-user results existed: rerun it with `raydpo run CONFIG --from evaluate`)",
                                path=p)
            out.append((label if len(paths) == 1 else f"{label} (seed {j})", PerUser.read(p)))
    return out


def load_sources(specs: Sequence[str], evaluator: _Evaluator) -> dict[str, PerUser]:
    """``{label: PerUser}`` for every argument (a run or search folder may give several)."""
    named: dict[str, PerUser] = {}

    def add(label: str, table: PerUser) -> None:
        base, n = label, 2
        while label in named:
            label, n = f"{base} ({n})", n + 1
        named[label] = table

    for spec in specs:
        name, raw = split_name(spec)
        path = Path(raw)
        if not path.exists():
            raise DataError("not found (expected a predictions file, a per-user results file, a run folder or a "
                            "search folder)", path=path)
        entries: list[tuple[str, PerUser]]
        if path.is_file():
            if path.suffix == ".parquet":
                entries = [(_label(path), PerUser.read(path))]
            else:
                entries = [(_label(path), evaluator(path))]
        else:
            check_folder(path)
            if (path / "trials.csv").is_file():
                entries = _search_entries(path, evaluator)
            elif (path / "evaluate").is_dir():
                entries = _run_entries(path, evaluator)
            elif (path / PER_USER_FILE).is_file():
                entries = [(path.name, PerUser.read(path / PER_USER_FILE))]
            elif (pred := _prediction_file(path)) is not None:
                entries = [(path.name, evaluator(pred))]
            else:
                raise DataError("not a run folder (evaluate/), a search folder (trials.csv), an evaluate stage "
                                f"({PER_USER_FILE}) or a folder with one predictions file (raw_results_*.json)",
                                path=path)
        if name is not None:
            entries = [(name if len(entries) == 1 else f"{name}/{label}", t) for label, t in entries]
        for label, table in entries:
            table.meta.setdefault("path", str(path))
            add(label, table)
    return named


# --- rendering ---------------------------------------------------------------------------------------


def _fmt(metric: str, v: float) -> str:
    if v is None or not np.isfinite(v):
        return "nan"
    return f"{v:.1f}" if metric == "diversity" else f"{v:.4f}"


def _fmt_p(p: float) -> str:
    if p is None or not np.isfinite(p):
        return "nan"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def markdown(result: dict) -> str:
    conf = result["confidence"]
    pct = f"{conf * 100:g}%"
    base = result["baseline"]
    names = list(result["methods"])
    n_cmp = (len(names) - 1) * len(result["ks"]) * len(result["metrics"])
    lines = [f"{result['users']} users; {pct} {result['interval']} bootstrap intervals over users "
             f"({result['n_resamples']} resamples, seed {result['seed']})."]
    if len(names) > 1:
        lines.append(f"diff = method - {base} on the same users (paired {result['test']} test, two-sided); "
                     f"p (Holm) corrects over the {n_cmp} comparisons shown; * = p (Holm) < {1 - conf:g}.")
    for k in result["ks"]:
        lines += ["", f"### k = {k}", ""]
        head = ["metric", "method", f"value [{pct} CI]"]
        if len(names) > 1:
            head += [f"diff vs {base} [{pct} CI]", "p", "p (Holm)"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m in result["metrics"]:
            for name in names:
                e = result["methods"][name][str(k)][m]
                cells = [m, name, f"{_fmt(m, e['value'])} [{_fmt(m, e['ci_low'])}, {_fmt(m, e['ci_high'])}]"]
                if len(names) > 1:
                    if "diff" in e:
                        sign = "+" if e["diff"] >= 0 else ""
                        cells += [f"{sign}{_fmt(m, e['diff'])} [{_fmt(m, e['diff_ci_low'])}, "
                                  f"{_fmt(m, e['diff_ci_high'])}]", _fmt_p(e["p_value"]),
                                  _fmt_p(e["p_holm"]) + (" *" if e["significant"] else "")]
                    else:
                        cells += ["(baseline)", "", ""]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["method", "k", "metric", "value", "ci_low", "ci_high", "baseline", "diff", "diff_ci_low",
               "diff_ci_high", "p_value", "p_holm", "significant"]


def to_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for name, by_k in result["methods"].items():
        for k, by_m in by_k.items():
            for m, e in by_m.items():
                w.writerow({"method": name, "k": k, "metric": m, "baseline": result["baseline"],
                            **{c: e.get(c, "") for c in CSV_COLUMNS[3:] if c != "baseline"}})
    return buf.getvalue()


def check_json_shape(result: dict) -> None:
    """Raise ValueError unless ``result`` has the documented shape (used by the tests and the CLI)."""
    for name, by_k in result["methods"].items():
        for k, by_m in by_k.items():
            for m, e in by_m.items():
                need = {"value", "ci_low", "ci_high"}
                if name != result["baseline"]:
                    need |= {"diff", "diff_ci_low", "diff_ci_high", "p_value", "p_holm"}
                if not need <= set(e):
                    raise ValueError(f"{name} k={k} {m}: missing {sorted(need - set(e))}")


def run_compare(specs: Sequence[str], data_dir: str | None, *, baseline: str | None = None,
                ks: Sequence[int] | None = None, n_resamples: int = 10000, confidence: float = 0.95,
                seed: int = 0, test: str = "bootstrap", interval: str = "percentile",
                metrics: Sequence[str] | None = None, encoder: str = "minilm-onnx", protocol: str = "reference",
                split: str = "test", progress: bool = True) -> dict:
    from .stats import compare

    evaluator = _Evaluator(data_dir, ks or (5, 10), encoder, protocol, split, progress)
    named = load_sources(specs, evaluator)
    if baseline is not None and baseline not in named:
        # --baseline may name an argument by its path as well as by its label
        by_path = [label for label, t in named.items() if t.meta.get("path") == str(Path(split_name(baseline)[1]))]
        if len(by_path) == 1:
            baseline = by_path[0]
        else:
            raise DataError(f"--baseline {baseline!r} is none of the methods compared ({', '.join(named)})",
                            field="baseline")
    if baseline is not None:  # the baseline first
        named = {baseline: named[baseline], **{k: v for k, v in named.items() if k != baseline}}
    return compare(named, baseline, ks, n_resamples=n_resamples, confidence=confidence, seed=seed, test=test,
                   metrics=metrics, interval=interval)


__all__ = ["check_json_shape", "load_sources", "markdown", "run_compare", "split_name", "to_csv"]
