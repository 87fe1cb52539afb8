"""Tokens/s of a DPO step on one GPU: a randomly initialised model of SmolLM2-1.7B's architecture
(LlamaForCausalLM, hidden 2048, 24 layers, 32 heads, intermediate 8192, vocab 49152, tied
embeddings), bf16, LoRA r 16 on every projection, raydpo's training path:

* ``dpo``: TRL's DPOTrainer on raydpo-tokenised pairs (``raydpo.training.dpo``), reference =
  the base with the adapter disabled (one extra forward per step) or precomputed (``--precomputed``);
* ``sdpo``: raydpo's S-DPO trainer, ``--negatives`` per example, prompt shared.

Synthetic token ids (no tokenizer download): prompts of ``--prompt-len`` tokens (SmolLM2 prompts
of raydpo's format with a 10-title history are ~180 tokens), responses of ``--resp-len`` tokens
+ EOS. Tokens/s counts the prompt and response tokens of a step's examples (each pair's prompt
once per sequence it is in, as the model processes them), divided by the median step time after
``--warmup`` steps. Prints one JSON line with the card's name and the peak GPU memory.

    python benchmarks/gpu_dpo_tokens_per_s.py                  # dpo, batch 8 pairs
    python benchmarks/gpu_dpo_tokens_per_s.py --loss sdpo --negatives 5 --batch 4
    python benchmarks/gpu_dpo_tokens_per_s.py --small --steps 3  # CPU smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_1_7B = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                    rope_theta=130000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
SMALL = dict(SMOLLM2_1_7B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=4096)


def _tokenizer():
    """Any fast tokenizer with a pad and an EOS token: TRL needs a processing class, the data are ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "<eos>": 2, "a": 3}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<eos>", eos_token="<eos>", bos_token="<s>")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", choices=["dpo", "sdpo"], default="dpo")
    ap.add_argument("--batch", type=int, default=8, help="pairs (dpo) or examples (sdpo) per step")
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=180)
    ap.add_argument("--resp-len", type=int, default=12)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precomputed", action="store_true", help="reference log-probs precomputed (no ref forward)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--small", action="store_true", help="a tiny model of the same family (CPU smoke test)")
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydpo.training.common import WorkerContext, disable_dropout
    from raydpo.training.config import LoraSettings, PreferenceConfig
    from raydpo.training.reference import ReferenceSpec

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    arch = SMALL if args.small else SMOLLM2_1_7B
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**arch, dtype=dtype, attn_implementation="sdpa")).to(dtype)
    n_params = sum(p.numel() for p in model.parameters())
    from peft import get_peft_model

    model = get_peft_model(model, LoraSettings().peft_config())
    tok = _tokenizer()

    g = torch.Generator().manual_seed(1)
    V = arch["vocab_size"]

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    k = args.negatives if args.loss == "sdpo" else 1
    n_examples = args.batch * (args.steps + args.warmup + 1)
    examples = [{"prompt_ids": ids(args.prompt_len), "responses": [ids(args.resp_len) + [2] for _ in range(k + 1)]}
                for _ in range(n_examples)]
    if args.precomputed:
        for ex in examples:
            ex["ref_logps"] = [-30.0] * (k + 1)
    out = Path(tempfile.mkdtemp(prefix="gpu-dpo-"))
    ctx = WorkerContext(run_dir=out, use_gpu=cuda)
    st = PreferenceConfig(data="unused", loss="sdpo" if args.loss == "sdpo" else "sigmoid", beta=0.1,
                          batch_size=args.batch, epochs=1, learning_rate=1e-5,
                          gradient_checkpointing=args.gradient_checkpointing)
    times: list[float] = []
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    spec = ReferenceSpec(from_data=True) if args.precomputed else ReferenceSpec()
    if args.loss == "sdpo":
        from raydpo.training.sdpo import build_trainer
    else:
        from raydpo.training.dpo import build_trainer
    disable_dropout(model)
    trainer = build_trainer(st, model, tok, examples, None, ctx, out, [Timer()], spec)
    trainer.args.max_steps = args.steps + args.warmup
    trainer.args.save_strategy = "no"
    trainer.args.logging_steps = 10**6
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    body = times[args.warmup:] or times
    step = statistics.median(body)
    if args.loss == "sdpo":  # one row per example: the prompt once, then 1 + K responses
        tokens = args.batch * (args.prompt_len + (k + 1) * (args.resp_len + 1))
    else:  # TRL: chosen and rejected rows, each with the prompt
        tokens = args.batch * 2 * (args.prompt_len + args.resp_len + 1)
    result = {
        "card": torch.cuda.get_device_name(0) if cuda else "cpu (no GPU)",
        "model": "random SmolLM2-1.7B architecture" if not args.small else "small smoke-test model",
        "params": n_params, "dtype": str(dtype).replace("torch.", ""), "loss": args.loss, "batch": args.batch,
        "negatives": k, "prompt_len": args.prompt_len, "resp_len": args.resp_len,
        "reference": "precomputed" if args.precomputed else "adapter disabled (extra forward)",
        "gradient_checkpointing": args.gradient_checkpointing, "steps_timed": len(body),
        "step_s_median": round(step, 4), "tokens_per_step": tokens, "tokens_per_s": round(tokens / step, 1),
        "examples_per_s": round(args.batch / step, 2),
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
