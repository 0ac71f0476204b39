"""Ray job entry: `ray job submit --working-dir . -- python jobs/dedup.py --config FILE [dotted.key=value ...]`.

Same arguments as `python -m pipeline dedup` (near-duplicates among the token shards → <tokens>/_dedup).
"""

import os
import sys

# Run as a script, sys.path[0] is jobs/; make it the repo root instead, so `import pipeline` works.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["dedup", *sys.argv[1:]], prog="jobs/dedup.py"))
