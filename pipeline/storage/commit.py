"""The shard commit protocol shared by every stage that writes shards.

Why: fsspec/s3fs can publish partial objects when a writer dies, and reruns of naive writers append duplicates. So a
shard's data files are written first (under a temporary name where the filesystem can rename atomically), and a
small marker ``{shard:05d}.done.json`` is written **last**. Readers and resumers trust only shards with a marker.

A run folder also holds ``_run.json``: the fingerprinted settings that shape the shards. A rerun whose settings
differ is refused before it writes anything, with the list of keys that changed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any

import fsspec

from pipeline.errors import RunMismatchError, StorageError
from pipeline.storage.faults import fault_point

__all__ = ["RunMismatchError"]  # callers catch it from here too


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path.rstrip("/")


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def join(base: str, *parts: str) -> str:
    """``base`` (a local path or any fsspec URL) joined with ``parts`` as a URL: ``s3://b/run`` + ``tokens`` is
    ``s3://b/run/tokens`` (``pathlib`` would drop a slash of the scheme and give ``s3:/b/run/tokens``)."""
    out = base.rstrip("/") if base not in ("", "/") else base
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}" if out and out != "/" else f"{out}{part}"
    return out


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs: the filesystem a library that cannot read URLs can open."""
    return "://" not in url or url.startswith("file://")


@contextlib.contextmanager
def atomic_output(url: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """A file to write whose content appears at ``url`` whole or not at all: every writer of the project publishes
    through here (or ``atomic_write``). Locally a temporary file beside the target, fsynced and renamed over it; on
    an object store a local temporary file uploaded with one PUT once it is complete. On an exception the temporary
    file is removed and the target is left as it was."""
    fs, path = fs_and_path(url)
    local = _is_local(fs)
    if local:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    else:
        fd, tmp = tempfile.mkstemp(prefix="pipeline-upload-")
        os.close(fd)
    written = 0
    try:
        with open(tmp, mode) as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            finally:
                written = f.tell()
        if local:
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise storage_full(url, "writing", written) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def storage_full(location: str, doing: str, needed: int) -> StorageError:
    """The one-line error for a full disk: where, doing what, how many bytes were needed and how many are free."""
    free = ""
    if is_local(location):
        probe = os.path.abspath(location.removeprefix("file://"))
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        free = f", {shutil.disk_usage(probe).free:,} bytes free"
    return StorageError(f"{location}: no space left on the device {doing} ({needed:,} bytes needed{free}); free some "
                        "space and rerun: what was committed is kept")


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` of ``fs`` whole or not at all."""
    if _is_local(fs):
        try:
            with atomic_output(path) as f:
                f.write(data)
        except StorageError:  # say how much this write needed, not how far it got
            raise storage_full(path, "writing", len(data)) from None
    else:  # an object store PUT of one body is atomic
        fs.pipe_file(path, data)


def write_text(url: str, text: str) -> None:
    """``text`` at ``url`` (local path or URL), atomically."""
    atomic_write(*fs_and_path(url), text.encode())


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def clear_debris(fs: fsspec.AbstractFileSystem, folder: str, subfolders: tuple[str, ...] = ()) -> list[str]:
    """Remove what dead runs left in ``folder``: temporary files of interrupted atomic writes (``*.tmp-*``) and the
    given work subfolders (staging, plans). Only the holder of the folder's lease may call this."""
    removed = []
    if not fs.exists(folder):
        return removed
    for path in fs.glob(f"{folder}/*.tmp-*"):
        remove(fs, path)
        removed.append(path)
    for sub in subfolders:
        if fs.exists(f"{folder}/{sub}"):
            remove(fs, f"{folder}/{sub}", recursive=True)
            removed.append(f"{folder}/{sub}")
    return removed


def remove(fs: fsspec.AbstractFileSystem, path: str, recursive: bool = False) -> None:
    """Delete ``path`` if it exists. Locally with plain os calls: fsspec's local ``rm`` calls ``os.getcwd()``, which
    fails in a process whose working directory was removed (a Ray job's unpacked working_dir, for one)."""
    try:
        if not _is_local(fs):
            fs.rm(path, recursive=recursive)
        elif os.path.isdir(path):
            (shutil.rmtree if recursive else os.rmdir)(path)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass


def shard_stem(shard_id: int, manifest: dict[str, Any] | None = None) -> str:
    """The name stem of a committed shard's data files: ``00003`` for the generation a stage first commits,
    ``00003.g2`` once ``forget`` has rewritten it twice. The marker (``00003.done.json``, one name for every
    generation) says which generation is the shard: readers resolve a shard's files through it, never by a fixed
    name, so a rewrite never replaces a file a reader trusts (see ``switch_generation``)."""
    gen = int((manifest or {}).get("generation") or 0)
    return f"{shard_id:05d}" + (f".g{gen}" if gen else "")


def shard_file(folder: str, shard_id: int, suffix: str, manifest: dict[str, Any] | None = None) -> str:
    """``folder``/the file of ``shard_id`` with ``suffix`` (``.parquet``, ``.tar``) in the generation its marker
    ``manifest`` commits."""
    return f"{folder}/{shard_stem(shard_id, manifest)}{suffix}"


def generation_files(fs: fsspec.AbstractFileSystem, folder: str, shard_id: int) -> dict[int, list[str]]:
    """Generation → the data files of ``shard_id`` present in ``folder`` (committed or not)."""
    out: dict[int, list[str]] = {}
    pattern = re.compile(rf"^{shard_id:05d}(?:\.g(\d+))?(\.[a-z]+|_stats\.json)$")
    for path in fs.glob(f"{folder}/{shard_id:05d}*"):
        m = pattern.match(path.rsplit("/", 1)[-1])
        if m and not path.endswith(".done.json"):
            out.setdefault(int(m.group(1) or 0), []).append(path)
    return out


