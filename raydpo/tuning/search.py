"""``raydpo tune SEARCH_SPACE.yaml``: a multi-objective Ray Tune + Optuna search over pipelines.

A search space file::

    base: configs/quickstart.yaml        # the pipeline config every trial starts from (or `config:` inline)
    objectives: {NDCG@10: max, ORRatio@10: min}
    split: valid                         # trials are ranked on the validation split
    num_samples: 8
    max_concurrent: 1
    resources_per_trial: {cpu: 1, gpu: 0}
    max_failures: 1                      # retries of a failed trial
    sampler: tpe                         # tpe | nsga2 | random | grid
    seed: 0
    repeats: 1                           # seeds per configuration (sampling.seed, alignment.seed + i)
    confidence: 0.95                     # of every interval and significance test
    baselines: [selfplay]                # compared with the best trial (paired test over users)
    compare_to_baselines: best           # best | front | all trials
    space:                               # any config field by its dotted path
      sampling.strategy: {choice: [clusterout_low, clusterin_high, selfplay, random]}
      alignment.beta: {loguniform: [0.05, 0.5]}
      alignment.epochs: {choice: [1, 2]}
      generation.temperature: {uniform: [0.5, 1.5]}
      sft.lora.r: {int: [4, 32]}

Trials share the upstream stages through the pipeline cache (one SFT model, one candidate set
per generation setting) and each runs sampling, alignment (a Ray Train run), prediction and
evaluation. The Optuna study is persisted as a journal file (``optuna-dashboard study.journal``
opens it), the Tune experiment can be resumed with ``--resume``, and the result is written as
``trials.csv`` (every trial's parameters, metrics, status and error), ``pareto.csv``,
``pareto.md`` and ``pareto.png``.

Every metric of a trial is the mean over its seeds, with its interval beside it
(``NDCG@10_ci_low`` / ``_ci_high``: bootstrap over users; with ``repeats`` >= 2 also
``_seed_ci_low`` / ``_seed_ci_high``: t interval over seeds; see :mod:`raydpo.tuning.uncertainty`).
The Pareto front is computed on the means, and ``significance.md`` says which differences between
front members, and between trials and the baselines, are significant
(:mod:`raydpo.tuning.significance`).
"""

from __future__ import annotations

import math
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..config import (ConfigError, PipelineConfig, SafeName, _format_errors, check_field_path, load_config,
                      read_config_mapping, with_overrides)
from ..evaluation.stats import flatten_metrics
from ..io import write_json, write_text
from .pareto import pareto_front, plot_front
from .significance import KEYS_COLUMN

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: SafeName | None = None  # becomes a folder name (default: the file's stem)
    base: str | None = None
    config: dict[str, Any] | None = None
    objectives: dict[str, str] = {"NDCG@10": "max", "ORRatio@10": "min"}
    split: str = "valid"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(1, ge=1)
    resources_per_trial: dict[str, float] = {"cpu": 1, "gpu": 0}
    max_failures: int = Field(1, ge=0)
    sampler: str = "tpe"  # tpe | nsga2 | random | grid (every combination of choices once)
    seed: int = 0
    # fixed settings applied to the base config (e.g. {ray.use_gpu: true, ray.gpus_per_actor: 1})
    overrides: dict[str, Any] = {}
    # MLflow tracking through Ray Tune's MLflow callback: false, or {tracking_uri, experiment}
    # (default: on when mlflow is installed; MLFLOW_TRACKING_URI, else OUT/mlruns/mlflow.db)
    mlflow: bool | dict[str, str | None] = True
    space: dict[str, dict[str, Any]]
    # each configuration runs with this many seeds (the seeds of sampling and alignment + 0..N-1);
    # its metrics are the means, with intervals
    repeats: int = Field(1, ge=1)
    confidence: float = Field(0.95, gt=0, lt=1)  # of the intervals and the significance tests
    n_resamples: int = Field(2000, ge=100)  # bootstrap resamples over users
    # trials compared with the best trial (paired test over users): a searched value
    # ([selfplay]) or {name: {param: value, ...}}
    baselines: list[str] | dict[str, dict[str, Any]] = []
    compare_to_baselines: Literal["best", "front", "all"] = "best"  # which trials are compared with them

    @field_validator("objectives")
    @classmethod
    def _modes(cls, v):
        for k, m in v.items():
            if m not in ("max", "min"):
                raise ValueError(f"objective {k}: mode must be 'max' or 'min', got {m!r}")
        if not v:
            raise ValueError("at least one objective is required")
        return v

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, v):
        if v not in ("tpe", "nsga2", "random", "grid"):
            raise ValueError(f"sampler must be tpe, nsga2, random or grid, got {v!r}")
        return v

    @field_validator("resources_per_trial")
    @classmethod
    def _resources(cls, v):
        for k, x in v.items():
            if not x >= 0:
                raise ValueError(f"{k}: a resource amount must be >= 0, got {x}")
        if not v.get("cpu", 1) > 0 and not any(x > 0 for x in v.values()):
            raise ValueError(f"every trial needs some resources (cpu > 0), got {v}")
        if "cpu" in v and not v["cpu"] > 0:
            raise ValueError(f"cpu: a trial needs cpu > 0, got {v['cpu']}")
        return v

    @field_validator("split")
    @classmethod
    def _split(cls, v):
        if v not in ("valid", "test"):
            raise ValueError("split must be 'valid' or 'test'")
        return v


