"""Ray job entry: `ray job submit --working-dir . -- python jobs/forget.py --config FILE [dotted.key=value ...]`.

Same arguments as `python -m pipeline forget` (--keys/--urls/--sha256 FILE: a takedown over the whole run).
"""

import os
import sys

# Run as a script, sys.path[0] is jobs/; make it the repo root instead, so `import pipeline` works.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["forget", *sys.argv[1:]], prog="jobs/forget.py"))
