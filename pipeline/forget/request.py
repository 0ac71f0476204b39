"""What a takedown asks for: keys, URLs or image sha256 digests, one per line, parsed and checked whole before
anything is touched (a malformed line names its file and line number and nothing changes).

URLs are kept only as their sha256 (``url_digest``): the takedown record and the download's refusal list never
republish a withdrawn URL. The set of selectors is what every shard is matched against, a shard at a time, on the
columns a match needs (key, url, sha256); no shard is held in memory beyond the one being read.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import InputError
from pipeline.storage import urls

KINDS = ("keys", "urls", "sha256")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_ERRORS = 10  # malformed lines named in one error (and how many more)


def url_digest(url: str) -> str:
    """The sha256 of a URL as the run holds it (the exact string): how records and refusals name it."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class Selectors:
    """Rows to remove: by key, by the sha256 of their URL, by the sha256 of their image bytes."""
    keys: set[str] = field(default_factory=set)
    url_sha256: set[str] = field(default_factory=set)
    sha256: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.keys or self.url_sha256 or self.sha256)

    def __len__(self) -> int:
        return len(self.keys) + len(self.url_sha256) + len(self.sha256)

    def update(self, other: Selectors) -> None:
        self.keys |= other.keys
        self.url_sha256 |= other.url_sha256
        self.sha256 |= other.sha256

    def matches(self, key: Any, url: Any, sha: Any) -> bool:
        return (key in self.keys or (sha is not None and sha in self.sha256)
                or (url is not None and url_digest(url) in self.url_sha256))

    def to_json(self) -> dict[str, list[str]]:
        return {"keys": sorted(self.keys), "url_sha256": sorted(self.url_sha256), "sha256": sorted(self.sha256)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Selectors:
        return cls(set(d.get("keys") or []), set(d.get("url_sha256") or []), set(d.get("sha256") or []))

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(self.to_json().items())).encode()).hexdigest()[:16]


def _check_line(kind: str, text: str) -> str | None:
    """Why ``text`` is not a valid line of a ``kind`` list, or None."""
    if kind == "sha256":
        return None if _HEX64.match(text) else "not a sha256 digest (64 hexadecimal digits)"
    if kind == "urls":
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return "not an http(s) URL"
        return None if not re.search(r"\s", text) else "a URL holds no whitespace"
    return None if not re.search(r"\s", text) else "a key holds no whitespace"


def parse_lines(kind: str, text: str, source: str) -> tuple[set[str], int]:
    """The values of one list (blank lines and ``#`` comments skipped) and how many lines held one. Every malformed
    line is named (file and line number) in one ``InputError``."""
    if kind not in KINDS:
        raise InputError(f"unknown takedown list kind {kind!r}; one of {KINDS}")
    values, errors, lines = set(), [], 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        lines += 1
        why = _check_line(kind, line)
        if why:
            errors.append(f"line {n}: {line[:80]!r}: {why}")
        else:
            values.add(line.lower() if kind == "sha256" else line)
    if errors:
        more = f" (and {len(errors) - MAX_ERRORS} more)" if len(errors) > MAX_ERRORS else ""
        raise InputError(f"{source}: {len(errors)} malformed line(s) in the --{kind} list; nothing was changed: "
                         + "; ".join(errors[:MAX_ERRORS]) + more)
    return values, lines


def read_request(files: dict[str, str]) -> tuple[Selectors, dict[str, Any]]:
    """``{kind: file}`` (local or any fsspec URL) → the selectors and what the record says was asked."""
    if not files:
        raise InputError("forget: give at least one of --keys FILE, --urls FILE, --sha256 FILE")
    sel, asked = Selectors(), {}
    for kind, path in sorted(files.items()):
        try:
            text = urls.read_bytes(path).decode("utf-8")
        except FileNotFoundError:
            raise InputError(f"{path}: no such takedown list (--{kind})") from None
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); nothing was changed") from None
        values, lines = parse_lines(kind, text, path)
        if kind == "keys":
            sel.keys |= values
        elif kind == "urls":
            sel.url_sha256 |= {url_digest(v) for v in values}
        else:
            sel.sha256 |= values
        asked[kind] = {"file": path, "lines": lines, "distinct": len(values)}
    return sel, asked
