"""``raydpo train sft|dpo|curriculum|sprec CONFIG.yaml``: hook with :func:`add_training_parsers`.

CONFIG for ``sft`` / ``dpo``: ``model``, ``dataset``, ``output_dir``, ``ray`` and the stage under
``sft:`` / ``dpo:`` (the fields of SFTConfig / PreferenceConfig), or a full plan with
``stages:``. ``curriculum``: a Curriculum (``stages:`` list). ``sprec``: an SPRecConfig. Flags
override the config's ``output_dir`` and ``ray`` settings. Bad input exits with status 2 and one
line naming the file, the record and the field; ``--check`` only runs the checks.

Examples::

    # dpo.yaml                                  # curriculum.yaml
    model: {name_or_path: tiny}                 model: {name_or_path: tiny, adapter: runs/sft/final}
    dataset: data/synth                         dataset: data/synth
    output_dir: runs/dpo                        output_dir: runs/two-stages
    dpo:                                        stages:
      data: prefs/train.parquet                   - {name: out_low, data: a.parquet, loss: sigmoid}
      loss: sdpo          # sigmoid, ipo, ...     - {name: in_high, data: b.parquet, loss: sdpo,
      beta: 0.1                                      reference: start}   # or initial (previous)
      epochs: 1                                 ray: {num_workers: 2, deepspeed: zero2}
      reference: precomputed
    ray: {num_workers: 4, use_gpu: true, deepspeed: zero3, max_failures: 2}

    # sprec.yaml
    model: {name_or_path: tiny, adapter: runs/sft/final}
    dataset: data/synth
    output_dir: runs/sprec
    iterations: 3
    selfplay: {n_samples: 2048}
    sft: {epochs: 1, learning_rate: 2.0e-5}
    dpo: {loss: sigmoid, beta: 0.1, learning_rate: 2.0e-5}

    # QLoRA, as the published runs trained (any of the above; or --quantization nf4)
    model: {name_or_path: HuggingFaceTB/SmolLM2-1.7B-Instruct, quantization: nf4, compute_dtype: bfloat16}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_args import int_at_least
from ..errors import RaydpoError


def _overrides(data: dict, args: argparse.Namespace) -> dict:
    data = dict(data)
    if args.output_dir:
        data["output_dir"] = args.output_dir
    if data.get("ray") is not None and not isinstance(data.get("ray"), dict):
        from ..errors import RaydpoError

        raise RaydpoError(f"{args.config}: ray: expected a mapping of Ray Train settings, got "
                          f"{type(data['ray']).__name__}")
    ray = dict(data.get("ray") or {})
    for key in ("num_workers", "deepspeed", "max_failures", "storage_path"):
        v = getattr(args, key, None)
        if v is not None:
            ray[key] = None if (key == "deepspeed" and v == "none") else v
    if args.gpu:
        ray["use_gpu"] = True
    data["ray"] = ray
    quant = {k: getattr(args, k, None) for k in ("quantization", "compute_dtype")}
    if any(v is not None for v in quant.values()):
        if data.get("model") is not None and not isinstance(data.get("model"), dict):
            raise RaydpoError(f"{args.config}: model: expected a mapping of model settings, got "
                              f"{type(data['model']).__name__}")
        data["model"] = {**(data.get("model") or {}), **{k: v for k, v in quant.items() if v is not None}}
    return data


def _plan_dict(kind: str, data: dict) -> tuple[type, dict]:
    from .config import Curriculum, Plan, SPRecConfig

    if kind == "curriculum":
        return Curriculum, data
    if kind == "sprec":
        return SPRecConfig, data
    if "stages" in data:
        return Plan, data
    key = "sft" if kind == "sft" else next((k for k in ("dpo", "preference") if k in data), "dpo")
    if data.get(key) is not None and not isinstance(data.get(key), dict):
        from ..errors import RaydpoError

        raise RaydpoError(f"{key}: expected a mapping of stage settings, got {type(data[key]).__name__}")
    stage = dict(data.get(key) or {})
    stage["kind"] = "sft" if kind == "sft" else "preference"
    rest = {k: v for k, v in data.items() if k not in ("sft", "dpo", "preference")}
    return Plan, {**rest, "stages": [stage]}


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import build, load_yaml
    from .ray_train import run_plan

    data = _overrides(load_yaml(args.config), args)
    try:
        cls, data = _plan_dict(args.train_command, data)
    except RaydpoError as e:
        raise RaydpoError(f"{args.config}: {e}") from None
    cfg = build(cls, data, what=str(args.config))
    plan = cfg if cls.__name__ == "Plan" else cfg.to_plan()
    from ..outputs import check_output

    inputs = [args.config, plan.dataset, *(getattr(s, k, None) for s in plan.stages for k in ("data", "eval_data"))]
    inputs = [p for p in inputs if isinstance(p, str) and not p.startswith("@") and Path(p).exists()] + [args.config]
    check_output(plan.output_dir, kind="training", folder=True, inputs=inputs, resumable=True,
                 option="output_dir")
    if args.check:
        from .ray_train import prepare

        prepare(plan)
        print(f"{args.config}: OK ({len(plan.stages)} stages: {', '.join(s.name for s in plan.stages)})")
        return 0
    result = run_plan(plan)
    last = {}
    for m in result.metrics:
        last[m.get("stage")] = m
    for stage, m in last.items():
        shown = {k: round(v, 4) for k, v in m.items() if k in ("loss", "reward_accuracy", "reward_margin", "eval_loss")}
        print(f"{stage}: epoch {m.get('epoch')}, step {m.get('step')}: {json.dumps(shown)}")
    print(f"final {'adapter' if result.adapter_path else 'model'}: {result.final_path} (base {result.base_model})")
    return 0


def add_training_parsers(subparsers) -> argparse.ArgumentParser:
    """Add ``train sft|dpo|curriculum|sprec CONFIG.yaml`` to a ``raydpo`` subparsers object."""
    t = subparsers.add_parser("train", help="SFT, DPO/S-DPO/DS-DPO, curricula and SPRec on Ray Train",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = t.add_subparsers(dest="train_command", required=True, metavar="TRAIN_COMMAND")
    helps = {"sft": "supervised fine-tuning (LoRA by default)",
             "dpo": "a preference stage: DPO or any TRL loss, sdpo, dsdpo",
             "curriculum": "stages in order, each from the previous stage's adapter",
             "sprec": "the SPRec loop: self-play generation, SFT, DPO per iteration"}
    for name, help_ in helps.items():
        p = sub.add_parser(name, help=help_)
        p.add_argument("config", type=Path, help="YAML config")
        p.add_argument("--output-dir", help="override output_dir")
        p.add_argument("--num-workers", type=int_at_least(0), help="Ray Train workers (0: in this process, no Ray)")
        p.add_argument("--deepspeed", help="zero2, zero3, a JSON file, or none")
        p.add_argument("--max-failures", type=int_at_least(-1), help="worker failures to recover from (resume from checkpoint)")
        p.add_argument("--storage-path", help="Ray Train storage (shared storage on a multi-node cluster)")
        p.add_argument("--gpu", action="store_true", help="GPU workers")
        p.add_argument("--quantization", choices=["none", "nf4", "int8"],
                       help="override model.quantization: load the base quantised (nf4: QLoRA; needs raydpo[quant])")
        p.add_argument("--compute-dtype", choices=["auto", "bfloat16", "float16", "float32"],
                       help="override model.compute_dtype (the nf4 matmuls)")
        p.add_argument("--check", action="store_true", help="only check the config and the data, then exit")
        p.set_defaults(func=_cmd_train)
    return t


__all__ = ["add_training_parsers"]
