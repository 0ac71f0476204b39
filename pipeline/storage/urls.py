"""Storage is a URL: a stage's location may be a local path or any fsspec URL (``s3://``, ``gs://``, ``file://``).

A cluster shares no disk, so object storage is the only truth. Libraries that can only write or read local files
(DeepSpeed checkpoint folders, TensorBoard, matplotlib, open_clip ``local-dir:``) work in a node-local folder:

- ``Workspace(url, rank)``: the local folder a process writes into, pushed to ``url`` at the stage's commit points
  (checkpoint saves, the end) and pulled from it where a run resumes. For a local ``url`` the folder *is* ``url``
  and push/pull do nothing, so a single machine keeps working in place.
- ``local_copy(url)``: a file or folder at ``url`` as a local path, through a node-local cache keyed by the
  object's name, size and ETag/mtime: a changed object is fetched again, and the cache is never read as the truth.

The node-local scratch root is ``$PIPELINE_SCRATCH`` or ``<tmp>/pipeline-scratch``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from pipeline.errors import NotFoundError, StorageError
from pipeline.storage.commit import atomic_output, fs_and_path, is_local, join, remove

__all__ = ["Workspace", "local_copy", "exists", "read_bytes", "read_json", "write_bytes", "write_json", "join",
           "is_local", "scratch_root", "check_writable"]


def scratch_root() -> str:
    return os.environ.get("PIPELINE_SCRATCH") or os.path.join(tempfile.gettempdir(), "pipeline-scratch")


def local_path(url: str) -> str:
    return os.path.abspath(url.removeprefix("file://"))


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ small reads/writes


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise NotFoundError(f"{url}: not found") from None


def read_json(url: str) -> Any:
    data = read_bytes(url)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{url}: not valid JSON ({exc})") from exc


def write_bytes(url: str, data: bytes) -> None:
    """``data`` at ``url`` whole or not at all (the one atomic write, ``commit.atomic_output``)."""
    with atomic_output(url) as f:
        f.write(data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())


def check_writable(url: str, what: str) -> None:
    """Fail before any work when ``url`` cannot be written: the URL and the reason, never a credential."""
    probe = join(url, f"_probe-{os.getpid()}-{_digest(os.urandom(8))}")
    try:
        fs, path = fs_and_path(probe)
        if is_local(url):
            os.makedirs(local_path(url), exist_ok=True)
        fs.pipe_file(path, b"")
        remove(fs, path)
    except Exception as exc:  # noqa: BLE001 - botocore/s3fs/os raise many types; name the URL and the reason
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise StorageError(f"{what} {url}: cannot write there ({reason})") from None


# ------------------------------------------------------------------------------------------------ the node cache


def _files(fs: Any, path: str) -> dict[str, dict[str, Any]]:
    """rel path → info of every file under ``path`` (or of ``path`` itself when it is a file)."""
    info = fs.info(path)
    if info["type"] != "directory":
        return {"": info}
    found = fs.find(path, detail=True)
    return {name[len(path):].lstrip("/"): i for name, i in found.items() if i.get("type") != "directory"}


def _version(info: dict[str, Any]) -> Any:
    return [info.get("size"), info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")]


def local_copy(url: str) -> str:
    """A local path holding what ``url`` holds (a file or a folder): ``url`` itself when it is local, else a copy in
    the node cache keyed by name, size and ETag (fetched whole into a temporary folder, then renamed in)."""
    if is_local(url):
        path = local_path(url)
        if not os.path.exists(path):
            raise NotFoundError(f"{url}: not found")
        return path
    fs, path = fs_and_path(url)
    try:
        files = _files(fs, path)
    except FileNotFoundError:
        raise NotFoundError(f"{url}: not found") from None
    key = _digest(url, sorted((k, _version(v)) for k, v in files.items()))
    name = path.rsplit("/", 1)[-1] or "object"
    slot = os.path.join(scratch_root(), "cache", key)
    target = os.path.join(slot, name)
    if os.path.exists(os.path.join(slot, ".complete")):
        return target
    tmp = f"{slot}.tmp-{os.getpid()}-{_digest(os.urandom(8))}"
    try:
        for rel in files:
            dest = os.path.join(tmp, name, rel) if rel else os.path.join(tmp, name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fs.get_file(f"{path}/{rel}" if rel else path, dest)
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, slot)
        except OSError:  # another process of this node filled the slot first: theirs is the same content
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------ the workspace


class Workspace:
    """A stage's output ``url`` and the node-local folder (``local``) this process writes into."""

    def __init__(self, url: str, rank: int = 0, role: str = "work"):
        self.url = url
        self.remote = not is_local(url)
        if self.remote:
            self.local = os.path.join(scratch_root(), role, _digest(url), f"rank{rank}")
            os.makedirs(self.local, exist_ok=True)
        else:
            self.local = local_path(url)
            os.makedirs(self.local, exist_ok=True)

    def at(self, *parts: str) -> str:
        """The local path of ``parts``."""
        return os.path.join(self.local, *parts)

    def url_of(self, *parts: str) -> str:
        return join(self.url, *parts)

    def push(self, *rels: str) -> None:
        """Upload these local files or folders (those that exist) to the same names under ``url``; each file is
        one whole PUT, so a reader sees the old or the new object, never a part."""
        if not self.remote:
            return
        fs, base = fs_and_path(self.url)
        for rel in rels:
            src = self.at(rel)
            try:
                if os.path.isdir(src):
                    for d, _, names in os.walk(src):
                        for n in names:
                            full = os.path.join(d, n)
                            fs.put_file(full, f"{base}/{os.path.relpath(full, self.local)}")
                elif os.path.isfile(src):
                    fs.put_file(src, f"{base}/{rel}")
            except OSError as exc:  # a bucket gone or unwritable mid-run: say which upload, not just "not found"
                raise StorageError(f"{join(self.url, rel)}: upload failed ({type(exc).__name__}: {exc}); "
                                   "nothing of it was committed, a rerun resumes from the last commit") from None

    def pull(self, *rels: str) -> list[str]:
        """Download these files or folders from ``url`` where they exist (replacing local copies); the ones found."""
        if not self.remote:
            return [r for r in rels if os.path.exists(self.at(r))]
        fs, base = fs_and_path(self.url)
        found = []
        for rel in rels:
            try:
                files = _files(fs, f"{base}/{rel}")
            except FileNotFoundError:
                continue
            dest_root = self.at(rel)
            if os.path.isdir(dest_root) and any(files) and "" not in files:
                shutil.rmtree(dest_root)
            for sub in files:
                dest = os.path.join(dest_root, sub) if sub else dest_root
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                fs.get_file(f"{base}/{rel}/{sub}" if sub else f"{base}/{rel}", dest)
            found.append(rel)
        return found

    def discard(self, rel: str) -> None:
        """Remove a local copy that is no longer needed (only where the truth is elsewhere)."""
        if self.remote:
            shutil.rmtree(self.at(rel), ignore_errors=True)
