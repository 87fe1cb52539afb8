"""Ray job: large-scale self-play candidate generation, sharded over a GPU actor pool by Ray Data.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/generate.py \
        --data /mnt/shared/data/goodreads --out /mnt/shared/candidates/div10 \
        --model HuggingFaceTB/SmolLM2-1.7B-Instruct --adapter /mnt/shared/sft/adapter \
        --actors 8 --gpus-per-actor 1 --mode diverse_beam --n 10

Rerunning the same command after a crash resumes: finished shards are kept.
"""

import sys

from raydpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
