"""The run-wide duplicate-image registry, in a module of its own: the download runs it as a Ray actor, and the actor's
worker process imports only the module that defines the class — this one needs nothing but the standard library, so
the actor starts in well under a second instead of importing the whole download stage."""

from __future__ import annotations


class ShaOwners:
    """Run-wide first owner of each image sha256 (the duplicate-image filter). Seeded from committed shards on resume.

    The download runs it as one actor on the driver's node, so losing a worker node never loses it. It holds every
    kept image's sha prefix; at LAION scale (10^8 images) that is a few GB, so shard it by prefix when you get there.
    """

    def __init__(self) -> None:
        self.owner: dict[int, str] = {}

    def claim(self, pairs: list[tuple[str, str]]) -> dict[str, str]:
        return {sha: self.owner.setdefault(int(sha[:16], 16), key) for sha, key in pairs}
