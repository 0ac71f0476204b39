"""Entry for DALL-E 2's decoder, three ways:

    ray job submit --working-dir . -- python jobs/train_decoder.py --config FILE [dotted.key=value ...]
    python jobs/train_decoder.py --config FILE [...]              (same as `python -m pipeline train-decoder`)
    deepspeed --hostfile H jobs/train_decoder.py --config FILE [...]   (multi-node: this file is each rank's entry)

Under the deepspeed launcher (it sets RANK and LOCAL_RANK) every rank trains directly; otherwise the
stage runs and starts its ranks itself (deepspeed launcher or, with decoder.launcher=ray, Ray Train workers).
"""

import os
import sys

# Run as a script, sys.path[0] is jobs/; make it the repo root instead, so `import pipeline` works and this
# file's name cannot shadow a standard-library module of the same name.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _started_by_deepspeed() -> bool:
    # The launcher's per-rank environment (torchrun's too); a Ray job's driver or a shell has neither variable.
    return "LOCAL_RANK" in os.environ and "RANK" in os.environ


if __name__ == "__main__":
    if _started_by_deepspeed():
        from pipeline.decoder.train import main as rank_main

        rank_main(sys.argv[1:])
    else:
        from pipeline.cli import main

        sys.exit(main(["train-decoder", *sys.argv[1:]], prog="jobs/train_decoder.py"))
