"""Ray job: a multi-objective Ray Tune + Optuna search (NDCG max, ORRatio min; Pareto front).

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/tune.py search_spaces/strategy_comparison.yaml

Results go to STORAGE_ROOT/tune/NAME (RAYDPO_STORAGE or ray.storage_path; the job log prints every
location). After a stopped or failed job, submit the same command with --resume: the search is
found by its name (--name NAME to choose one) and continues. Locally: python jobs/tune.py
search_spaces/quickstart.yaml
"""

import sys

from raydpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