def load_search_space(path: str | Path) -> tuple[SearchSpace, PipelineConfig]:
    """Parse and validate a search space and its base config; errors name the key path."""
    p = Path(path)
    raw = read_config_mapping(p, "search space")
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(p))) from None
    if not space.space:
        raise ConfigError(f"{p}: space: empty; name at least one config field to search, e.g. "
                          "sampling.strategy: {choice: [clusterout_low, random]}")
    for field_path, dist in space.space.items():
        check_field_path(field_path, f"{p}: space")
        if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{p}: space.{field_path}: expected one of {list(DISTRIBUTIONS)}, e.g. "
                              "{choice: [a, b]} or {uniform: [0.1, 1.0]}")
        kind, arg = next(iter(dist.items()))
        if kind == "choice" and (not isinstance(arg, list) or not arg):
            raise ConfigError(f"{p}: space.{field_path}.choice: expected a non-empty list")
        if kind != "choice":
            number = int if kind == "int" else (int, float)
            if (not isinstance(arg, list) or len(arg) != 2
                    or not all(isinstance(x, number) and not isinstance(x, bool) for x in arg)
                    or not all(math.isfinite(x) for x in arg) or not arg[0] < arg[1]):
                what = "integers" if kind == "int" else "finite numbers"
                raise ConfigError(f"{p}: space.{field_path}.{kind}: expected [low, high], {what} with low < high, "
                                  f"got {arg!r}")
            if kind == "loguniform" and not arg[0] > 0:
                raise ConfigError(f"{p}: space.{field_path}.loguniform: expected 0 < low < high, got {arg!r}")
        if space.sampler == "grid" and kind != "choice":
            raise ConfigError(f"{p}: space.{field_path}: sampler grid needs choice distributions, got {kind} "
                              "(a grid over a continuous range has no finite set of points)")
    if space.base and space.config:
        raise ConfigError(f"{p}: give either base or config, not both")
    if space.base:
        base_path = Path(space.base)
        if not base_path.is_absolute() and not base_path.exists():
            base_path = p.parent / space.base
        cfg = load_config(base_path)
    else:
        from ..config import PipelineConfig as _PC

        try:
            cfg = _PC.model_validate(space.config or {})
        except ValidationError as e:
            raise ConfigError(_format_errors(e, f"{p}: config")) from None
    cfg = with_overrides(cfg, {**space.overrides, "evaluation.split": space.split}, source=f"{p}: overrides")
    check_trial_resources(space, cfg, str(p))
    # every choice must produce a valid config
    for field_path, dist in space.space.items():
        kind, arg = next(iter(dist.items()))
        for value in (arg if kind == "choice" else arg):
            with_overrides(cfg, {field_path: int(value) if kind == "int" else value}, source=f"{p}: space")
    resolve_baselines(space, str(p))
    for obj in space.objectives:
        name, _, k = obj.partition("@")
        from ..evaluation.metrics import METRIC_NAMES

        if name not in METRIC_NAMES or not k.isdigit() or int(k) not in cfg.evaluation.ks:
            raise ConfigError(f"{p}: objectives.{obj}: expected METRIC@k with METRIC in {list(METRIC_NAMES)} "
                              f"and k in evaluation.ks {cfg.evaluation.ks}")
    return space, cfg


