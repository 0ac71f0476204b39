"""Ray job entry: `ray job submit --working-dir . -- python jobs/import_embeddings.py --config FILE [key=value ...]`.

Same arguments as `python -m pipeline import-embeddings` (published CLIP embeddings → token shards without image
tokens).
"""

import os
import sys

# Run as a script, sys.path[0] is jobs/; make it the repo root instead, so `import pipeline` works.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["import-embeddings", *sys.argv[1:]], prog="jobs/import_embeddings.py"))
