"""Ray job: the whole pipeline (data, SFT, candidates, negatives, alignment, prediction, evaluation).

Submit to a cluster (see cluster.yaml; `ray dashboard cluster.yaml` opens the tunnel first):

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/pipeline.py configs/goodreads_smollm2.yaml

Locally: python jobs/pipeline.py configs/quickstart.yaml [--from align]
"""

import sys

from raydpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
