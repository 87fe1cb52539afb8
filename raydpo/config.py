"""The typed pipeline configuration, loaded from YAML.

One file describes the whole flow: data, SFT, candidate generation, negative sampling,
alignment (a trainer or a curriculum of stages), prediction and evaluation, plus where it runs
(Ray address, storage, resources). Unknown keys and wrong types fail at load time with the
dotted path of the offending key::

    configs/x.yaml: alignment.beta: Input should be greater than 0 (got -1)

``get_path`` / ``with_overrides`` address any field by its dotted path (``sampling.strategy``),
which is how search spaces name what they search.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RaydpoError
from .training.config import DSDPOSettings


class ConfigError(RaydpoError, ValueError):
    """An invalid configuration; the message names the file and the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticData(Section):
    n_users: int = Field(2000, ge=10)
    n_items: int = Field(500, ge=12)
    n_genres: int = Field(8, ge=1)
    history_len: int = Field(10, ge=1)
    seed: int = 0


class DataConfig(Section):
    source: Literal["synthetic", "path"] = "synthetic"
    path: str | None = None  # a raydpo or SPRec-format folder (source: path)
    synthetic: SyntheticData = SyntheticData()

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source == "path" and not self.path:
            raise ValueError("data.path is required when data.source is 'path'")
        return self


class ModelConfig(Section):
    name_or_path: str = "tiny"  # tiny | smollm2-135m | hub id | local folder
    dtype: str = "auto"


class LoraConfigSection(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None  # default: every linear projection of a Llama block


class SFTSection(Section):
    enabled: bool = True
    epochs: float = Field(3, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    lora: LoraConfigSection = LoraConfigSection()
    full_finetune: bool = False
    seed: int = 0


class GenerationSection(Section):
    mode: Literal["diverse_beam", "beam", "sample"] = "diverse_beam"
    num_return_sequences: int = Field(10, ge=1)
    num_beams: int | None = None
    num_beam_groups: int | None = None
    diversity_penalty: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(50, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    exclude_history: bool = True
    exclude_target: bool = True
    batch_size: int = Field(16, ge=1)
    reference_logprobs: bool = False
    splits: list[Literal["train", "valid", "test"]] = ["train", "valid"]
    limit: int | None = None
    seed: int = 0


class SamplingSection(Section):
    strategy: str = "clusterout_low"
    n_negatives: int = Field(1, ge=1)
    seed: int = 0
    cluster_k: int = Field(3, ge=1)
    ignore_genres: list[str] = []
    ignore_genres_above: float | None = Field(None, gt=0, le=1)
    exposure_scope: Literal["split_histories", "train_interactions"] = "split_histories"


class StageSection(Section):
    """One stage of a curriculum: its own negatives, loss, epochs and beta."""

    name: str
    strategy: str | None = None  # default: sampling.strategy
    learning_rate: float | None = Field(None, gt=0)  # default: alignment.learning_rate
    n_negatives: int | None = None
    loss: str = "sigmoid"
    epochs: float = Field(1, gt=0)
    beta: float = Field(0.1, gt=0)


class AlignmentSection(Section):
    loss: str = "sigmoid"  # sigmoid (DPO, TRL) | TRL loss types | sdpo | dsdpo
    beta: float = Field(0.1, gt=0)
    epochs: float = Field(1, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    reference: Literal["adapter_disabled", "precomputed", "previous_stage", "sft"] = "adapter_disabled"
    # DS-DPO: embeddings, distance, beta_min, ... (checked when the config loads)
    dsdpo: DSDPOSettings = DSDPOSettings(embeddings="minilm-onnx")
    stages: list[StageSection] = []  # a curriculum; empty = one stage from the fields above
    seed: int = 0


class PredictionSection(Section):
    mode: Literal["greedy", "constrained"] = "greedy"
    num_beams: int = Field(1, ge=1)
    max_new_tokens: int | None = None
    batch_size: int = Field(16, ge=1)
    limit: int | None = None


class EvaluationSection(Section):
    split: Literal["valid", "test"] = "test"
    ks: list[int] = [5, 10]
    protocol: Literal["reference", "valid_only"] = "reference"
    encoder: str = "minilm-onnx"


class RaySection(Section):
    address: str | None = None  # None: RAY_ADDRESS or a local ray.init()
    storage_path: str | None = None  # shared storage for multi-node Train/Tune (s3://... or an NFS path)
    num_workers: int = Field(1, ge=1)  # Ray Train workers per training run
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    deepspeed: str | None = None  # None | zero2 | zero3 | path to a JSON config
    generation_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0, ge=0)
    shard_size: int = Field(256, ge=1)
    max_failures: int = Field(1, ge=0)


class PipelineConfig(Section):
    name: str = "raydpo"
    run_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    sft: SFTSection = SFTSection()
    generation: GenerationSection = GenerationSection()
    sampling: SamplingSection = SamplingSection()
    alignment: AlignmentSection = AlignmentSection()
    prediction: PredictionSection = PredictionSection()
    evaluation: EvaluationSection = EvaluationSection()
    ray: RaySection = RaySection()


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        extra = f" (got {got!r})" if e["type"] != "extra_forbidden" and not isinstance(got, dict) else ""
        lines.append(f"{source}: {loc}: {msg}{extra}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config (``None``: the embedded defaults)."""
    raw: dict = {}
    source = str(path) if path else "<defaults>"
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    for key, value in (overrides or {}).items():
        set_path(raw, key, value, source=source)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def config_fields() -> set[str]:
    """Every dotted field path of the schema (search spaces may name any of them)."""
    out: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            path = f"{prefix}{name}"
            out.add(path)
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, path + ".")

    walk(PipelineConfig, "")
    return out


def check_field_path(path: str, source: str = "<search space>") -> None:
    if path not in config_fields():
        close = sorted(f for f in config_fields() if f.split(".")[-1] == path.split(".")[-1])
        hint = f"; did you mean {close}?" if close else ""
        raise ConfigError(f"{source}: {path}: no such config field{hint}")


def set_path(raw: dict, dotted: str, value: Any, source: str = "<overrides>") -> None:
    check_field_path(dotted, source)
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {dotted}: {part} is not a section")
    node[parts[-1]] = value


def get_path(cfg: PipelineConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def with_overrides(cfg: PipelineConfig, overrides: dict[str, Any], source: str = "<overrides>") -> PipelineConfig:
    raw = copy.deepcopy(cfg.model_dump())
    for k, v in overrides.items():
        set_path(raw, k, v, source)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