def resolve_baselines(space: SearchSpace, source: str = "<search space>") -> dict[str, dict[str, Any]]:
    """``{name: {param: value}}``; a plain name is the searched ``choice`` value it equals (exactly one
    parameter must offer it)."""
    out: dict[str, dict[str, Any]] = {}
    if isinstance(space.baselines, dict):
        for name, values in space.baselines.items():
            if not isinstance(values, dict) or not values:
                raise ConfigError(f"{source}: baselines.{name}: expected {{param: value, ...}} of searched parameters")
            for param in values:
                if param not in space.space:
                    raise ConfigError(f"{source}: baselines.{name}.{param}: not a searched parameter (space has "
                                      f"{list(space.space)})")
            out[str(name)] = dict(values)
        return out
    for name in space.baselines:
        owners = [path for path, dist in space.space.items()
                  if "choice" in dist and any(str(v) == str(name) for v in dist["choice"])]
        if len(owners) != 1:
            why = "no searched choice offers it" if not owners else f"several parameters offer it ({owners})"
            raise ConfigError(f"{source}: baselines: {name!r}: {why}; name a choice value such as selfplay, or "
                              "write {name: {param: value}}")
        value = next(v for v in space.space[owners[0]]["choice"] if str(v) == str(name))
        out[str(name)] = {owners[0]: value}
    return out


def optuna_space(space: SearchSpace) -> dict:
    import optuna.distributions as d

    out = {}
    for path, dist in space.space.items():
        kind, arg = next(iter(dist.items()))
        if kind == "choice":
            out[path] = d.CategoricalDistribution(arg)
        elif kind == "uniform":
            out[path] = d.FloatDistribution(float(arg[0]), float(arg[1]))
        elif kind == "loguniform":
            out[path] = d.FloatDistribution(float(arg[0]), float(arg[1]), log=True)
        else:
            out[path] = d.IntDistribution(int(arg[0]), int(arg[1]))
    return out


def _sampler(space: SearchSpace):
    import optuna

    if space.sampler == "grid":
        grid = {}
        for path, dist in space.space.items():
            kind, arg = next(iter(dist.items()))
            if kind != "choice":
                raise ConfigError(f"sampler grid needs choice distributions; space.{path} is {kind}")
            grid[path] = arg
        return optuna.samplers.GridSampler(grid, seed=space.seed)
    if space.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=space.seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=space.seed)
    return optuna.samplers.TPESampler(seed=space.seed, multivariate=True)


def check_trial_resources(space: SearchSpace, cfg: PipelineConfig, source: str) -> None:
    """A trial's own process runs the pipeline driver, sampling and evaluation on CPUs; its
    training workers (``ray.use_gpu``) and generation/prediction actors (``ray.gpus_per_actor``)
    request their GPUs themselves. A GPU reserved for the trial would stay idle."""
    gpu = space.resources_per_trial.get("gpu", 0)
    if gpu:
        uses = [s for s, r in trial_stage_resources(cfg).items() if r and r["GPU"]]
        raise ConfigError(f"{source}: resources_per_trial.gpu: {gpu:g} GPU(s) per trial would stay idle (a trial's "
                          f"own process never computes on a GPU; {', '.join(uses) or 'no stage'} request their own "
                          "through ray.use_gpu / ray.gpus_per_actor); set it to 0")


def trial_stage_resources(cfg: PipelineConfig) -> dict[str, dict | None]:
    from ..pipeline import stage_resources

    return stage_resources(cfg)


def _train_history(run_dir: str, summaries: dict) -> list[dict]:
    """Per-epoch training metrics of the trial's SFT and alignment runs (``metrics.jsonl``)."""
    from ..training.ray_train import _history

    rows = []
    for stage in ("sft", "align"):
        key = (summaries.get(stage) or {}).get("key")
        if key:
            for m in _history(Path(run_dir) / stage / key / "train"):
                rows.append({"stage": stage, **m})
    return rows


