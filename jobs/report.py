"""Ray job entry: `ray job submit --working-dir . -- python jobs/report.py --config FILE [dotted.key=value ...]`.

Same arguments as `python -m pipeline report`; inside a Ray job it joins the job's cluster (RAY_ADDRESS).
"""

import os
import sys

# Run as a script, sys.path[0] is jobs/; make it the repo root instead, so `import pipeline` works and this
# file's name cannot shadow a standard-library module of the same name.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]], prog="jobs/report.py"))
