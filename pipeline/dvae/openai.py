"""OpenAI's published dVAE (``encoder.pkl`` / ``decoder.pkl`` of the ``dall_e`` package) in our ``DVAE``.

OpenAI's files are ``torch.save(module)`` pickles of whole ``dall_e.encoder.Encoder`` / ``dall_e.decoder.Decoder``
objects, so a plain ``torch.load`` needs the ``dall_e`` package importable. Here they are read without it: a small
pickle module whose ``Unpickler.find_class`` turns every ``dall_e.*`` class into a bare ``nn.Module`` stub, so the
pickle rebuilds a tree of stubs holding the real parameters and the attrs fields (``n_hid``, ``vocab_size``, ...).
Its ``state_dict()`` (``.w``/``.b`` renamed ``.weight``/``.bias``) then loads into ``pipeline.dvae.model.DVAE``, which
has the same layout, and gives OpenAI's tokens exactly.

Security: unpickling can run code. ``find_class`` only lets through the globals such a file contains (torch's tensor
rebuild functions, ``torch.nn`` module classes, ``OrderedDict``, ``set``, ``torch.device``, dtypes, storages and the
``dall_e`` stubs) and rejects anything else, but that is a filter, not a sandbox: only load files you trust, such as
OpenAI's published ones (https://cdn.openai.com/dall-e/encoder.pkl and decoder.pkl).
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import importlib
import io
import json
import pickle
import re
import types
import urllib.request
import warnings
from typing import Any

import torch
from torch import nn
from torch.serialization import SourceChangeWarning

from pipeline.dvae.model import DVAE, DVAEShape, check_state_dict, load_dvae, save_dvae
from pipeline.errors import ConfigError, InputError
from pipeline.storage.commit import write_text
from pipeline.storage.urls import join
from pipeline.storage.weights import DVAE_FILE

DOWNLOAD_TIMEOUT_S = 120.0
"""Bound on connecting to / each read from an http(s) source, in seconds."""

_KINDS = {"Encoder": "encoder", "Decoder": "decoder"}
_FIELDS = {  # attrs fields of dall_e's Encoder / Decoder that fix the architecture
    "encoder": ("n_hid", "n_blk_per_group", "input_channels", "vocab_size"),
    "decoder": ("n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size"),
}


class _DallEStub(nn.Module):
    """Stands in for any ``dall_e`` class while unpickling: holds the pickled ``__dict__``, has no forward."""

    dall_e_class = ""


_STUBS: dict[str, type[_DallEStub]] = {}


def _stub_class(module: str, name: str) -> type[_DallEStub]:
    qual = f"{module}.{name}"
    if qual not in _STUBS:
        _STUBS[qual] = type(name, (_DallEStub,), {"dall_e_class": qual, "__module__": __name__,
                                                  "__qualname__": f"_DallEStub[{qual}]"})
    return _STUBS[qual]


class UnexpectedGlobal(InputError, pickle.UnpicklingError):
    """The pickle names a global outside the allowed torch/tensor set: refused before anything runs."""


_BUILTINS = {"set", "frozenset", "bytearray", "slice"}


def _allowed(module: str, name: str, obj: Any) -> bool:
    if module in ("collections", "builtins", "copyreg", "_codecs"):
        return (module, name) in {("collections", "OrderedDict"), ("copyreg", "_reconstructor"),
                                  ("_codecs", "encode")} or (module == "builtins" and name in _BUILTINS)
    if module == "torch":
        return name in ("device", "Size") or name.endswith("Storage") or isinstance(
            obj, (torch.dtype, torch.layout, torch.memory_format))
    if module == "torch._utils":
        return name.startswith("_rebuild_")
    if module == "torch._tensor":
        return name == "_rebuild_from_type_v2"
    if module == "torch.nn.parameter":
        return name == "Parameter"
    if module.startswith("torch.nn.modules."):
        return isinstance(obj, type) and issubclass(obj, nn.Module)
    return False


class Unpickler(pickle.Unpickler):
    """``dall_e.*`` classes become stubs; other globals must be on the short list a dall_e module pickle uses."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "dall_e" or module.startswith("dall_e."):
            return _stub_class(module, name)
        # Protocol-2 pickles (torch.save's default) name Python 2 modules (__builtin__.set); the C Unpickler's own
        # find_class maps them, but does not expose the protocol, so map them here for the check whatever it is.
        mod, nm = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        mod = _compat_pickle.IMPORT_MAPPING.get(mod, mod)
        try:
            obj = getattr(importlib.import_module(mod), nm) if mod in ("torch", "builtins") else None
        except AttributeError:
            obj = None
        if mod.startswith("torch.nn.modules."):
            obj = super().find_class(module, name)
        if not _allowed(mod, nm, obj):
            raise UnexpectedGlobal(f"unexpected global {module}.{name} (not part of a dall_e Encoder/Decoder pickle)")
        return obj if obj is not None else super().find_class(module, name)


