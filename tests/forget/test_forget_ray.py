"""forget through the seam: one Ray task per affected shard id, at most max_in_flight at once, with the same result
as in-process."""

from __future__ import annotations

import pytest
from takedown_run import key, make_run
from test_forget import export_keys, image_keys, side_rows, token_keys

from pipeline import stages

pytestmark = pytest.mark.slow


def test_forget_as_ray_tasks(tmp_path, ray_cluster):
    cfg = make_run(str(tmp_path / "run"), shards=4)
    (tmp_path / "k.txt").write_text(f"{key(0, 1)}\n{key(2, 5)}\n{key(3, 0)}\n")
    out = stages.forget(cfg, {"keys": str(tmp_path / "k.txt")}, max_in_flight=2)
    assert out["rows_removed"] == 3 and out["shard_tasks"] == 3 and out["rewritten"]["tokens"] == [0, 2, 3]
    gone = {key(0, 1), key(2, 5), key(3, 0)}
    assert gone.isdisjoint(token_keys(cfg) | export_keys(cfg) | set(side_rows(cfg)))
    assert image_keys(cfg)[1] == {key(1, i) for i in range(7)} and len(token_keys(cfg)) == 21