def evaluate_config(cfg: PipelineConfig, run_dir: str, repeats: int = 1, confidence: float = 0.95,
                    n_resamples: int = 2000) -> tuple[dict[str, Any], list[dict]]:
    """Run ``cfg`` with ``repeats`` seeds (upstream stages shared through the cache): the mean of
    every metric with its intervals, ``seeds`` and ``evaluate_keys`` (one per seed); and the
    pipeline summaries of every seed."""
    from ..pipeline import run_pipeline
    from .uncertainty import CI_HIGH, CI_LOW, read_per_user, seed_overrides, summarize_seeds, user_intervals

    per_seed, keys, all_summaries = [], [], []
    for i in range(repeats):
        summaries = run_pipeline(with_overrides(cfg, seed_overrides(cfg, i), source="<seed>"), run_dir=run_dir,
                                 progress=False)
        per_seed.append({k: v for k, v in flatten_metrics(summaries["evaluate"]["metrics"]).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        keys.append(summaries["evaluate"]["key"])
        all_summaries.append(summaries)
    out: dict[str, Any] = summarize_seeds(per_seed, confidence)
    pus = read_per_user(run_dir, keys)
    if pus is not None:
        for name, (lo, hi) in user_intervals(pus, confidence, n_resamples).items():
            if name in out:
                out[name + CI_LOW], out[name + CI_HIGH] = lo, hi
    out["seeds"] = repeats
    out[KEYS_COLUMN] = " ".join(keys)
    return out, all_summaries


def run_trial(params: dict, base: dict, run_dir: str, with_history: bool = False, repeats: int = 1,
              confidence: float = 0.95, n_resamples: int = 2000):
    """One trial: the pipeline with ``params`` applied, run with ``repeats`` seeds and ranked on the
    configured split (with ``with_history``: also the per-epoch training metrics of every seed)."""
    cfg = with_overrides(PipelineConfig.model_validate(base), params, source="<trial>")
    metrics, summaries = evaluate_config(cfg, run_dir, repeats, confidence, n_resamples)
    if not with_history:
        return metrics
    history = [{"seed": i, **m} for i, s in enumerate(summaries) for m in _train_history(run_dir, s)]
    return metrics, history


HISTORY_KEY = "train_history"


def _trainable(config: dict, base: dict, run_dir: str, repeats: int = 1, confidence: float = 0.95,
               n_resamples: int = 2000) -> None:
    import ray.tune as tune

    metrics, history = run_trial(dict(config), base, run_dir, with_history=True, repeats=repeats,
                                 confidence=confidence, n_resamples=n_resamples)
    tune.report({**metrics, HISTORY_KEY: history})


_SEARCHER: list = []


def _journal_searcher_class():
    """``OptunaSearch`` whose study reopens its journal at ``self.journal`` when Tune restores
    the searcher's pickled state (which names the journal path of the driver that saved it, and
    a search resumed on another machine may keep its mirror of the storage root elsewhere)."""
    if not _SEARCHER:
        from ray.tune.search.optuna import OptunaSearch

        class JournalOptunaSearch(OptunaSearch):
            journal: str | None = None

            def restore(self, checkpoint_path: str):
                journal = self.journal
                super().restore(checkpoint_path)
                if journal and journal != self.journal:
                    from optuna import load_study
                    from optuna.storages import JournalStorage
                    from optuna.storages.journal import JournalFileBackend

                    self._storage = JournalStorage(JournalFileBackend(journal))
                    self._ot_study = load_study(study_name=self._study_name, storage=self._storage,
                                                sampler=self._ot_study.sampler)
                    for t in self._ot_trials.values():
                        t.study = self._ot_study
                    self.journal = journal

        JournalOptunaSearch.__module__ = __name__
        JournalOptunaSearch.__qualname__ = "JournalOptunaSearch"
        _SEARCHER.append(JournalOptunaSearch)
    return _SEARCHER[0]


def __getattr__(name: str):  # pickles of a search name the class; it is built on first use (Ray imported late)
    if name == "JournalOptunaSearch":
        return _journal_searcher_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _mlflow_settings(space: SearchSpace, out: Path) -> dict | None:
    if space.mlflow is False:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("MLflow tracking is off: mlflow is not installed (pip install raydpo[tracking])")
        return None
    opts = space.mlflow if isinstance(space.mlflow, dict) else {}
    uri = opts.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        (out / "mlruns").mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{out / 'mlruns' / 'mlflow.db'}"  # MLflow 3 refuses its old file store
    return {"tracking_uri": uri, "experiment_name": opts.get("experiment") or out.name}


def _mlflow_key(k: str) -> str:
    return k.replace("@", "_at_")  # NDCG@10 -> NDCG_at_10 (MLflow names allow [\w./ :-])


def _callbacks(tracking: dict | None, out: Path, remote_out: str | None) -> list:
    from ray.tune import Callback

    callbacks: list = []
    if tracking:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        class RaydpoMLflowCallback(MLflowLoggerCallback):
            """Each trial as an MLflow run: its parameters, each epoch of its training runs
            (``sft/loss``, ``align/reward_accuracy``, ... at their training step) and its final
            metrics."""

            def log_trial_result(self, iteration, trial, result):
                run_id = self._trial_runs[trial]
                history = result.get(HISTORY_KEY) or []
                for m in history:
                    vals = {f"{m['stage']}/{k}": v for k, v in m.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
                    self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=vals, step=int(m.get("step") or 0))
                final = {_mlflow_key(k): v for k, v in result.items() if "@" in k and isinstance(v, (int, float))}
                self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=final, step=0)

        callbacks.append(RaydpoMLflowCallback(tracking_uri=tracking["tracking_uri"],
                                              experiment_name=tracking["experiment_name"], save_artifact=False))
    if remote_out:
        class CopyResults(Callback):
            """Keep the object-store copy of the Optuna journal current after every trial."""

            def _copy(self) -> None:
                from .. import storage

                if (out / "study.journal").exists():
                    storage.upload_file(out / "study.journal", f"{remote_out}/study.journal")

            def on_trial_start(self, iteration, trials, trial, **info):
                self._copy()  # the trial Optuna just asked for is in the journal

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._copy()

        callbacks.append(CopyResults())
    return callbacks


@dataclass
class SearchResult:
    trials: pd.DataFrame
    front: pd.DataFrame
    out_dir: Path


def run_search(path: str | Path, out_dir: str | Path | None = None, resume: bool = False,
               num_samples: int | None = None, name: str | None = None,
               ray_address: str | None = None) -> SearchResult:
    """Run (or with ``resume``, continue) a search. With a storage root its results go to
    ``ROOT/tune/NAME`` (``--out`` overrides), Ray Tune's state to ``ROOT/tune/NAME/experiment``,
    and ``--resume`` finds the search there by its name. ``ray_address``: ``"local"`` for a
    Ray instance of its own (the quickstart); default: Ray's convention (``RAY_ADDRESS``, ...)."""
    space, cfg = load_search_space(path)  # bad input fails before Ray is imported
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from .. import storage

    name = name or space.name or Path(path).stem
    try:
        from ..checks import check_name

        check_name(name, "search name")  # a folder under RUN_DIR/tune and the Optuna study name
    except ValueError as e:
        raise ConfigError(f"{path}: {e}; set 'name:' in the search space") from None
    root = storage.storage_root(cfg.ray.storage_path)
    cfg = storage.resolve_config(cfg)  # run_dir absolute under the storage root; ray.storage_path = the root
    if out_dir is not None:
        out = storage.output_path(out_dir, root, "--out")
    else:
        out = root.local / "tune" / name if root is not None else Path(cfg.run_dir) / "tune" / name
    out = out.resolve()
    # Ray Tune's own state: beside the results, or in the object store for an s3:// root
    exp_parent = (root.remote_of(out) if root is not None else None) or str(out)
    exp_path = f"{exp_parent.rstrip('/')}/experiment"
    remote_out = root.remote_of(out) if root is not None else None
    from ..outputs import check_output, claim_folder

    if out.is_relative_to(Path(cfg.run_dir).resolve()):  # the search inside the trials' shared run folder:
        # claim that folder (upstream stages) first, so the search folder is not a foreign entry in it
        check_output(cfg.run_dir, kind="run", folder=True, resumable=True, option="run_dir",
                     inputs=[path] + ([cfg.data.path] if cfg.data.source == "path" else []))
        claim_folder(cfg.run_dir, "run")
    check_output(out, kind="search", folder=True, resumable=True, option="--out",
                 inputs=[path] + ([cfg.data.path] if cfg.data.source == "path" else []))
    claim_folder(out, "search")
    if resume and remote_out:  # the Optuna journal and MLflow store of an earlier driver, maybe elsewhere
        for f in ("study.journal", "mlruns/mlflow.db"):
            if not (out / f).exists() and storage.download_file(f"{remote_out}/{f}", out / f):
                print(f"downloaded {remote_out}/{f}")
    run_dir = cfg.run_dir
    write_json(out / "base_config.json", cfg.model_dump(mode="json"))
    tracking = _mlflow_settings(space, out)
    where = [("storage root", root.describe() if root is not None else "none (paths relative to this folder)"),
             ("results", f"{out} (trials.csv, pareto.md, pareto.png)" + (f", copied to {remote_out}" if remote_out else "")),
             ("Optuna study", str(out / "study.journal")), ("Ray Tune state", exp_path), ("stage caches", run_dir)]
    if root is not None:
        where.append(("Train checkpoints", root.join("train")))
    if tracking:
        where.append(("MLflow", f"{tracking['tracking_uri']} (experiment {tracking['experiment_name']!r})"))
    print(f"search {name!r}:\n" + "\n".join(f"  {k + ':':<19}{v}" for k, v in where), flush=True)
    storage.ray_init(ray_address or cfg.ray.address)
    for folder in {run_dir, str(out)}:  # every node must see what the trials write
        storage.check_nodes_share(folder)
    upstream = ("data.", "model.", "sft.", "generation.", "ray.")
    if not any(p.startswith(upstream) for p in space.space):
        # every trial shares data, SFT and candidates: build them once here, with progress
        from ..pipeline import run_pipeline

        print(f"building the shared upstream stages (data, sft, generate) in {run_dir}")
        run_pipeline(cfg, until="generate", run_dir=run_dir)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = str(out / "study.journal")
    study = JournalStorage(JournalFileBackend(journal))
    objectives = list(space.objectives)
    searcher = _journal_searcher_class()(
        space=optuna_space(space), metric=objectives, mode=[space.objectives[o] for o in objectives],
        sampler=_sampler(space), study_name=name, storage=study, seed=None)
    searcher.journal = journal
    searcher = ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=cfg.model_dump(mode="json"), run_dir=run_dir, repeats=space.repeats,
                             confidence=space.confidence, n_resamples=space.n_resamples),
        {k: v for k, v in space.resources_per_trial.items() if v})
    param_space: dict = {}
    callbacks = _callbacks(tracking, out, remote_out)
    restorable = resume and tune.Tuner.can_restore(exp_path)
    if resume and not restorable:
        print(f"nothing to resume: no search {name!r} at {exp_path}; starting it", flush=True)
    if restorable:
        print(f"resuming search {name!r} from {exp_path} (finished trials are kept, unfinished ones rerun)",
              flush=True)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, param_space=param_space,
                                   resume_errored=True)
        # the pickled experiment names the earlier driver's paths: this driver's callbacks, and the
        # Optuna journal where this driver keeps it (another machine may mirror the root elsewhere)
        local = tuner._local_tuner
        local._run_config.callbacks = callbacks
        restored = getattr(local._tune_config.search_alg, "searcher", local._tune_config.search_alg)
        if hasattr(restored, "journal"):
            restored.journal = journal
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=num_samples or space.num_samples),
            run_config=tune.RunConfig(name="experiment", storage_path=exp_parent,
                                      failure_config=tune.FailureConfig(max_failures=space.max_failures),
                                      callbacks=callbacks, verbose=1),
        )
    grid = tuner.fit()
    trials = results_frame(grid, list(space.space), objectives)
    result = write_results(trials, space, out, run_dir=run_dir, split=cfg.evaluation.split)
    if remote_out:
        n = storage.upload_dir(out, remote_out, last=("search.json",))
        print(f"search results copied to {remote_out} ({n} files)")
    return result


