"""The clip-retrieval environment: ``benchmarks/.peer-venv`` (gitignored), built by ``make setup`` and used by the
tokenize benchmark (clip-retrieval's ``clip_inference``) and by the test that serves an export through
``clip-retrieval back``.

clip-retrieval pins numpy<2, pyarrow<16 and fire<0.6, so it is not installed in the project venv: this venv holds
``clip-retrieval`` and the few packages its import needs that the project venv lacks, all ``--no-deps`` at pinned
versions, on top of the project venv's own packages (a ``.pth`` file), so both sides run the same torch, open_clip,
numpy, pyarrow and Pillow. Rebuilt when the pins change.

    python benchmarks/peer_venv.py      # build it (or find it current); prints its python
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_VENV = os.path.join(REPO, "benchmarks", ".peer-venv")
# clip-retrieval and what importing it needs beyond the project venv (its package __init__ imports clip_back and
# clip_inference, so flask-restful/h5py/faiss/autofaiss and all_clip's loaders too).
PEER_PACKAGES = [
    "clip-retrieval==2.45.0", "all-clip==1.3.0", "clip-anytorch==2.6.0", "flask-restful==0.3.10",
    "aniso8601==10.0.1", "h5py==3.16.0", "faiss-cpu==1.15.1", "autofaiss==2.18.0", "embedding-reader==1.8.1",
    "sentence-transformers==6.2.0", "transformers==5.23.0", "tokenizers==0.23.3", "scikit-learn==1.9.1",
    "joblib==1.6.0", "threadpoolctl==3.8.0", "cloudpickle==3.1.2", "narwhals==2.29.0",
]
_STAMP = os.path.join(PEER_VENV, ".bench-packages")
_PYTHON = os.path.join(PEER_VENV, "bin", "python")


def current() -> bool:
    """Whether the venv exists and holds exactly ``PEER_PACKAGES``."""
    return os.path.exists(_STAMP) and open(_STAMP).read() == "\n".join(PEER_PACKAGES) and os.path.exists(_PYTHON)


def peer_python() -> str:
    """The venv's python; raises (never builds: tests reach no registry) when ``make setup`` has not built it."""
    if not current():
        raise RuntimeError(f"{PEER_VENV} is missing or stale: run `make setup` (or python benchmarks/peer_venv.py)")
    return _PYTHON


def ensure_peer_venv() -> dict[str, Any]:
    """Build the venv unless it is current; its python and how long building took."""
    if current():
        return {"python": _PYTHON, "built_s": 0.0}
    t0 = time.perf_counter()
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", PEER_VENV], check=True, capture_output=True)
    site = subprocess.run([_PYTHON, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "_project_venv.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([_PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           *PEER_PACKAGES], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"pip install into {PEER_VENV} failed: {proc.stderr[-1500:]}")
    with open(_STAMP, "w") as f:
        f.write("\n".join(PEER_PACKAGES))
    return {"python": _PYTHON, "built_s": time.perf_counter() - t0}


if __name__ == "__main__":
    print(ensure_peer_venv()["python"])
