"""Candidate generation and prediction sharded across a Ray Data actor pool.

The samples of the requested splits are cut into fixed shards (``shard_size`` rows, in dataset
order). Ray Data feeds the ids of the shards that are not done yet to an actor pool; each actor
loads the model once, decodes its shard in batches of prompts and writes
``shards/shard-NNNNN.parquet`` atomically. A rerun after a crash or a kill skips the finished
shards. Only when every shard exists are they merged into the final artifact (again written to
a temporary name and renamed) and ``_SUCCESS`` written: nothing partial looks finished.

On a GPU cluster give each actor ``num_gpus_per_actor=1``; on a small CPU machine actors get
fractional CPUs by default, because two actors at one CPU each on two cores starve Ray Data's
own tasks and deadlock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..data import load_dataset
from ..errors import RaydpoError
from ..io import atomic_path, read_json, write_json
from .candidates import DecodeConfig

log = logging.getLogger(__name__)
Task = Literal["candidates", "predictions"]


@dataclass
class ModelSpec:
    """Which model decodes: a preset (``tiny``, ``smollm2-135m``), a hub id or a local folder,
    optionally with a LoRA adapter; ``quantization`` ``nf4`` / ``int8`` loads the base quantised
    (:mod:`raydpo.models.quantization`)."""

    name_or_path: str = "tiny"
    adapter: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    compute_dtype: str = "auto"


@dataclass
class Resources:
    num_actors: int = 1
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float | None = None  # default: 1 with GPUs, else a share that leaves room for Ray Data
    shard_size: int = 256

    def cpus(self) -> float:
        if self.num_cpus_per_actor is not None:
            return self.num_cpus_per_actor
        if self.num_gpus_per_actor > 0:
            return 1.0
        import ray

        total = ray.cluster_resources().get("CPU", os.cpu_count() or 1)
        return max(0.1, min(1.0, (total - 0.5) / max(1, self.num_actors)))


def select_samples(data_dir: str | Path, splits: Sequence[str], limit: int | None = None) -> pd.DataFrame:
    ds = load_dataset(data_dir)
    frame = pd.concat([ds.split(s).frame for s in splits], ignore_index=True)
    return frame.iloc[:limit] if limit else frame


class ShardWorker:
    """A Ray Data actor: one model, many shards."""

    def __init__(self, task: Task, data_dir: str, splits: list[str], limit: int | None, shard_size: int,
                 out_dir: str, model: dict, decode: dict, fail_shards: Sequence[int] = ()) -> None:
        import torch

        from ..models import load_model
        from .candidates import CandidateGenerator

        torch.set_num_threads(max(1, int(os.environ.get("RAYDPO_TORCH_THREADS", "0")) or torch.get_num_threads()))
        ds = load_dataset(data_dir)
        self.frame = select_samples(data_dir, splits, limit)
        self.task, self.shard_size, self.out = task, shard_size, Path(out_dir)
        self.fail_shards = set(fail_shards)  # fault injection for tests
        spec = ModelSpec(**model)
        m, tok = load_model(spec.name_or_path, adapter=spec.adapter, dtype=spec.dtype, device=spec.device,
                            catalog=ds.catalog, quantization=spec.quantization, compute_dtype=spec.compute_dtype)
        self.gen = CandidateGenerator(m, tok, ds.catalog, DecodeConfig(**decode), instruction=ds.instruction)

    def __call__(self, batch: dict) -> dict:
        done = {"shard": [], "rows": [], "seconds": [], "candidates": []}
        for shard in batch["shard"]:
            shard = int(shard)
            if shard in self.fail_shards:
                raise RuntimeError(f"injected fault in shard {shard}")
            t0 = time.perf_counter()
            part = self.frame.iloc[shard * self.shard_size : (shard + 1) * self.shard_size]
            if self.task == "candidates":
                table = self.gen.candidates(part)
                n_cand = int(table["candidate_item_ids"].apply(len).sum())
            else:
                table = pd.DataFrame(self.gen.predictions(part))
                table.insert(0, "sample_id", part["sample_id"].to_numpy())
                n_cand = len(table)
            path = shard_path(self.out, shard)
            with atomic_path(path) as tmp:
                pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
            done["shard"].append(shard)
            done["rows"].append(len(part))
            done["seconds"].append(time.perf_counter() - t0)
            done["candidates"].append(n_cand)
        return done


def shard_path(out_dir: Path, shard: int) -> Path:
    return Path(out_dir) / "shards" / f"shard-{shard:05d}.parquet"


def _fingerprint(data_dir: str | Path) -> str:
    p = Path(data_dir)
    h = hashlib.sha256()
    for name in sorted(os.listdir(p)):
        f = p / name
        if f.is_file() and name.endswith((".json", ".parquet")):
            st = f.stat()
            h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _model_key(model: ModelSpec) -> dict:
    """The model part of a run's key (without the quantization settings when unquantised, so
    the keys of runs from before quantization existed stay valid)."""
    d = asdict(model)
    if d.get("quantization", "none") == "none":
        d.pop("quantization", None)
        d.pop("compute_dtype", None)
    return d


def run_sharded(
    task: Task,
    data_dir: str | Path,
    out_dir: str | Path,
    model: ModelSpec,
    decode: DecodeConfig,
    splits: Sequence[str],
    resources: Resources = Resources(),
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    fail_shards: Sequence[int] = (),
) -> dict:
    """Decode every selected sample on an actor pool; returns the run summary.

    ``fail_shards`` makes the workers raise on those shards (a fault-injection hook for tests).
    """
    import ray
    from tqdm.auto import tqdm

    out = Path(out_dir)
    frame = select_samples(data_dir, splits, limit)
    if not len(frame):
        raise RaydpoError(f"{data_dir}: no samples in splits {list(splits)}")
    n_shards = (len(frame) + resources.shard_size - 1) // resources.shard_size
    config = {"task": task, "data": str(Path(data_dir).resolve()), "data_fingerprint": _fingerprint(data_dir),
              "splits": list(splits), "limit": limit, "rows": len(frame), "shard_size": resources.shard_size,
              "model": _model_key(model), "decode": decode.to_dict()}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    run_file = out / "run.json"
    from ..outputs import claim_folder, marker_kind

    if out.is_dir() and any(out.iterdir()) and not run_file.exists() and marker_kind(out) != task:
        raise RaydpoError(f"{out}: the folder is not empty and holds no raydpo {task} run; choose a new folder")
    if run_file.exists():
        old = read_json(run_file)
        if old.get("key") != key:
            if not overwrite:
                raise RaydpoError(f"{out}: holds a {old.get('task')} run with another configuration "
                                  f"(key {old.get('key')} != {key}); use a new directory or --overwrite")
            shutil.rmtree(out)  # a raydpo run folder (its run.json says so)
    if (out / "_SUCCESS").exists() and run_file.exists():
        summary = read_json(out / "_SUCCESS")
        print(f"{task}: {out} is complete ({summary['rows']} rows); nothing to do")
        return summary
    claim_folder(out, task)
    write_json(run_file, {"key": key, **config})

    pending = [i for i in range(n_shards) if not shard_path(out, i).exists()]
    reused = n_shards - len(pending)
    todo = sum(min(resources.shard_size, len(frame) - i * resources.shard_size) for i in pending)
    t0 = time.perf_counter()
    if pending:
        if not ray.is_initialized():
            from ..storage import ray_init

            ray_init(log_to_driver=False)  # Ray's convention; prints which cluster it joined
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own bar counts rows and rows/s
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            ShardWorker,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=resources.num_actors),
            num_cpus=resources.cpus(),
            num_gpus=resources.num_gpus_per_actor or None,
            fn_constructor_kwargs=dict(task=task, data_dir=str(data_dir), splits=list(splits), limit=limit,
                                       shard_size=resources.shard_size, out_dir=str(out), model=asdict(model),
                                       decode=decode.to_dict(), fail_shards=list(fail_shards)),
        )
        bar = tqdm(total=todo, desc=task, unit="row", disable=not progress)
        for row in ds.iter_rows():
            bar.update(int(row["rows"]))
        bar.close()
    missing = [i for i in range(n_shards) if not shard_path(out, i).exists()]
    if missing:
        raise RaydpoError(f"{out}: shards {missing[:5]} were not written; rerun to resume")
    seconds = time.perf_counter() - t0
    table = pd.concat([pd.read_parquet(shard_path(out, i)) for i in range(n_shards)], ignore_index=True)
    summary = {"task": task, "rows": len(table), "shards": n_shards, "reused_shards": reused,
               "seconds": round(seconds, 3), "rows_decoded": todo, "rows_per_second": round(todo / max(seconds, 1e-9), 2),
               "actors": resources.num_actors}
    if task == "candidates":
        n = table["candidate_item_ids"].apply(len)
        summary.update(candidates=int(n.sum()), mean_candidates=round(float(n.mean()), 3),
                       samples_without_candidates=int((n == 0).sum()))
        with atomic_path(out / "candidates.parquet") as tmp:
            pq.write_table(pa.Table.from_pandas(table, preserve_index=False), tmp)
    else:
        rows = table[["prompt", "prediction", "ground_truth"]].to_dict("records")
        write_json(out / "predictions.json", rows)
    write_json(out / "_SUCCESS", summary)
    line = (f"{task}: {summary['rows']} samples in {seconds:.1f} s "
            f"({summary['rows_per_second']} rows/s, {resources.num_actors} actor(s), {reused} shard(s) reused)")
    if task == "candidates":
        line += f", {summary['candidates']} candidates (mean {summary['mean_candidates']} per sample)"
    print(line)
    return summary


def read_candidates(out_dir: str | Path) -> pd.DataFrame:
    out = Path(out_dir)
    if not (out / "_SUCCESS").exists():
        raise RaydpoError(f"{out}: candidate generation is not complete (no _SUCCESS); rerun it to resume")
    return pd.read_parquet(out / "candidates.parquet")