def results_frame(grid, params: list[str], objectives: list[str]) -> pd.DataFrame:
    rows = []
    for r in grid:
        cfg = r.config or {}
        row: dict[str, Any] = {"trial": Path(r.path).name if r.path else None}
        row.update({p: cfg.get(p) for p in params})
        metrics = r.metrics or {}
        for k, v in metrics.items():
            if "@" in k:
                row[k] = v
        row["seeds"] = metrics.get("seeds")
        row[KEYS_COLUMN] = metrics.get(KEYS_COLUMN, "")
        for o in objectives:
            row.setdefault(o, math.nan)
        row["status"] = "ERROR" if r.error else "OK"
        row["error"] = "".join(traceback.format_exception_only(type(r.error), r.error)).strip() if r.error else ""
        rows.append(row)
    return pd.DataFrame(rows)


def write_results(trials: pd.DataFrame, space: SearchSpace, out: Path, run_dir: str | Path | None = None,
                  split: str | None = None) -> SearchResult:
    """trials.csv, pareto.csv / .md / .png (front on the means, intervals beside them) and, with the
    trials' per-user results under ``run_dir``, significance.md / .csv."""
    objectives = dict(space.objectives)
    ok = trials[trials["status"] == "OK"]
    front = pareto_front(ok, objectives) if len(ok) else ok
    write_text(out / "trials.csv", trials.to_csv(index=False))
    write_text(out / "pareto.csv", front.to_csv(index=False))
    table = pareto_markdown(front, list(space.space), list(objectives), space.confidence)
    write_text(out / "pareto.md", table)
    if len(ok) and len(objectives) >= 2:
        label = next((p for p in space.space if p.endswith("strategy")), None)
        plot_front(ok, objectives, out / "pareto.png", label=label,
                   title=f"{space.name or out.name}: {len(ok)} trials, {len(front)} on the front")
    sig_text = ""
    if run_dir is not None and len(ok):
        from .significance import significance

        sig, sig_text = significance(ok, front, objectives, list(space.space), resolve_baselines(space),
                                     space.compare_to_baselines, run_dir, split or space.split,
                                     confidence=space.confidence, n_resamples=space.n_resamples)
        write_text(out / "significance.csv", sig.to_csv(index=False))
        write_text(out / "significance.md", sig_text)
    write_json(out / "search.json", {"space": space.model_dump(), "trials": len(trials),
                                     "failed": int((trials['status'] != 'OK').sum()), "front": len(front)})
    print(f"{len(trials)} trials ({int((trials['status'] != 'OK').sum())} failed), {len(front)} on the Pareto front "
          f"-> {out}")
    print(table)
    if sig_text:
        print(sig_text)
    return SearchResult(trials, front, out)