def _load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()


def _loads(data: bytes, **kwargs: Any) -> Any:
    return Unpickler(io.BytesIO(data), **kwargs).load()


# What torch.load uses of its ``pickle_module``: ``Unpickler`` (subclassed for the object pickle), ``load`` (the legacy
# format's header records), ``__name__`` (its dill check). ``loads`` and ``UnpicklingError`` for completeness.
pickle_module = types.ModuleType("pipeline_dall_e_pickle")
pickle_module.Unpickler = Unpickler
pickle_module.load = _load
pickle_module.loads = _loads
pickle_module.UnpicklingError = pickle.UnpicklingError


def _read_bytes(path_or_url: str) -> bytes:
    try:
        if path_or_url.startswith(("http://", "https://")):
            with urllib.request.urlopen(path_or_url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                return resp.read()
        if "://" in path_or_url:
            import fsspec

            with fsspec.open(path_or_url, "rb") as f:
                return f.read()
        with open(path_or_url, "rb") as f:
            return f.read()
    except Exception as exc:  # noqa: BLE001 — URLError, HTTPError, OSError, fsspec backends' own errors
        raise InputError(f"{path_or_url}: cannot read ({type(exc).__name__}: {exc})") from exc


def _int_field(obj: nn.Module, name: str, where: str) -> int:
    value = obj.__dict__.get(name)
    if type(value) is not int:
        raise InputError(f"{where}: unexpected structure: attribute {name!r} is {value!r}, expected an int")
    return value


def read_dall_e_module(path_or_url: str, expect: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read one of OpenAI's ``encoder.pkl`` / ``decoder.pkl`` without the ``dall_e`` package.

    ``path_or_url``: local path, ``http(s)://`` URL or any fsspec URL. ``expect``: "encoder" or "decoder" to insist on
    one. Returns (state dict with OpenAI's names, ``...w`` / ``...b``; attrs), where attrs holds ``kind``
    ("encoder"/"decoder"), ``class``, ``group_count``, the attrs fields (``n_hid``, ``n_blk_per_group``,
    ``vocab_size``, ``input_channels`` or ``output_channels`` and ``n_init``), ``sha256`` and ``bytes`` of the file.

    Unpickling runs code: only read files you trust (OpenAI's published ones). Raises ValueError naming the file and
    the reason (unreadable, truncated or corrupt, not a dall_e Encoder/Decoder, unexpected structure).
    """
    data = _read_bytes(path_or_url)
    where = path_or_url
    try:
        with warnings.catch_warnings():  # the legacy format compares pickled class sources: stubs have none
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            warnings.simplefilter("ignore", SourceChangeWarning)
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=pickle_module)
    except UnexpectedGlobal as exc:
        raise InputError(f"{where}: not a dall_e Encoder/Decoder pickle: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 — truncated/corrupt files raise a zoo of exception types
        raise InputError(f"{where}: cannot unpickle (truncated or corrupt? {type(exc).__name__}: {exc})") from exc
    cls = getattr(type(obj), "dall_e_class", "")
    kind = _KINDS.get(cls.rpartition(".")[2]) if isinstance(obj, _DallEStub) else None
    if kind is None:
        what = cls or f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise InputError(f"{where}: not a dall_e Encoder/Decoder (the pickle holds a {what})")
    if expect is not None and kind != expect:
        raise InputError(f"{where}: expected a dall_e {expect}, found a {cls}")
    attrs: dict[str, Any] = {"kind": kind, "class": cls}
    for name in _FIELDS[kind]:
        attrs[name] = _int_field(obj, name, where)
    blocks = obj.__dict__.get("_modules", {}).get("blocks")
    if not isinstance(blocks, nn.Module):
        raise InputError(f"{where}: unexpected structure: {cls} has no 'blocks' module")
    groups = [n for n in blocks._modules if re.fullmatch(r"group_\d+", n)]
    # dall_e 0.1 hard-codes 4 groups; group_count is a class constant there, so not pickled (use it if it is).
    attrs["group_count"] = _int_field(obj, "group_count", where) if "group_count" in obj.__dict__ else len(groups)
    if attrs["group_count"] != len(groups) or not groups:
        raise InputError(f"{where}: unexpected structure: {len(groups)} groups, group_count {attrs['group_count']}")
    try:
        state = {k: v.detach() for k, v in obj.state_dict().items()}
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{where}: unexpected structure: cannot collect its weights ({type(exc).__name__}: {exc})"
                         ) from exc
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor) or not re.search(r"\.[wb]$", k)]
    if bad or not state:
        raise InputError(f"{where}: unexpected structure: entries {bad[:3]} are not dall_e Conv2d weights (w/b)")
    attrs["sha256"] = hashlib.sha256(data).hexdigest()
    attrs["bytes"] = len(data)
    return state, attrs


def _rename(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        k = re.sub(r"\.w$", ".weight", re.sub(r"\.b$", ".bias", k))
        out[prefix + k] = v.float().contiguous()
    return out


def load_openai_with_info(encoder_path: str, decoder_path: str) -> tuple[DVAE, dict[str, Any], dict[str, Any]]:
    """``load_openai`` that also returns the encoder's and decoder's attrs (``read_dall_e_module``)."""
    enc_state, enc = read_dall_e_module(encoder_path, expect="encoder")
    dec_state, dec = read_dall_e_module(decoder_path, expect="decoder")
    pairs = [("vocab_size", "vocab_size"), ("n_hid", "n_hid"), ("n_blk_per_group", "n_blk_per_group"),
             ("group_count", "group_count"), ("input_channels", "output_channels")]
    differ = [f"{a} {enc[a]} vs {b} {dec[b]}" for a, b in pairs if enc[a] != dec[b]]
    if differ:
        raise InputError(f"encoder {encoder_path} and decoder {decoder_path} do not belong together: "
                         f"{', '.join(differ)}")
    shape = DVAEShape(vocab_size=enc["vocab_size"], n_hid=enc["n_hid"], group_count=enc["group_count"],
                      n_blk_per_group=enc["n_blk_per_group"], channels=enc["input_channels"], n_init=dec["n_init"],
                      recon="logit_laplace")
    state = {**_rename(enc_state, "encoder."), **_rename(dec_state, "decoder.")}
    with torch.device("meta"):  # no point drawing ~100M random numbers that the state dict replaces
        model = DVAE(shape)
    check_state_dict(model, state, f"{encoder_path} + {decoder_path} (as {shape})")
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        raise InputError(f"{encoder_path} + {decoder_path}: some weights were not loaded")
    return model.eval(), enc, dec


def load_openai(encoder_path: str, decoder_path: str) -> DVAE:
    """OpenAI's dall_e ``encoder.pkl`` + ``decoder.pkl`` (paths or URLs) → our ``DVAE`` in eval mode, same tokens.

    Only load files you trust: unpickling runs code (see ``read_dall_e_module``).
    """
    return load_openai_with_info(encoder_path, decoder_path)[0]


def preprocess(img: Any, size: int = 256) -> torch.Tensor:
    """A PIL image → (1, 3, size, size) float in [0, 1], as OpenAI's usage notebook prepares images.

    The shorter side is resized to ``size`` with LANCZOS, then the centre ``size``×``size`` is cropped (torchvision's
    rounding). ``map_pixels`` is not applied here: ``DVAE.encode`` does it. Raises ValueError if the image is smaller.
    """
    from PIL import Image

    s = min(img.size)
    if s < size:
        raise InputError(f"image of {img.size[0]}x{img.size[1]} px: shorter side {s} is below the size {size}")
    img = img.convert("RGB")
    r = size / s
    w, h = round(r * img.size[0]), round(r * img.size[1])
    img = img.resize((w, h), Image.LANCZOS)
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return x.permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_weights(cfg: Any) -> dict[str, Any]:
    """``dvae.weights`` set: write ``<dvae dir>/dvae.safetensors`` (+ ``dvae.json``) and ``metrics.json`` from existing
    weights instead of training.

    ``weights: openai`` reads OpenAI's ``dvae.encoder_path`` / ``dvae.decoder_path``; any other value is the path of
    one of our ``dvae.safetensors`` files, which is validated and copied. Returns the ``extra`` dict saved with the
    model.
    """
    dcfg, image_size = cfg.dvae, cfg.download.image_size
    if dcfg.weights == "openai":
        model, enc, dec = load_openai_with_info(dcfg.encoder_path, dcfg.decoder_path)
        extra: dict[str, Any] = {"source": "openai", "encoder_path": dcfg.encoder_path,
                                 "decoder_path": dcfg.decoder_path, "encoder_sha256": enc["sha256"],
                                 "decoder_sha256": dec["sha256"]}
    else:
        model = load_dvae(dcfg.weights)
        extra = {"source": dcfg.weights, "sha256": _sha256_file(dcfg.weights)}
    shape = model.shape
    if image_size % shape.downsample:
        raise ConfigError(f"download.image_size {image_size} is not divisible by the dVAE's downsampling "
                         f"{shape.downsample} (weights {dcfg.weights})")
    extra.update({"vocab_size": shape.vocab_size, "grid": shape.grid(image_size), "image_size": image_size})
    out = cfg.path("dvae")  # a folder or the run's storage
    save_dvae(model, join(out, DVAE_FILE), extra=extra)  # atomic: the source may be this very file
    write_text(join(out, "metrics.json"), json.dumps({"result": extra, "history": []}))
    return extra
