"""Ray job: the published comparison (configs/published/SETUP/*.yaml), then `raydpo report`.

Every config of a setup shares its run folder, so the data, the QLoRA SFT model and each
candidate set (Div_10_1.0, Div_5_1.0) are built once and reused through the pipeline cache
(concurrent runs wait on the stage's lock); each config then samples its negatives, aligns,
predicts the 1000 test rows and evaluates. The job ends with `raydpo report RUN_DIR` (the
published-style table of every method and the NDCG@10 / ORRatio@10 plot).

Submit to the GPU cluster (cluster.yaml; one GPU per Ray Train worker and per decoding actor):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/published.py --setup smollm2-1.7b --parallel 8

``--parallel N`` runs N configs at once (each waits for the GPUs its stages request; on one GPU
keep 1). ``--set K=V`` overrides every config (e.g. ``model.name_or_path=tiny`` for a dry run),
``--only NAME ...`` picks configs by file stem, ``--until STAGE`` stops early (no report then).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "configs" / "published"
SETUPS = ("smollm2-1.7b", "smollm2-360m", "smollm2-135m", "llama-3.2-1b")


def configs_of(setup: str, only: list[str] | None = None) -> list[Path]:
    files = sorted((PUBLISHED / setup).glob("*.yaml"))
    if only:
        missing = sorted(set(only) - {f.stem for f in files})
        if missing:
            raise SystemExit(f"published: {setup}: no config named {missing}; known: {[f.stem for f in files]}")
        files = [f for f in files if f.stem in only]
    if not files:
        raise SystemExit(f"published: no configs under {PUBLISHED / setup}")
    return files


def _run_cmd(cfg: Path, sets: list[str], until: str) -> list[str]:
    cmd = [sys.executable, "-m", "raydpo.cli", "run", str(cfg), "--until", until, "-q"]
    if sets:
        cmd += ["--set", *sets]
    return cmd


def run_setup(setup: str, *, sets: list[str] = (), until: str = "evaluate", parallel: int = 1,
              only: list[str] | None = None, report: bool = True) -> Path | None:
    """Run every config of ``setup`` (at most ``parallel`` at once) and report; returns the report path."""
    from raydpo.config import load_config
    from raydpo.cli_args import parse_sets

    files = configs_of(setup, only)
    overrides = parse_sets([list(sets)]) if sets else {}
    run_dirs = {load_config(f, overrides).run_dir for f in files}  # every config checked before anything runs
    if len(run_dirs) != 1:
        raise SystemExit(f"published: {setup}: the configs name different run_dir values {sorted(run_dirs)}")
    run_dir = Path(run_dirs.pop())
    pending, running, failed = list(files), [], []
    t0 = time.time()
    while pending or running:
        while pending and len(running) < parallel:
            cfg = pending.pop(0)
            print(f"[published] {setup}: {cfg.stem} started", flush=True)
            running.append((cfg, subprocess.Popen(_run_cmd(cfg, list(sets), until), cwd=ROOT)))
        time.sleep(1)
        for cfg, proc in list(running):
            if proc.poll() is not None:
                running.remove((cfg, proc))
                status = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
                print(f"[published] {setup}: {cfg.stem} {status} at {time.time() - t0:.0f} s", flush=True)
                if proc.returncode:
                    failed.append(cfg.stem)
    if failed:
        raise SystemExit(f"published: {setup}: {len(failed)} of {len(files)} configs failed: {failed}")
    if not report or until != "evaluate":
        return None
    out = ROOT / run_dir / "report.md" if not run_dir.is_absolute() else run_dir / "report.md"
    subprocess.run([sys.executable, "-m", "raydpo.cli", "report", str(out.parent)], cwd=ROOT, check=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", default="smollm2-1.7b", choices=[*SETUPS, "all"],
                    help="smollm2-1.7b: the main comparison (default); the others: the model variants")
    ap.add_argument("--parallel", type=int, default=1, help="configs run at once")
    ap.add_argument("--set", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--only", nargs="+", help="config file stems")
    ap.add_argument("--until", default="evaluate")
    args = ap.parse_args(argv)
    sets = [s for group in args.set for s in group]
    for setup in (SETUPS if args.setup == "all" else (args.setup,)):
        run_setup(setup, sets=sets, until=args.until, parallel=max(1, args.parallel), only=args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