def pareto_markdown(front: pd.DataFrame, params: list[str], objectives: list[str], confidence: float = 0.95) -> str:
    """The front as a table: each objective's mean with its interval (over users, else over seeds)."""
    from .uncertainty import interval_columns

    cols = ["trial"] + params + objectives
    cols = [c for c in cols if c in front.columns]
    if "seeds" in front.columns and front["seeds"].fillna(1).max() > 1:
        cols.append("seeds")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in front.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            lo_hi = interval_columns(front, c) if c in objectives else None
            if lo_hi and pd.notna(row[lo_hi[0]]):
                cells.append(f"{v:.4f} [{row[lo_hi[0]]:.4f}, {row[lo_hi[1]]:.4f}]")
            elif c == "seeds":
                cells.append(str(int(v)))
            else:
                cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    if any(c in objectives and interval_columns(front, c) for c in cols):
        lines.append(f"\n[low, high]: {confidence:.0%} interval of the mean (bootstrap over users; over seeds when "
                     "no per-user results)")
    return "\n".join(lines) + "\n"


def evaluate_best(search_dir: str | Path, top: int | None = None, split: str = "test") -> pd.DataFrame:
    """Re-run the Pareto-front trials' pipelines on ``split`` with their seeds (reusing their
    trained adapters); their metrics with intervals go to ``best_SPLIT.csv``."""
    from ..errors import DataError
    from ..readers import check_folder, read_json
    from ..report import _read_csv

    search_dir = check_folder(search_dir, "search directory")
    meta = _read_csv(search_dir / "pareto.csv", ("trial",))
    info = read_json(search_dir / "search.json")
    if not isinstance(info, dict) or not isinstance(info.get("space"), dict):
        raise DataError("expected a JSON object with the search's 'space'", path=search_dir / "search.json",
                        field="space")
    try:
        space = SearchSpace.model_validate(info["space"])
    except ValidationError as e:
        raise ConfigError(_format_errors(e, f"{search_dir / 'search.json'}: space")) from None
    for p in space.space:
        if p not in meta.columns:
            raise DataError("missing column (a searched parameter)", path=search_dir / "pareto.csv", field=p)
    base_path = search_dir / "base_config.json"
    raw_base = read_json(base_path)
    try:
        base = PipelineConfig.model_validate(raw_base)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(base_path))) from None
    rows = []
    for _, r in meta.head(top or len(meta)).iterrows():
        params = {p: (r[p].item() if hasattr(r[p], "item") else r[p]) for p in space.space}
        cfg = with_overrides(base, {**params, "evaluation.split": split})
        m, _ = evaluate_config(cfg, cfg.run_dir, space.repeats, space.confidence, space.n_resamples)
        rows.append({"trial": r["trial"], **params, **m})
    frame = pd.DataFrame(rows)
    write_text(search_dir / f"best_{split}.csv", frame.to_csv(index=False))
    print(pareto_markdown(frame, list(space.space), list(space.objectives), space.confidence))
    return frame
