#!/usr/bin/env bash
# One variant of the Goodreads + SmolLM2-135M CPU run (issue 12), end to end, timed:
#   scripts/goodreads_smollm2_cpu.sh configs/goodreads_smollm2_cpu.yaml [--set KEY=VALUE ...]
#   scripts/goodreads_smollm2_cpu.sh configs/goodreads_smollm2_cpu_nf4.yaml
# 1. raydpo run CONFIG                                   (data, SFT, candidates, selfplay, DPO, predict, evaluate)
# 2. raydpo run CONFIG --set sampling.strategy=clusterout_low   (reuses data, SFT, candidates)
# 3. raydpo predict with the SFT adapter + raydpo evaluate       (the SFT-only row, same decoding)
# Data: $RAYDPO_GOODREADS (default /work/shared/data/goodreads, else the config's data.fetch).
# Each step's wall time and the peak memory of its process tree (sum of RSS, sampled every 2 s)
# go to RUN_DIR.timings.jsonl; logs to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1; shift
py=.venv/bin/python
data=${RAYDPO_GOODREADS:-/work/shared/data/goodreads}
sets=("$@")
[ -d "$data" ] && sets+=("data.path=$data")
export RAY_ADDRESS=${RAY_ADDRESS:-local}   # its own Ray instance (two variants may run side by side)
run_dir=$($py - "$config" "${sets[@]}" <<'EOF'
import sys
from raydpo.cli_args import parse_sets
from raydpo.config import load_config
print(load_config(sys.argv[1], parse_sets([sys.argv[2:]])).run_dir)
EOF
)
timings="${run_dir%/}.timings.jsonl"
echo "config $config, run_dir $run_dir, timings $timings, $(nproc) CPUs, load: $(cut -d' ' -f1-3 /proc/loadavg)"

step() {  # step NAME COMMAND...: run it, record wall time and peak RSS of its process tree
  local name=$1; shift
  echo "== $name: $*"
  $py - "$name" "$timings" "$@" <<'EOF'
import json, subprocess, sys, time
import psutil
name, out, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
t0, load0 = time.time(), psutil.getloadavg()
p = subprocess.Popen(cmd)
peak_sum = peak_one = 0
loads = []
while p.poll() is None:
    try:
        procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
        rss = [q.memory_info().rss for q in procs if q.is_running()]
        peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss))
    except psutil.Error:
        pass
    loads.append(psutil.getloadavg()[0])
    time.sleep(2)
rec = {"step": name, "rc": p.returncode, "wall_s": round(time.time() - t0, 1),
       "peak_tree_rss_mb": round(peak_sum / 2**20), "peak_process_rss_mb": round(peak_one / 2**20),
       "load1_mean": round(sum(loads) / max(len(loads), 1), 2), "cmd": " ".join(cmd),
       "end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(json.dumps(rec), flush=True)
sys.exit(p.returncode)
EOF
}

args=()
for s in "${sets[@]}"; do args+=(--set "$s"); done
step selfplay .venv/bin/raydpo run "$config" "${args[@]}"
step clusterout_low .venv/bin/raydpo run "$config" "${args[@]}" --set sampling.strategy=clusterout_low

# the SFT-only row: the SFT adapter of this run, decoded exactly as the pipeline's predict stage
read -r -a sft_args < <($py - "$config" "${sets[@]}" <<'EOF'
import sys
from pathlib import Path
from raydpo.cli_args import parse_sets
from raydpo.config import load_config
from raydpo.pipeline import stage_keys
from raydpo.storage import resolve_config
c = resolve_config(load_config(sys.argv[1], parse_sets([sys.argv[2:]])))  # as raydpo run keys it
keys, run, m, p = stage_keys(c), Path(c.run_dir), c.model, c.prediction
quant = m.quantization if m.quantize_inference else "none"
args = ["--data", run / "data" / keys["data"] / "dataset", "--model", m.name_or_path,
        "--adapter", run / "sft" / keys["sft"] / "adapter", "--dtype", p.dtype or m.dtype,
        "--quantization", quant, "--batch-size", p.batch_size, "--split", c.evaluation.split,
        "--shard-size", c.ray.shard_size]
if quant != "none":
    args += ["--compute-dtype", m.compute_dtype]
if p.mode == "constrained":
    args += ["--constrained", "--beams", p.num_beams]
if p.max_new_tokens:
    args += ["--max-new-tokens", p.max_new_tokens]
print(" ".join(str(a) for a in args))
EOF
)
sft_out="${run_dir%/}_sft_only"
step sft_predict .venv/bin/raydpo predict "${sft_args[@]}" --out "$sft_out"
step sft_evaluate .venv/bin/raydpo evaluate "$sft_out/predictions.json" --data "${sft_args[1]}" \
  --json "$sft_out/metrics.json" --overwrite
echo "done: $timings"
