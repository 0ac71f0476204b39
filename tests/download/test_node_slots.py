"""download.node_connections: one connection budget per node, shared by the run's shard tasks there.

The slots are real kernel locks on real files, held by real threads and processes (and a real Ray run), so every
test below would fail if the lock did not exclude, did not follow a dead holder, or the stage ignored the budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.demo import synth
from pipeline.demo.server import ImageServer
from pipeline.download.run import run_download
from pipeline.download.slots import NodeSlots, slots_folder
from pipeline.errors import ConfigError
from pipeline.storage import commit, shards


class _Gauge:
    """How many callers are inside at once, and the most there ever were."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


def test_two_tasks_of_a_node_never_hold_more_than_its_budget(tmp_path):
    folder = str(tmp_path / "slots")
    tasks = [NodeSlots(folder, 2), NodeSlots(folder, 2)]  # two shard tasks' views of one node's budget
    gauge = _Gauge()

    def fetch(slots: NodeSlots) -> None:
        for _ in range(5):
            with slots.hold(), gauge:
                time.sleep(0.02)

    threads = [threading.Thread(target=fetch, args=(s,)) for s in tasks for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert gauge.now == 0 and gauge.most == 2  # the budget was used in full, never more


def test_a_killed_holder_gives_its_slot_back(tmp_path):
    folder = str(tmp_path / "slots")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pipeline.download.slots import NodeSlots\n"
        f"with NodeSlots({folder!r}, 1).hold():\n    print('held', flush=True)\n    time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = threading.Event()

        def take() -> None:
            with NodeSlots(folder, 1).hold():
                got.set()

        threading.Thread(target=take, daemon=True).start()
        assert not got.wait(1.0), "the slot was handed out while another process held it"
        os.kill(holder.pid, signal.SIGKILL)  # no cleanup code runs: only the kernel can give the slot back
        assert got.wait(10), "a SIGKILLed task's slot was never released"
    finally:
        holder.kill()
        holder.wait()


def test_each_node_and_output_gets_its_own_slots():
    a = slots_folder("s3://bucket/images", "node-a")
    assert a == slots_folder("s3://bucket/images", "node-a")
    assert len({a, slots_folder("s3://bucket/images", "node-b"), slots_folder("s3://bucket/other", "node-a")}) == 3


def test_a_bad_budget_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="download.node_connections"):
        load_config("configs/tiny.yaml", ["download.node_connections=-1"])


def test_a_run_keeps_the_node_at_its_budget_whatever_the_threads_per_task(tmp_path, ray_cluster):
    """thread_count=1 with 2 tasks in flight would fetch 2 at a time; with a budget of 4 the node fetches 4 at a
    time (a task takes the slots the other leaves), never more, and every row still lands once."""
    n = 32
    gauge = _Gauge()
    samples = synth.make_samples(60, 0.1, seed=3)[0][:n]
    png = {i: synth.render_png(s, 16) for i, s in enumerate(samples)}

    def slow(i: int) -> bytes | None:
        with gauge:
            time.sleep(0.1)
        return png.get(i)

    with ImageServer(slow) as server:
        urls = tmp_path / "urls.parquet"
        pd.DataFrame({"url": [server.url(i) for i in range(n)],
                      "caption": [s.caption for s in samples]}).to_parquet(urls)
        cfg = load_config("configs/tiny.yaml", [
            f"run_dir={tmp_path / 'run'}", f"download.input={urls}", "download.allow_private_addresses=true",
            "download.shard_size=8", "download.thread_count=1", "download.max_in_flight=2",
            "download.task_cpus=0.5", "download.node_connections=4", "download.dedup_images=false"])
        summary = run_download(cfg)
    assert summary["successes"] == n, summary
    assert gauge.most == 4, f"fetches in flight peaked at {gauge.most}, the node's budget is 4"
    images = cfg.path("images")
    fs, folder = commit.fs_and_path(images)
    keys = [s["key"] for sid in commit.committed_shards(fs, folder) for s in shards.read_shard_samples(images, sid)]
    assert len(keys) == len(set(keys)) == n
