"""One writer per run folder: a second run is refused naming the holder, a dead holder's lease is taken over by the
next generation (exactly one of two racers wins), and a superseded run's token refuses to commit. Locally and on S3
(moto's server refuses a second conditional create with 412)."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest

from pipeline.storage import lease as lease_mod
from pipeline.storage.lease import Lease, LeaseHeldError, LeaseLostError


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # exited and reaped: no process has it (pids are not reused this fast)


def _lease_doc(folder, gen: int) -> dict:
    return json.loads((folder / "_lease" / f"{gen:06d}.json").read_text())


def test_second_run_refused_naming_the_holder_then_free_after_release(tmp_path):
    out = str(tmp_path / "images")
    with Lease(out, "download") as first:
        with pytest.raises(LeaseHeldError, match=rf"images is being written by download run {first.id} \(host "
                                                 rf".*pid {os.getpid()}\) since .*last heartbeat \d+ s ago"):
            Lease(out, "tokenize").acquire()
        first.token.check()
    assert not list((tmp_path / "images" / "_lease").iterdir())  # released: nothing left
    with Lease(out, "download") as again:
        assert again.generation == 0


def test_dead_or_silent_holder_is_taken_over_and_its_token_stops_committing(tmp_path, caplog):
    out = str(tmp_path / "tokens")
    old = Lease(out, "tokenize").acquire()
    old._stop.set()  # the holder "dies": no more heartbeats, and its pid is made a dead one
    doc = _lease_doc(tmp_path / "tokens", 0)
    doc["pid"] = _dead_pid()
    (tmp_path / "tokens" / "_lease" / "000000.json").write_text(json.dumps(doc))
    with Lease(out, "tokenize") as new:
        assert new.generation == 1 and "taking over the lease" in caplog.text
        with pytest.raises(LeaseLostError, match="generation 0\\) was taken over"):
            old.token.check()
        new.token.check()
    silent = Lease(out, "tokenize", ttl_s=0.5).acquire()  # another host's holder: only its heartbeat tells
    silent._stop.set()
    doc = _lease_doc(tmp_path / "tokens", silent.generation)
    doc.update(host="elsewhere", heartbeat=doc["heartbeat"] - 5)
    (tmp_path / "tokens" / "_lease" / f"{silent.generation:06d}.json").write_text(json.dumps(doc))
    with pytest.raises(LeaseLostError, match="no heartbeat for over 0 s"):
        silent.token.check()
    with Lease(out, "tokenize", ttl_s=0.5) as taker:
        assert taker.generation == silent.generation + 1


def _race(args: tuple[str, int]) -> str:
    folder, _ = args
    try:
        lease = Lease(folder, "download").acquire()
    except LeaseHeldError:
        return "refused"
    lease._stop.set()  # keep the file: the other racers must see it
    return f"won {lease.generation}"


def test_racers_for_a_stale_lease_one_wins(tmp_path):
    out = str(tmp_path / "run")
    stale = Lease(out, "download").acquire()
    stale._stop.set()
    doc = _lease_doc(tmp_path / "run", 0)
    doc["pid"] = _dead_pid()
    (tmp_path / "run" / "_lease" / "000000.json").write_text(json.dumps(doc))
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_race, [(out, i) for i in range(8)])
    assert sorted(results).count("won 1") == 1 and results.count("refused") == 7, results


def test_on_s3_the_create_is_conditional(s3):
    folder = "s3://laion/lease-test/tokens"
    with Lease(folder, "tokenize") as held:
        assert s3.exists("laion/lease-test/tokens/_lease/000000.json")
        target = "laion/lease-test/tokens/_lease/000000.json"
        assert lease_mod._create_exclusive(s3, target, b"{}") is False  # moto answers 412 PreconditionFailed
        with pytest.raises(LeaseHeldError, match=f"download run {held.id}|tokenize run {held.id}"):
            Lease(folder, "download").acquire()
        held.token.check()
    assert not s3.exists("laion/lease-test/tokens/_lease/000000.json")
