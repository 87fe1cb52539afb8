"""Typed settings of every training run, loadable from a YAML mapping.

A run is a :class:`Plan`: a starting model, an output folder, a list of stages and how to run
them on Ray. Three kinds of stage exist:

``sft``         supervised fine-tuning on (prompt, chosen) pairs, loss on the response only
                (:class:`SFTConfig`);
``preference``  DPO through TRL (``loss`` = any TRL loss type), S-DPO (``loss: sdpo``) or
                DS-DPO (``loss: dsdpo``) (:class:`PreferenceConfig`);
``selfplay``    self-play generation with the current model, producing the preference data
                of the stages after it (:class:`SelfPlayConfig`; the SPRec loop).

Each stage starts from the previous stage's output (its LoRA adapter, or a full model after a
full fine-tuning SFT stage). :class:`Curriculum` and :class:`SPRecConfig` are front ends that
build a :class:`Plan`. Every check that needs no model runs when a config is built, so bad
input fails before any worker starts (:func:`raydpo.training.ray_train.validate_plan` adds the
checks that need the data).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import RaydpoError

# the loss types of TRL 1.16's DPOTrainer (trl/trainer/dpo_config.py)
TRL_LOSSES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
OUR_LOSSES = ("sdpo", "dsdpo")
# the research code's DS-DPO beta mapping per distance type (method.md 6.3)
DEFAULT_DSDPO_MAPPING = {"dc": "linear", "dp": "linear", "dpc": "sigmoid"}
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REFERENCE_KEYWORDS = ("initial", "previous", "start", "sft", "adapter_disabled", "precomputed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# DPOConfig fields that only some of TRL 1.16's losses read (trl/trainer/dpo_trainer.py, _compute_loss)
TRL_LOSS_ONLY_ARGS = {
    "label_smoothing": ("exo_pair", "robust", "aot", "aot_unpaired"),
    "discopop_tau": ("discopop",),
    "f_divergence_type": ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"),
    "use_weighting": tuple(x for x in TRL_LOSSES if x not in ("aot", "aot_unpaired")),
}


def ignored_trl_args(loss: str, trl_args: dict[str, Any]) -> str | None:
    """Why a ``trl_args`` setting would have no effect (or be refused by TRL) with ``loss``, as
    one line naming the key, or None. A value equal to TRL's default is never an error."""
    from dataclasses import MISSING, fields

    from trl import DPOConfig

    defaults = {f.name: (f.default if f.default is not MISSING else None) for f in fields(DPOConfig)}
    for key, value in trl_args.items():
        if value == defaults.get(key):
            continue
        if loss in OUR_LOSSES:
            return (f"trl_args.{key}: loss {loss!r} is trained by raydpo's multi-negative trainer, which takes no "
                    "TRL DPOConfig fields")
        users = TRL_LOSS_ONLY_ARGS.get(key)
        if users is not None and loss not in users:
            return (f"trl_args.{key}: TRL's {loss!r} loss ignores it (TRL 1.16 uses it with loss "
                    f"{', '.join(users)})")
        if key == "f_alpha_divergence_coef" and trl_args.get("f_divergence_type") != "alpha_divergence":
            return "trl_args.f_alpha_divergence_coef: used only with f_divergence_type: alpha_divergence"
    return None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- model and adapter ---------------------------------------------------------------------------


