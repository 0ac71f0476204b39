"""The shard commit protocol shared by every stage that writes shards.

Why: fsspec/s3fs can publish partial objects when a writer dies, and reruns of naive writers append duplicates. So a
shard's data files are written first (under a temporary name where the filesystem can rename atomically), and a
small marker ``{shard:05d}.done.json`` is written **last**. Readers and resumers trust only shards with a marker.

A run folder also holds ``_run.json``: the fingerprinted settings that shape the shards. A rerun whose settings
differ is refused before it writes anything, with the list of keys that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec


class RunMismatchError(RuntimeError):
    """An existing output folder was written with different settings."""


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


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish ``data`` at ``path`` whole or not at all."""
    if _is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:  # an object store PUT of one body is atomic
        fs.pipe_file(path, data)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def marker_path(folder: str, shard_id: int) -> str:
    return f"{folder}/{shard_id:05d}.done.json"


def write_marker(fs: fsspec.AbstractFileSystem, folder: str, shard_id: int, manifest: dict[str, Any]) -> None:
    atomic_write(fs, marker_path(folder, shard_id), json.dumps(manifest, indent=1, sort_keys=True).encode())


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


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def claim_run(fs: fsspec.AbstractFileSystem, folder: str, stage: str, settings: dict[str, Any]) -> bool:
    """Record (or check) the settings that shape a folder's shards. Returns True when the folder is new.

    Raises RunMismatchError, before anything is written, when the folder was made with other settings.
    """
    path = f"{folder}/_run.json"
    settings = json.loads(json.dumps(settings, default=str))
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            old = json.loads(f.read())
        if old.get("stage") != stage:
            raise RunMismatchError(f"{folder} holds output of stage '{old.get('stage')}', not '{stage}'")
        changes = _diff(old.get("settings", {}), settings)
        if changes:
            raise RunMismatchError(
                f"{folder} was written with different settings; refusing to mix shards. Changed: "
                + "; ".join(changes)
                + ". Use a new output folder, or restore the old settings to resume."
            )
        return False
    fs.makedirs(folder, exist_ok=True)
    doc = {"stage": stage, "settings": settings, "fingerprint": fingerprint(settings)}
    atomic_write(fs, path, json.dumps(doc, indent=1, sort_keys=True).encode())
    return True
