"""Run-level safety of the download: one writer per output folder, and a full disk that fails cleanly, reports
every failed shard, leaves no debris, and lets a rerun finish once space is freed."""

import os
import subprocess
import sys
import threading
import time
from collections import Counter

import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.demo import synth
from pipeline.demo.server import ImageServer
from pipeline.download.run import run_download
from pipeline.storage import commit
from pipeline.storage.lease import LeaseHeldError

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tmp_path, server, n: int, output: str, *extra: str):
    urls = tmp_path / "urls.parquet"
    samples = (synth.make_samples(max(n, 60), 0.1, seed=1)[0])[:n]
    pd.DataFrame({"url": [server.url(i) for i in range(n)], "caption": [s.caption for s in samples]}).to_parquet(urls)
    return ["--config", "configs/tiny.yaml", f"run_dir={tmp_path / 'run'}", f"download.input={urls}",
            f"download.output={output}", "download.allow_private_addresses=true", "download.shard_size=8",
            "download.thread_count=2", "download.max_in_flight=2", "download.dedup_images=false", *extra]


def test_a_second_run_into_the_same_folder_is_refused_and_nothing_is_fetched_twice(tmp_path, ray_cluster):
    samples = synth.make_samples(60, 0.1, seed=1)[0][:32]
    png = {i: synth.render_png(s, 32) for i, s in enumerate(samples)}
    hits: Counter[int] = Counter()
    gate = threading.Event()

    def held(i: int) -> bytes | None:
        hits[i] += 1
        # The first run is held mid-fetch until the second has been refused: a timed sleep let a fast machine
        # finish the first run (and free its lease) before the second one started.
        gate.wait(120)
        return png.get(i)

    with ImageServer(held) as server:
        args = _config(tmp_path, server, 32, str(tmp_path / "images"), "download.timeout=180")
        cfg = load_config(args[1], args[2:])
        result: dict = {}
        first = threading.Thread(target=lambda: result.update(run_download(cfg)))
        first.start()
        lease_dir = tmp_path / "images" / "_lease"
        deadline = time.monotonic() + 30
        # A fetch under way means the first run holds its lease (taken before any fetch); the lease folder alone
        # can show the lease's temporary file before the link that takes it.
        while not hits and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseHeldError, match=r"images is being written by download run \w+ \(host .*pid "
                                                 rf"{os.getpid()}\) since"):
            try:
                run_download(cfg)
            finally:
                gate.set()
        first.join(120)
    assert result["successes"] == 32 and result["shards_committed"] == 4 and not result["shards_failed"]
    assert sorted(hits) == list(range(32)) and set(hits.values()) == {1}, "a URL was fetched twice"
    left = {p.name for p in (tmp_path / "images").iterdir()}
    assert not left & {"_staging", "_plan"} and not list(lease_dir.iterdir()) and not any(".tmp-" in n for n in left)


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KB filesystem (tmpfs): room for a few shards, not for all of them."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_fails_cleanly_and_a_rerun_after_freeing_space_finishes(tmp_path, ray_cluster, small_disk,
                                                                           capsys):
    samples = synth.make_samples(200, 0.1, seed=1)[0][:128]
    png = {i: synth.render_png(s, 64) for i, s in enumerate(samples)}
    with ImageServer(png) as server:
        args = _config(tmp_path, server, 128, str(small_disk / "images"), "download.image_size=64",
                       "download.encode_format=png", "download.encode_quality=1", "download.shard_retries=1")
        code = main(["download", *args])
        out = capsys.readouterr()
        images = small_disk / "images"
        summary_path = images / "_summary.json"
        assert code == 3, out.err[-2000:]
        err = [line for line in out.err.splitlines() if line.startswith("error: ")]
        assert len(err) == 1 and "download finished with failures" in err[0]
        import json

        summary = json.loads(summary_path.read_text())  # written although the disk filled up
        assert summary["shards_failed"] and summary["shards_committed"] + len(summary["shards_failed"]) == 16
        reason = next(iter(summary["shards_failed"].values()))
        assert "no space left on the device writing shard" in reason and "bytes needed" in reason
        assert str(images) in reason
        assert not (images / "_staging").exists() or not list((images / "_staging").iterdir()), "staging debris"
        assert not list(images.glob("*.tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)  # space freed
        assert main(["download", *args]) == 0
        capsys.readouterr()
    committed = commit.committed_shards(*commit.fs_and_path(str(images)))
    assert sorted(committed) == list(range(16)) and sum(m["successes"] for m in committed.values()) == 128
    assert not list(images.glob("*.tmp-*")) and not (images / "_staging").exists()


def test_a_killed_driver_stops_its_work_and_a_rerun_finishes(tmp_path):
    """kill -9 of a driver that started its own local Ray cluster: its Ray processes and tasks go with it (nothing
    is committed after), and the rerun takes over the dead run's lease and finishes with every row once."""
    import psutil

    samples = synth.make_samples(60, 0.1, seed=1)[0][:48]
    png = {i: synth.render_png(s, 32) for i, s in enumerate(samples)}

    def slow(i: int) -> bytes | None:
        time.sleep(0.2)
        return png.get(i)

    with ImageServer(slow) as server:
        args = _config(tmp_path, server, 48, str(tmp_path / "images"), "num_cpus=2")
        images = tmp_path / "images"
        driver = subprocess.Popen([sys.executable, "-m", "pipeline", "download", *args], cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(images.glob("*.done.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(images.glob("*.done.json")), "the driver never committed a shard"
        family = psutil.Process(driver.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in family if p.is_running())
        driver.kill()
        driver.wait()
        t_kill = time.time()
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"left running after the driver died: {[(p.pid, p.name()) for p in alive]}"
        time.sleep(2)
        late = [p for p in images.glob("*.done.json") if p.stat().st_mtime > t_kill + 1]
        assert not late, f"committed after the driver died: {late}"
        assert main(["download", *args]) == 0
    committed = commit.committed_shards(*commit.fs_and_path(str(images)))
    assert sorted(committed) == list(range(6)) and sum(m["successes"] for m in committed.values()) == 48
    left = {p.name for p in images.iterdir()}
    assert not left & {"_staging", "_plan"} and not list((images / "_lease").iterdir())