class LoraSettings(_Strict):
    """A new LoRA adapter. ``target_modules`` defaults to every linear projection of a Llama
    block (the 2025-12 published configs; the 1.7B headline SFT used only q_proj, v_proj)."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS), min_length=1)

    def peft_config(self):
        from peft import LoraConfig, TaskType

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type=TaskType.CAUSAL_LM)


class ModelSettings(_Strict):
    """The model a plan starts from: a preset (``tiny`` needs ``Plan.dataset``), a local folder
    or a hub id, optionally with a LoRA adapter to keep training (e.g. the SFT adapter)."""

    name_or_path: str = "tiny"
    adapter: str | None = None
    dtype: str = "auto"
    quantization: str = Field("none", description="none | nf4 | int8 (bitsandbytes; QLoRA with nf4)")
    compute_dtype: str = Field("auto", description="nf4 matmuls: auto | bfloat16 | float16 | float32")

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, v: str) -> str:
        from ..models.quantization import check_quantization

        return check_quantization(v)

    @field_validator("compute_dtype")
    @classmethod
    def _compute_dtype(cls, v: str) -> str:
        from ..models.quantization import check_compute_dtype

        return check_compute_dtype(v)

    @field_validator("name_or_path")
    @classmethod
    def _model(cls, v: str) -> str:
        from ..checks import check_model_name

        return check_model_name(v)

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"adapter folder {v!r} does not exist")
        return v


# --- stages --------------------------------------------------------------------------------------


class _TrainStage(_Strict):
    name: str | None = None
    data: str | None = Field(None, description="preference file (.parquet/.jsonl), a dataset folder (SFT), "
                                               "or '@STAGE' for a self-play stage's output")
    split: str = "train"  # when ``data`` is a dataset folder
    eval_data: str | None = None
    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    batch_size: int = Field(2, ge=1, description="per worker")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=8, description="prompt + longest response, in tokens; longer rows are an error")
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: str = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = Field(1, ge=1)
    checkpoint_every_steps: int | None = Field(None, ge=1, description="default: one checkpoint per epoch")
    max_rows: int | None = Field(None, ge=1, description="use only the first rows of the data")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        if v is not None and not _NAME.match(v):
            raise ValueError(f"stage name {v!r} must be letters, digits, '_', '.' or '-' (it names a folder; no "
                             "'..', path separators or absolute paths)")
        return v


class SFTConfig(_TrainStage):
    """Supervised fine-tuning on (prompt, chosen): LoRA by default, ``lora: null`` for full
    fine-tuning (the stage then writes a full model). A stage that starts from an adapter keeps
    training that adapter."""

    kind: Literal["sft"] = "sft"
    learning_rate: float = Field(2e-4, gt=0)
    lora: LoraSettings | None = Field(default_factory=LoraSettings)


class DSDPOSettings(_Strict):
    """DS-DPO: a per-negative beta from item-embedding distances (method.md 6.3), normalised by
    the range of the *same* distance type over each example's own negatives (the reference
    normalised dc by the dpc range).

    ``mapping`` defaults to the research code's per distance type: ``linear`` for ``dc`` and
    ``dp``, ``sigmoid`` (temperature ``temperature``) for ``dpc``; give it to choose either."""

    embeddings: str = Field(..., description="[n_items, d] .npy/.pt in item-id order, or an encoder spec "
                                             "(minilm-onnx, st:NAME) to embed the catalog titles")
    distance: Literal["dc", "dp", "dpc"] = "dpc"
    beta_min: float = Field(0.01, gt=0)
    beta_max: float = Field(0.2, gt=0)
    mapping: Literal["linear", "sigmoid"] = Field(
        None, validate_default=False,
        description="linear | sigmoid; default: the research code's (dc, dp: linear; dpc: sigmoid)")
    temperature: float = Field(0.8, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _default_mapping(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mapping") in (None, "auto"):
            data = {**data, "mapping": DEFAULT_DSDPO_MAPPING.get(data.get("distance", "dpc"), "sigmoid")}
        return data

    @model_validator(mode="after")
    def _range(self) -> DSDPOSettings:
        if self.beta_max < self.beta_min:
            raise ValueError(f"beta_max ({self.beta_max}) must be >= beta_min ({self.beta_min})")
        return self


class PreferenceConfig(_TrainStage):
    """A preference-optimisation stage.

    ``loss``: a TRL loss type (``sigmoid`` is DPO) trained by TRL's ``DPOTrainer`` on pairs
    (``pairs: first`` keeps each row's first negative, ``all`` makes one pair per negative), or
    ``sdpo`` / ``dsdpo`` trained by raydpo's multi-negative trainer.

    ``reference``: ``initial`` (alias ``previous``; the model this stage starts from, as the
    published runs did), ``start`` (alias ``sft``; the model the plan starts from, e.g. the SFT
    adapter), ``adapter_disabled`` (the base model), ``precomputed`` (``ref_chosen_logps`` /
    ``ref_rejected_logps`` columns of the data, else computed once from ``initial`` before
    training), ``stage:NAME`` (the output of an earlier stage) or a path to a LoRA adapter.
    ``precompute_reference``: compute the reference log-probabilities once before training
    instead of in every step.
    """

    kind: Literal["preference"] = "preference"
    loss: str = "sigmoid"
    beta: float = Field(0.1, description="> 0")
    reference: str = "initial"
    precompute_reference: bool = False
    pairs: Literal["first", "all"] = "first"
    max_negatives: int | None = Field(None, ge=1, description="S-DPO: keep the first K negatives of each row")
    share_prompt: bool = True
    disable_dropout: bool = True
    lora: LoraSettings = Field(default_factory=LoraSettings, description="used when the stage starts without an adapter")
    dsdpo: DSDPOSettings | None = None
    trl_args: dict[str, Any] = Field(default_factory=dict, description=(
        "extra TRL DPOConfig fields for a TRL loss, e.g. label_smoothing with loss robust, exo_pair or aot; "
        "a field the chosen loss ignores is an error"))

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"beta must be > 0, got {v}")
        return v

    @field_validator("loss")
    @classmethod
    def _loss(cls, v: str) -> str:
        if v not in TRL_LOSSES + OUR_LOSSES:
            raise ValueError(f"unknown loss {v!r}; expected one of {', '.join(TRL_LOSSES + OUR_LOSSES)}")
        return v

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        if v in REFERENCE_KEYWORDS or v.startswith("stage:"):
            return {"previous": "initial", "sft": "start"}.get(v, v)
        if not Path(v).expanduser().exists():
            raise ValueError(f"reference {v!r} is not one of {', '.join(REFERENCE_KEYWORDS)}, 'stage:NAME', "
                             "or an existing adapter folder")
        return str(Path(v).expanduser().resolve())

    @field_validator("trl_args")
    @classmethod
    def _trl_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        from dataclasses import fields

        from trl import DPOConfig

        known = {f.name for f in fields(DPOConfig)}
        managed = {"beta", "loss_type", "learning_rate", "num_train_epochs", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "output_dir", "deepspeed", "precompute_ref_log_probs",
                   "max_length", "use_cpu", "bf16", "fp16"}
        for k in v:
            if k not in known:
                raise ValueError(f"trl_args: {k!r} is not a DPOConfig field")
            if k in managed:
                raise ValueError(f"trl_args: {k!r} is set by raydpo; use the stage field instead")
        return v

    @model_validator(mode="after")
    def _trl_args_used(self) -> PreferenceConfig:
        bad = ignored_trl_args(self.loss, self.trl_args)
        if bad:
            raise ValueError(bad)
        return self

    @model_validator(mode="after")
    def _dsdpo(self) -> PreferenceConfig:
        if self.loss == "dsdpo" and self.dsdpo is None:
            raise ValueError("loss 'dsdpo' needs the 'dsdpo' settings (embeddings, distance, beta range)")
        if self.loss != "dsdpo" and self.dsdpo is not None:
            raise ValueError(f"'dsdpo' settings given but loss is {self.loss!r}")
        if self.reference == "precomputed" and self.precompute_reference:
            raise ValueError("reference 'precomputed' already precomputes; drop precompute_reference")
        return self


class SelfPlayConfig(_Strict):
    """Self-play generation (SPRec, method.md 9): the current model decodes one negative per
    sampled row of ``split``; the rows become the preference data of the stages that name this
    stage as ``data: '@NAME'``. Decoding defaults to one constrained beam that excludes the
    target and the history, so every negative is a catalog title that differs from the target
    (the published loop used free greedy text, skipped rows without a quoted title and left a
    trailing-newline shortcut in the data)."""

    kind: Literal["selfplay"] = "selfplay"
    name: str | None = None
    split: str = "train"

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str | None) -> str | None:
        from ..checks import check_name

        return check_name(v, "stage name")  # the stage's output folder is named after it
    n_samples: int | None = Field(None, ge=1, description="rows sampled (seeded) from the split; all when null")
    seed: int = 0
    decode: dict[str, Any] = Field(default_factory=lambda: {"mode": "beam", "num_return_sequences": 1,
                                                            "constrained": True, "exclude_target": True,
                                                            "exclude_history": True, "batch_size": 16})

    @field_validator("decode")
    @classmethod
    def _decode(cls, v: dict[str, Any]) -> dict[str, Any]:
        from dataclasses import fields

        from ..generation.candidates import DecodeConfig

        known = {f.name for f in fields(DecodeConfig)}
        bad = sorted(set(v) - known)
        if bad:
            raise ValueError(f"decode: unknown settings {bad}; known: {sorted(known)}")
        merged = {"mode": "beam", "num_return_sequences": 1, "constrained": True, "exclude_target": True,
                  "exclude_history": True, "batch_size": 16, **v}
        if not merged.get("exclude_target", True):
            raise ValueError("decode.exclude_target must stay true: a negative equal to the target is no negative")
        if not merged.get("constrained", True):
            raise ValueError("decode.constrained must stay true: free text may not be a catalog item")
        try:
            DecodeConfig(**merged)
        except RaydpoError as e:
            raise ValueError(str(e)) from None
        return merged


StageConfig = Annotated[SFTConfig | PreferenceConfig | SelfPlayConfig, Field(discriminator="kind")]


# --- Ray Train -----------------------------------------------------------------------------------


class RayTrainSettings(_Strict):
    """How a plan runs: ``num_workers`` Ray Train workers (GPU workers with ``use_gpu``, else CPU
    workers on gloo); ``num_workers: 0`` runs in this process without Ray (no DeepSpeed, no
    checkpoints; for quick experiments and tests). ``deepspeed``: ``zero2``, ``zero3``, a JSON
    file, or null for plain DDP."""

    num_workers: int = Field(2, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    deepspeed: str | None = None
    offload_optimizer: bool = False
    storage_path: str | None = None  # default: OUTPUT_DIR/ray
    name: str | None = None  # the Ray Train run name (a folder under storage_path)
    max_failures: int = Field(0, ge=-1)
    checkpoint_keep: int | None = Field(2, ge=1)
    fail_at_step: int | None = Field(None, ge=1, description="testing: kill a worker at this step (after a 5 s wait "
                                      "so that Ray has registered its last checkpoint), first attempt only")
    fail_rank: int = Field(1, ge=0)
    torch_extensions_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _run_name(cls, v: str | None) -> str | None:
        from ..checks import check_name

        return check_name(v, "run name")

    @field_validator("deepspeed")
    @classmethod
    def _ds(cls, v: str | None) -> str | None:
        if v is None or v in ("zero2", "zero3"):
            return v
        p = Path(v).expanduser()
        if not p.is_file():
            raise ValueError(f"deepspeed must be 'zero2', 'zero3', null or a JSON file; {v!r} is none of these")
        return str(p.resolve())

    @model_validator(mode="after")
    def _local(self) -> RayTrainSettings:
        if self.num_workers == 0 and self.deepspeed is not None:
            raise ValueError("deepspeed needs Ray Train workers (num_workers >= 1)")
        if self.fail_at_step is not None and self.num_workers == 0:
            raise ValueError("fail_at_step (failure injection) needs Ray Train workers (num_workers >= 1)")
        if self.fail_at_step is not None and self.fail_rank >= self.num_workers:
            raise ValueError(f"fail_rank {self.fail_rank} >= num_workers {self.num_workers}")
        return self


# --- plans and front ends ------------------------------------------------------------------------


def _quantization_checks(model: ModelSettings, stages: list, ray: RayTrainSettings, where: str = "stages") -> None:
    """Combinations that cannot work with a quantised base, one line naming the key path."""
    from ..models.quantization import combination_error

    err = combination_error(model.quantization, deepspeed=ray.deepspeed)
    for i, st in enumerate(stages):
        if err is None and isinstance(st, SFTConfig) and st.lora is None:
            key = f"{where}[{i}].lora" if where == "stages" else f"{where}.lora"
            err = combination_error(model.quantization, full_finetune=True, full_key=key)
    if err is not None:
        raise ValueError(err)


def _default_kind(data: Any) -> Any:
    """A stage without ``kind`` is a preference stage."""
    if isinstance(data, dict) and isinstance(data.get("stages"), list):
        data = dict(data)
        data["stages"] = [{**st, "kind": st.get("kind", "preference")} if isinstance(st, dict) else st
                          for st in data["stages"]]
    return data


class Plan(_Strict):
    """A starting model, stages run in order, and how to run them (a stage without ``kind`` is a
    preference stage)."""

    _kind = model_validator(mode="before")(_default_kind)

    model: ModelSettings = Field(default_factory=ModelSettings)
    dataset: str | None = Field(None, description="raydpo dataset folder: the catalog (tiny model, self-play, "
                                                  "DS-DPO histories) and SFT data")
    output_dir: str
    stages: list[StageConfig] = Field(..., min_length=1)
    ray: RayTrainSettings = Field(default_factory=RayTrainSettings)

    @model_validator(mode="after")
    def _names(self) -> Plan:
        seen: set[str] = set()
        for i, st in enumerate(self.stages):
            if st.name is None:
                st.name = f"{i:02d}-{st.kind}"
            if st.name in seen:
                raise ValueError(f"two stages are named {st.name!r}")
            seen.add(st.name)
        names = [s.name for s in self.stages]
        for i, st in enumerate(self.stages):
            before = names[:i]
            if isinstance(st, (SFTConfig, PreferenceConfig)):
                if st.data is None:
                    raise ValueError(f"stage {st.name!r}: no data")
                if st.data.startswith("@"):
                    src = st.data[1:]
                    kinds = {s.name: s.kind for s in self.stages[:i]}
                    if kinds.get(src) != "selfplay":
                        raise ValueError(f"stage {st.name!r}: data {st.data!r} must name an earlier selfplay stage")
            if isinstance(st, PreferenceConfig) and st.reference.startswith("stage:"):
                ref = st.reference[len("stage:"):]
                if ref not in before:
                    raise ValueError(f"stage {st.name!r}: reference {st.reference!r} must name an earlier stage")
                if next(s for s in self.stages if s.name == ref).kind == "selfplay":
                    raise ValueError(f"stage {st.name!r}: reference {st.reference!r} is a selfplay stage (no model)")
        if any(s.kind == "selfplay" for s in self.stages) and self.dataset is None:
            raise ValueError("selfplay stages need 'dataset'")
        if self.model.name_or_path.lower() == "tiny" and self.dataset is None:
            raise ValueError("model 'tiny' needs 'dataset' (its tokenizer is trained on the catalog)")
        _quantization_checks(self.model, self.stages, self.ray)
        return self

    def stage(self, name: str):
        return next(s for s in self.stages if s.name == name)


class Curriculum(_Strict):
    """Stages in order, each with its own preference data, loss, epochs and beta, each starting
    from the previous stage's adapter. The reference of each stage is its ``reference``
    (``initial`` = the previous stage, as published; ``start`` = the model the curriculum starts
    from, e.g. the SFT adapter)."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    dataset: str | None = None
    output_dir: str
    stages: list[StageConfig] = Field(..., min_length=1)
    ray: RayTrainSettings = Field(default_factory=RayTrainSettings)

    _kind = model_validator(mode="before")(_default_kind)

    @model_validator(mode="after")
    def _quantized(self) -> Curriculum:
        _quantization_checks(self.model, self.stages, self.ray)
        return self

    def to_plan(self) -> Plan:
        return Plan(model=self.model, dataset=self.dataset, output_dir=self.output_dir,
                    stages=[s.model_copy() for s in self.stages], ray=self.ray)


class SPRecConfig(_Strict):
    """The SPRec loop (method.md 9): ``iterations`` x (self-play generation with the current
    model -> SFT on the sampled rows -> DPO on the self-play pairs with the SFT model as the
    reference). ``sft: null`` skips the SFT step (CE's one-iteration reproduction)."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    dataset: str
    output_dir: str
    iterations: int = Field(1, ge=1)
    selfplay: SelfPlayConfig = Field(default_factory=SelfPlayConfig)
    sft: SFTConfig | None = Field(default_factory=lambda: SFTConfig(epochs=1, learning_rate=2e-5, batch_size=4))
    dpo: PreferenceConfig = Field(default_factory=lambda: PreferenceConfig(loss="sigmoid", beta=0.1,
                                                                            learning_rate=2e-5, warmup_steps=0))
    ray: RayTrainSettings = Field(default_factory=RayTrainSettings)

    @model_validator(mode="after")
    def _data_free(self) -> SPRecConfig:
        for part in (self.sft, self.dpo):
            if part is not None and part.data is not None:
                raise ValueError("sprec: sft/dpo take their data from the self-play step; remove 'data'")
        _quantization_checks(self.model, [self.sft] if self.sft is not None else [], self.ray, where="sft")
        return self

    def to_plan(self) -> Plan:
        stages: list = []
        for it in range(self.iterations):
            sp = self.selfplay.model_copy(update={"name": f"it{it}-selfplay", "seed": self.selfplay.seed + it})
            stages.append(sp)
            if self.sft is not None:
                stages.append(self.sft.model_copy(update={"name": f"it{it}-sft", "data": f"@{sp.name}"}))
            stages.append(self.dpo.model_copy(update={"name": f"it{it}-dpo", "data": f"@{sp.name}"}))
        return Plan(model=self.model, dataset=self.dataset, output_dir=self.output_dir, stages=stages, ray=self.ray)


# --- loading -------------------------------------------------------------------------------------


def format_validation_error(e: ValidationError, what: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x in ("sft", "preference",
                                                                                           "selfplay")))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{what}: " + "; ".join(parts)


def build(cls, data: dict[str, Any] | BaseModel, what: str | None = None):
    """``cls(**data)`` with pydantic errors turned into one RaydpoError line per field."""
    if isinstance(data, cls):
        return data
    if isinstance(data, BaseModel):
        data = data.model_dump()
    if not isinstance(data, dict):
        raise RaydpoError(f"{what or cls.__name__}: expected a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise RaydpoError(format_validation_error(e, what or cls.__name__)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A training config's top-level mapping; every failure (not found, a folder, unreadable, not
    UTF-8, malformed YAML, duplicate keys, empty, not a mapping) is one line naming the file."""
    from ..config import read_config_mapping

    return read_config_mapping(path)


def load_config(path: str | Path, cls=Plan):
    """Read a YAML file into ``cls`` (:class:`Plan`, :class:`Curriculum`, :class:`SPRecConfig`)."""
    return build(cls, load_yaml(path), what=str(path))


__all__ = [
    "ALL_PROJECTIONS",
    "OUR_LOSSES",
    "TRL_LOSSES",
    "Curriculum",
    "DSDPOSettings",
    "LoraSettings",
    "ModelSettings",
    "Plan",
    "PreferenceConfig",
    "RayTrainSettings",
    "SFTConfig",
    "SPRecConfig",
    "SelfPlayConfig",
    "StageConfig",
    "build",
    "load_config",
    "load_yaml",
]
