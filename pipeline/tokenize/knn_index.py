"""A clip-retrieval export → the kNN indices and ``indices_paths.json`` that ``clip-retrieval back`` serves.

``clip-retrieval back --indices_paths indices_paths.json`` loads, per named index, ``<indice_folder>/image.index``
and ``<indice_folder>/text.index`` (faiss), the metadata Parquet files of ``<indice_folder>/metadata`` in name order
(row ``i`` of their concatenation is index id ``i``: the export's layout already guarantees that), and the CLIP model
that embeds text and image queries, named as all_clip names models. This module builds both indices with autofaiss
(``autofaiss.build_index``, as ``clip-retrieval index`` does) over ``img_emb/`` and ``text_emb/``, and writes the json
so that, run from the export folder, ``clip-retrieval back`` needs no other option: the index folder is ``.``, the
run's own CLIP (open_clip's ``local-dir:`` folder that train-clip writes) is copied into ``<export>/clip`` and named
``open_clip:local-dir:clip/…`` (all_clip splits the name at its first ``/``, so the folder must be a single relative
component), and the options that would fetch models from the network (multilingual CLIP, aesthetic embeddings) or
that our small models do not support (TorchScript) are turned off.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pipeline.errors import ConfigError
from pipeline.storage import commit

log = logging.getLogger(__name__)

INDICES_PATHS = "indices_paths.json"
INDEX_FILES = {"img_emb": "image.index", "text_emb": "text.index"}  # the names clip back loads
CLIP_FOLDER = "clip"
CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
COLUMNS_TO_RETURN = ["url", "image_path", "caption", "key", "sha256", "clip_similarity"]


def build_indices(out_folder: str, max_memory: str = "4G", rebuild: bool = True) -> dict[str, Any]:
    """``image.index`` and ``text.index`` in ``out_folder`` (an export), each an autofaiss inner-product index over
    the export's embeddings in the export's row order. ``rebuild`` False keeps indices already there (the export
    wrote nothing new). Returns what autofaiss chose per index."""
    try:
        import autofaiss
        import faiss
    except ImportError as exc:
        raise ConfigError("config key 'tokenize.export_index': building the kNN index needs autofaiss "
                          "(pip install --no-deps autofaiss==2.18.0; faiss-cpu is a dependency already)") from exc
    from autofaiss.utils.cast import cast_bytes_to_memory_string, cast_memory_to_bytes

    # building takes more than the finished index: autofaiss plans with what is available, here 4x its budget
    available = cast_bytes_to_memory_string(max(4 * cast_memory_to_bytes(max_memory), 1 << 30))
    fs, path = commit.fs_and_path(out_folder)
    out: dict[str, Any] = {}
    for kind, name in INDEX_FILES.items():
        target = f"{path}/{name}"
        if not rebuild and fs.exists(target):
            out[name] = {"kept": True}
            continue
        embeddings = f"{out_folder.rstrip('/')}/{kind}"  # embedding-reader reads local paths and fsspec URLs
        # save_on_disk=False: autofaiss 2.18 under numpy 2 writes its index, then fails to json-dump its metrics
        # (numpy float32); the index it returns is the one it would have saved, written here atomically instead.
        index, infos = autofaiss.build_index(embeddings=embeddings, metric_type="ip", save_on_disk=False,
                                             max_index_memory_usage=max_memory, current_memory_available=available,
                                             verbose=logging.WARNING)
        if index is None:
            raise RuntimeError(f"autofaiss built no index over {out_folder}/{kind}: {infos}")
        commit.atomic_write(fs, target, faiss.serialize_index(index).tobytes())
        out[name] = {"rows": int(index.ntotal), "index_key": (infos or {}).get("index_key")}
    return out


def clip_model_name(clip: dict[str, Any]) -> tuple[str, str | None]:
    """The token shards' CLIP (their provenance's ``clip``) as clip back's ``clip_model`` (all_clip's naming), and the
    local-dir folder to copy beside the index (None for a published open_clip model)."""
    arch, pretrained = str(clip.get("arch") or ""), str(clip.get("pretrained") or "")
    if arch.startswith("local-dir:"):
        return f"open_clip:local-dir:{CLIP_FOLDER}/{CLIP_FILES[1]}", arch.removeprefix("local-dir:")
    if not arch or ":" in arch:
        raise ConfigError(f"config key 'tokenize.export_index': CLIP {arch!r} has no clip-retrieval name "
                          "(an open_clip architecture, or the run's own local-dir: model)")
    return f"open_clip:{arch}/{pretrained}" if pretrained else f"open_clip:{arch}", None


def write_indices_paths(out_folder: str, clip: dict[str, Any], name: str = "tokens") -> str:
    """``<out>/indices_paths.json`` for ``clip-retrieval back`` run from ``out_folder``; copies the run's CLIP folder
    into ``<out>/clip`` when the shards were made with one."""
    model, source = clip_model_name(clip)
    fs, path = commit.fs_and_path(out_folder)
    if source is not None:
        sfs, spath = commit.fs_and_path(source)
        for f in CLIP_FILES:
            commit.atomic_write(fs, f"{path}/{CLIP_FOLDER}/{f}", sfs.cat_file(f"{spath}/{f}"))
    spec = {name: {"indice_folder": ".", "clip_model": model, "use_jit": False, "enable_mclip_option": False,
                   "provide_aesthetic_embeddings": False, "provide_safety_model": False,
                   "provide_violence_detector": False, "columns_to_return": COLUMNS_TO_RETURN}}
    commit.atomic_write(fs, f"{path}/{INDICES_PATHS}", json.dumps(spec, indent=1).encode())
    return f"{out_folder.rstrip('/')}/{INDICES_PATHS}"
