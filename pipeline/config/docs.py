"""The config documents itself: every key's dotted name, type, default and docstring, read from the dataclasses
(the attribute docstring under each field is the one source of truth), which keys each command reads, and the
resolved config as YAML. ``python -m pipeline <stage> --help`` and ``python -m pipeline config --keys`` print these."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config.root import Config, to_dict

ROOT_KEYS = "(root)"

# The sections each command reads besides the root keys (run_dir, seed, ray_address, num_cpus, cluster_config).
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "download": ("download", "data"),
    "train-dvae": ("dvae", "download", "logging"),
    "train-clip": ("clip", "download", "logging"),
    "tokenize": ("tokenize", "download", "dvae", "clip"),
    "train-prior": ("prior", "tokenize", "dvae", "clip", "logging"),
    "train-decoder": ("decoder", "download", "tokenize", "clip", "logging"),
    "export": ("tokenize",),
    "dedup": ("curate", "tokenize"),
    "forget": ("download", "tokenize", "prior", "diffusion", "decoder"),
    "import-embeddings": ("curate", "tokenize", "clip"),
    "export-prior": ("prior",),
    "eval-dvae": ("dvae", "download"),
    "eval-prior": ("prior", "tokenize", "clip"),
    "eval-decoder": ("decoder", "diffusion", "download", "tokenize", "clip"),
    "sample": ("sample", "prior", "diffusion", "decoder", "dvae", "clip", "tokenize"),
    "report": ("sample", "download", "tokenize"),
}


@dataclass(frozen=True)
class KeyDoc:
    key: str
    """Dotted name, e.g. ``tokenize.batch_size``."""
    type: str
    default: Any
    doc: str


@functools.cache
def _own_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings written in ``cls``'s own body: ``name: T = v`` followed by a string literal."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            out[node.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring, the nearest class in the MRO that documents it winning (a subclass that only changes
    a default keeps its base's text)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        out.update(_own_docs(klass))
    return out


def describe(obj: Any = None, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key under ``obj`` (default: ``Config()``), in declaration order, sections expanded; a key's
    default is its value in ``obj`` (the ``diffusion`` section's ``kind`` is ``diffusion``)."""
    obj = Config() if obj is None else obj
    docs = field_docs(type(obj))
    out: list[KeyDoc] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += describe(value, f"{prefix}{f.name}.")
        else:
            out.append(KeyDoc(prefix + f.name, str(f.type), value, docs.get(f.name, "")))
    return out


def section_doc(section: str) -> str:
    """The section's own text: its field docstring on ``Config``, else its class docstring."""
    if section == ROOT_KEYS:
        return "Keys of the whole run."
    own = field_docs(Config).get(section)
    cls = type(getattr(Config(), section))
    return own or inspect.cleandoc(cls.__doc__ or "")


def stage_keys(stage: str) -> dict[str, list[KeyDoc]]:
    """The keys ``stage`` reads, by section (root keys first); every key for commands that read them all."""
    keys = describe()
    sections = STAGE_SECTIONS.get(stage) or tuple(dict.fromkeys(k.key.split(".")[0] for k in keys if "." in k.key))
    out = {ROOT_KEYS: [k for k in keys if "." not in k.key]}
    for s in sections:
        out[s] = [k for k in keys if k.key.startswith(s + ".")]
    return out


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def format_key(k: KeyDoc, width: int = 100) -> str:
    head = f"  {k.key}: {k.type} = {_show(k.default)}"
    body = textwrap.fill(" ".join(k.doc.split()), width=width, initial_indent="      ", subsequent_indent="      ")
    return head + ("\n" + body if body else "")


def format_keys(groups: dict[str, list[KeyDoc]]) -> str:
    """Sections with a header line each, then their keys (name: type = default, the docstring below)."""
    parts = []
    for section, keys in groups.items():
        header = section_doc(section).split("\n\n")[0]
        parts.append(textwrap.fill(f"{section}: {' '.join(header.split())}", width=104, subsequent_indent="  "))
        parts += [format_key(k) for k in keys]
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML, every key written (what a run records as ``config.yaml``)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