def switch_generation(fs: fsspec.AbstractFileSystem, folder: str, shard_id: int, old: dict[str, Any],
                      new: dict[str, Any], before_switch: Callable[[], None] = lambda: None) -> None:
    """Make ``new`` (a marker whose ``generation`` is ``old``'s + 1, its files already written under that
    generation's names) the committed shard instead of ``old``, then remove every other generation's files.

    The marker is the shard's one commit point, and it is rewritten whole in one atomic write: until then readers
    resolve ``old``'s files (untouched), after it ``new``'s; a reader never sees a mix. A crash before the switch
    leaves the old generation committed and whole (the new files are debris a rerun overwrites); a crash after it
    leaves the new one committed and whole (old files a rerun removes, ``remove_stale_generations``). Refused when
    the marker is no longer ``old`` (someone else switched the shard meanwhile)."""
    if int(new.get("generation") or 0) != int(old.get("generation") or 0) + 1:
        raise ValueError(f"shard {shard_id:05d}: generation {new.get('generation')} does not follow "
                         f"{old.get('generation') or 0}")
    if read_marker(fs, folder, shard_id) != old:
        raise RunMismatchError(f"{marker_path(folder, shard_id)} changed while it was being rewritten; rerun")
    before_switch()  # e.g. the writer's lease check: a superseded run switches nothing
    write_marker(fs, folder, shard_id, new)
    fault_point("generation-switched", shard_id)
    remove_stale_generations(fs, folder, shard_id, new)


def remove_stale_generations(fs: fsspec.AbstractFileSystem, folder: str, shard_id: int,
                             manifest: dict[str, Any]) -> list[str]:
    """Remove the files of every generation of ``shard_id`` but the committed one (``manifest``'s)."""
    keep = int(manifest.get("generation") or 0)
    removed = []
    for gen, paths in sorted(generation_files(fs, folder, shard_id).items()):
        if gen != keep:
            for path in sorted(paths):
                remove(fs, path)
                removed.append(path)
                fault_point("generation-removed", shard_id)
    return removed


def marker_path(folder: str, shard_id: int) -> str:
    return f"{folder}/{shard_id:05d}.done.json"


def write_marker(fs: fsspec.AbstractFileSystem, folder: str, shard_id: int, manifest: dict[str, Any]) -> None:
    atomic_write(fs, marker_path(folder, shard_id), json.dumps(manifest, indent=1, sort_keys=True).encode())


def read_marker(fs: fsspec.AbstractFileSystem, folder: str, shard_id: int) -> dict[str, Any] | None:
    """The marker of one shard, or None when it is not committed."""
    try:
        with fs.open(marker_path(folder, shard_id), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def committed_shards(fs: fsspec.AbstractFileSystem, folder: str) -> dict[int, dict[str, Any]]:
    """Shard id → manifest, for every shard whose marker exists."""
    if not fs.exists(folder):
        return {}
    out = {}
    for path in fs.glob(f"{folder}/*.done.json"):
        name = path.rsplit("/", 1)[-1]
        try:
            shard_id = int(name.split(".")[0])
        except ValueError:
            continue
        with fs.open(path, "rb") as f:
            out[shard_id] = json.loads(f.read())
    return dict(sorted(out.items()))


def committed_files(folder: str, suffix: str = ".parquet") -> list[str]:
    """The data file with ``suffix`` of every committed shard of ``folder`` (a path or URL, kept as given), in shard
    order: exactly what a glob of the folder matches once its run has finished, and never a shard whose marker is
    not written yet. For tools that read a list of files (DuckDB, Hugging Face ``datasets``, polars)."""
    fs, path = fs_and_path(folder)
    return [shard_file(folder.rstrip("/"), sid, suffix, m) for sid, m in committed_shards(fs, path).items()]


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def claim_run(fs: fsspec.AbstractFileSystem, folder: str, stage: str, settings: dict[str, Any], *,
              replace: bool = False, refusal: str = "refusing to mix shards",
              hint: str = "Use a new output folder, or restore the old settings to resume.") -> bool:
    """The run record ``<folder>/_run.json``: the stage and the settings that shape what the folder holds (shards, or
    the checkpoints a trainer resumes). Returns True when the record was (re)written, False when it matched.

    A record with another stage or other settings raises ``RunMismatchError`` before anything is written, listing
    every changed key, then ``refusal`` and ``hint``; ``replace=True`` (a trainer starting over) overwrites it.
    """
    path = f"{folder}/_run.json"
    settings = json.loads(json.dumps(settings, default=str))
    if fs.exists(path) and not replace:
        with fs.open(path, "rb") as f:
            old = json.loads(f.read())
        if old.get("stage") != stage:
            raise RunMismatchError(f"{folder} holds output of stage '{old.get('stage')}', not '{stage}'")
        changes = _diff(old.get("settings", {}), settings)
        if changes:
            raise RunMismatchError(f"{folder} was written with different settings; {refusal}. Changed: "
                                   + "; ".join(changes) + f". {hint}")
        return False
    fs.makedirs(folder, exist_ok=True)
    doc = {"stage": stage, "settings": settings, "fingerprint": fingerprint(settings)}
    atomic_write(fs, path, json.dumps(doc, indent=1, sort_keys=True).encode())
    return True
