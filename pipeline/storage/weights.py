"""Model weights as ``<name>.safetensors`` plus ``<name>.json``: the one format every model the project writes (the
dVAE, both priors, the decoder) is saved in and loaded from. CLIP keeps open_clip's own format.

Why safetensors: a torch pickle runs code when it is loaded; a safetensors file is a JSON header and raw tensor
bytes, read without executing anything (``torch.load`` stays only inside DeepSpeed's own checkpoint files and the
OpenAI-pickle importer). The JSON config beside it holds what the model is (``kind``, its ``shape``) and where it
came from (steps, the token shards' metadata, training figures), the format tag and the sha256 of the tensors file;
it is written **last**, so a pair whose config exists is complete, and a config whose sha256 disagrees with its
tensors file (one of them from another save) is refused. Both files go through the one atomic write, to a local
path or any URL of the run's storage.

A ``.pt`` file from an earlier version of the pipeline is refused with how to re-export it; a config whose shape
does not fit its tensors is refused naming the file, the tensor, the shape the config implies and the one found.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, NotFoundError
from pipeline.storage.urls import exists, read_bytes, read_json, write_bytes, write_json

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "dalle-pipeline-weights/1"
SUFFIX = ".safetensors"
LEGACY_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
DVAE_FILE = "dvae.safetensors"  # <dvae>/, what train-dvae writes and tokenize/sample/report load
MODEL_FILE = "model.safetensors"  # <prior>/, <decoder>/, <checkpoint tag>/: the consolidated weights
RAW = "raw/"  # prefix of the trained (non-EMA) weights kept beside the EMA ones; no module key holds a '/'


def config_path(path: str) -> str:
    """``<name>.json`` beside ``<name>.safetensors``."""
    return path.removesuffix(SUFFIX) + ".json"


def legacy_path(path: str) -> str:
    """The torch pickle an earlier version wrote where ``path`` is now (``model.safetensors`` → ``model.pt``)."""
    return path.removesuffix(SUFFIX) + ".pt"


def save_weights(path: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> str:
    """Write ``tensors`` to ``path`` (a ``.safetensors`` path or URL), then ``config`` (JSON-serialisable: kind,
    shape, provenance) to ``<name>.json`` with the format tag and the tensors file's sha256. Returns ``path``."""
    from safetensors.torch import save

    if not path.endswith(SUFFIX):
        raise ValueError(f"{path}: model weights are written as *{SUFFIX}")
    data = save(_storable(tensors), metadata={"format": FORMAT, "config": posixpath.basename(config_path(path))})
    write_bytes(path, data)
    write_json(config_path(path), {**config, "format": FORMAT, "weights": posixpath.basename(path),
                                   "sha256": hashlib.sha256(data).hexdigest()})
    return path


def saved(path: str) -> bool:
    """True when both files of the pair exist (the config, written last, marks a finished save)."""
    return exists(config_path(path)) and exists(path)


def require(path: str, missing: str, reexport: str) -> str:
    """``path`` when its pair is saved; else the legacy-file refusal when an earlier version's ``.pt`` lies there,
    else ``NotFoundError(missing)``."""
    if saved(path):
        return path
    if exists(legacy_path(path)):
        raise legacy_error(legacy_path(path), reexport)
    raise NotFoundError(missing)


def legacy_error(path: str, reexport: str) -> InputError:
    name = posixpath.basename(path).rsplit(".", 1)[0]
    return InputError(f"{path}: a torch pickle from an earlier version of the pipeline, no longer loaded (it could "
                      f"run code); model weights are now {name}{SUFFIX} + {name}.json. {reexport}")


def load_weights(path: str, what: str, reexport: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of a pair written by ``save_weights``, without running any code from the files. ``what``
    names the model in errors; ``reexport`` says how to rewrite a legacy ``.pt`` given or found in its place."""
    from safetensors.torch import load

    if path.endswith(LEGACY_SUFFIXES):
        if exists(path):
            raise legacy_error(path, reexport)
        raise NotFoundError(f"{path}: no such {what} weights file (and weights are now *{SUFFIX})")
    if not saved(path):
        if exists(path):
            raise InputError(f"{path}: no {config_path(path)} beside it (the {what}'s kind and shape): an interrupted "
                             "save, or a safetensors file this pipeline did not write")
        require(path, f"{path}: no {what} weights file", reexport)
    data = read_bytes(path)
    if not _safetensors_header(data) and (data[:4] == b"PK\x03\x04" or data[:1] == b"\x80"):
        raise legacy_error(path, reexport)  # a torch zip / pickle under the new name
    config = read_json(config_path(path))
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise InputError(f"{config_path(path)}: not a weights config of this pipeline (format "
                         f"{config.get('format') if isinstance(config, dict) else None!r}, want {FORMAT!r})")
    if config.get("sha256") != hashlib.sha256(data).hexdigest():
        raise InputError(f"{path}: its bytes do not match the sha256 in {config_path(path)}: the two files come from "
                         f"different saves (an interrupted one?); save the {what} again")
    try:
        tensors = load(data)
    except Exception as exc:  # noqa: BLE001 - a damaged header raises safetensors' own errors
        raise InputError(f"{path}: cannot read {what} weights ({type(exc).__name__}: {exc})") from exc
    return tensors, config


def fit(model: nn.Module, tensors: dict[str, torch.Tensor], path: str) -> None:
    """Load ``tensors`` into ``model`` (built from the config's shape), refusing names or shapes that differ: the
    error names the file, the tensor, the shape the config implies and the shape found."""
    want = model.state_dict()
    cfg = config_path(path)
    for name, ref in want.items():
        if name not in tensors:
            raise InputError(f"{path}: no tensor {name!r}, which the model {cfg} describes has "
                             f"(shape {tuple(ref.shape)})")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise InputError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, but the model {cfg} "
                             f"describes expects {tuple(ref.shape)}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise InputError(f"{path}: {len(extra)} tensors the model {cfg} describes lacks, e.g. {extra[0]!r} "
                         f"(shape {tuple(tensors[extra[0]].shape)})")
    model.load_state_dict(tensors)


def split_raw(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the weights models load, the trained non-EMA weights saved under ``raw/``)."""
    main = {k: v for k, v in tensors.items() if not k.startswith(RAW)}
    return main, {k.removeprefix(RAW): v for k, v in tensors.items() if k.startswith(RAW)}


def _safetensors_header(data: bytes) -> bool:
    """Whether ``data`` opens like a safetensors file: a little-endian u64 length, then that many bytes of JSON."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors, with a tensor sharing storage with an earlier one copied (safetensors refuses
    shared memory: tied weights are stored twice and tied again by ``load_state_dict``)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out
