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
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import checks
from .errors import DataError, RaydpoError
from .training.config import DSDPOSettings

# checked when a config loads (before Ray starts or any model is touched); see raydpo.checks
SafeName = Annotated[str, AfterValidator(lambda v: checks.check_name(v, "name"))]
ModelName = Annotated[str, AfterValidator(checks.check_model_name)]
StrategyName = Annotated[str, AfterValidator(checks.check_strategy)]
LossName = Annotated[str, AfterValidator(checks.check_loss)]
DeepSpeedName = Annotated[str | None, AfterValidator(checks.check_deepspeed)]


class ConfigError(RaydpoError, ValueError):
    """An invalid configuration; the message names the file and the key path."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticData(Section):
    n_users: int = Field(2000, ge=10)
    n_items: int = Field(500, ge=12)
    n_genres: int = Field(8, ge=1)
    history_len: int = Field(10, ge=1)
    # shares of users in the valid and test splits (the rest train); more validation users give
    # a search's intervals and significance tests more power
    valid_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0


class DataConfig(Section):
    source: Literal["synthetic", "path"] = "synthetic"
    path: str | None = None  # a raydpo or SPRec-format folder (source: path)
    # a public dataset fetched into `path` when it is missing (relative paths: under the storage
    # root), so that a job brings its data with it; fetch_url: a mirror (BASE/<file>)
    fetch: Literal["goodreads"] | None = None
    fetch_url: str | None = None
    synthetic: SyntheticData = SyntheticData()

    @model_validator(mode="after")
    def _path_needed(self):
        if self.source == "path" and not self.path:
            raise ValueError("data.path is required when data.source is 'path'")
        if self.fetch and self.source != "path":
            raise ValueError("data.fetch needs data.source 'path' (the folder it fetches into)")
        return self


class ModelConfig(Section):
    name_or_path: ModelName = "tiny"  # tiny | smollm2-135m | hub id | local folder (must exist)
    dtype: str = "auto"  # bf16 on GPU and on CPUs with AVX512-BF16/AMX-BF16, else fp32
    # bitsandbytes: nf4 = the published QLoRA recipe (raydpo.models.quantization); needs raydpo[quant]
    quantization: Literal["none", "nf4", "int8"] = "none"
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # the nf4 matmuls
    # false: candidate generation and prediction load the base unquantised (in dtype), as published
    quantize_inference: bool = True


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
    warmup_steps: int = Field(0, ge=0)  # then linear decay
    max_length: int = Field(512, ge=16)
    max_rows: int | None = Field(None, ge=1)  # train only on the first rows of the train split
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
    # modules or .py files registering extra strategies; loaded before any strategy name is checked
    plugins: list[str] = []
    strategy: StrategyName = "clusterout_low"

    @field_validator("plugins")
    @classmethod
    def _load_plugins(cls, v: list[str]) -> list[str]:
        checks.load_plugins(v)
        return v

    n_negatives: int = Field(1, ge=1)
    seed: int = 0
    cluster_k: int = Field(3, ge=1)
    ignore_genres: list[str] = []
    ignore_genres_above: float | None = Field(None, gt=0, le=1)
    # split_histories (alias split): the whole split; candidates: the split's candidate records only
    # (the research code's scope); train_interactions: distinct train interactions
    exposure_scope: Literal["split_histories", "split", "candidates", "train_interactions"] = "split_histories"


class StageSection(Section):
    """One stage of a curriculum: its own negatives, loss, epochs and beta."""

    name: SafeName  # becomes a folder name
    strategy: StrategyName | None = None  # default: sampling.strategy
    learning_rate: float | None = Field(None, gt=0)  # default: alignment.learning_rate
    n_negatives: int | None = Field(None, ge=1)
    loss: LossName = "sigmoid"
    epochs: float = Field(1, gt=0)
    beta: float = Field(0.1, gt=0)


class AlignmentSection(Section):
    loss: LossName = "sigmoid"  # sigmoid (DPO, TRL) | TRL loss types | sdpo | dsdpo
    beta: float = Field(0.1, gt=0)
    epochs: float = Field(1, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)  # of every stage, then linear decay (the published DPO: 20)
    max_length: int = Field(512, ge=16)
    max_rows: int | None = Field(None, ge=1)  # each stage: only the first rows of its preference file
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
    # the base's dtype while predicting (None: model.dtype); bfloat16 decodes ~1.7x faster than
    # float32 on CPUs with AVX512-BF16 (configs/goodreads_smollm2_cpu.yaml)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None


class EvaluationSection(Section):
    split: Literal["valid", "test"] = "test"
    ks: list[Annotated[int, Field(ge=1)]] = Field([5, 10], min_length=1)
    protocol: Literal["reference", "valid_only"] = "reference"
    encoder: str = "minilm-onnx"


class RaySection(Section):
    address: str | None = None  # None: RAY_ADDRESS or a local ray.init()
    storage_path: str | None = None  # shared storage for multi-node Train/Tune (s3://... or an NFS path)
    num_workers: int = Field(1, ge=1)  # Ray Train workers per training run
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    deepspeed: DeepSpeedName = None  # None | zero2 | zero3 | path to an existing JSON config
    generation_actors: int = Field(1, ge=1)
    gpus_per_actor: float = Field(0, ge=0)
    shard_size: int = Field(256, ge=1)
    max_failures: int = Field(1, ge=0)


class PipelineConfig(Section):
    name: SafeName = "raydpo"
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

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [s.name for s in self.alignment.stages]
        dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if dup is not None:
            raise ValueError(f"alignment.stages: two stages are named {dup!r} (each becomes a folder)")
        from .models.quantization import combination_error

        err = combination_error(self.model.quantization, deepspeed=self.ray.deepspeed,
                                full_finetune=self.sft.enabled and self.sft.full_finetune)
        if err is not None:
            raise ValueError(err)
        if self.data.source == "synthetic" and max(self.evaluation.ks) > self.data.synthetic.n_items:
            raise ValueError(f"evaluation.ks: k={max(self.evaluation.ks)} exceeds the catalog size "
                             f"(data.synthetic.n_items = {self.data.synthetic.n_items})")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    """Every error as ``SOURCE: key.path: message``, joined on one line with '; '."""
    from .readers import one_line

    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        got = e.get("input")
        extra = (f" (got {one_line(repr(got), 80)})"
                 if e["type"] not in ("extra_forbidden", "value_error") and not isinstance(got, dict) else "")
        lines.append(f"{source}: {loc}: {msg}{extra}" if loc else f"{source}: {msg}")
    return one_line("; ".join(lines), 2000)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config (``None``: the embedded defaults)."""
    raw: dict = {}
    source = str(path) if path else "<defaults>"
    if path:
        raw = read_config_mapping(path)
    for key, value in (overrides or {}).items():
        set_path(raw, key, value, source=source)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def read_config_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file's top-level mapping; every failure is one ConfigError line naming the file: not
    found, a folder, unreadable, not UTF-8, invalid YAML, duplicate keys (with their key path), empty,
    or not a mapping."""
    from .readers import read_yaml

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"{p}: {what} not found")
    try:
        raw = read_yaml(p, what=what)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if raw is None:
        raise ConfigError(f"{p}: the {what} is empty (expected a YAML mapping of settings)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got a {type(raw).__name__}")
    bad = next((k for k in raw if not isinstance(k, str)), None)
    if bad is not None:
        raise ConfigError(f"{p}: {bad!r}: keys must be strings")
    return raw


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
