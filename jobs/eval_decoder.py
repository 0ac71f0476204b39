"""Ray job entry: `ray job submit --working-dir . -- python jobs/eval_decoder.py --config FILE [dotted.key=value ...]`.

Same arguments as `python -m pipeline eval-decoder` (held-out CLIP and pixel-read scores of DALL-E 2's decoder,
and its reconstruction grid).
"""

import os
import sys

# Run as a script, sys.path[0] is jobs/; make it the repo root instead, so `import pipeline` works.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval-decoder", *sys.argv[1:]], prog="jobs/eval_decoder.py"))
