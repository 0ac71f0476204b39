"""The shard scheduler (``ray_seam.run_bounded``) on a real local Ray cluster: every item once, the in-flight cap
held, items read lazily, failures retried then reported, and driver memory flat as the task count grows.
The 100,000-task run with tasks/s is benchmarks/bench_scheduler.py."""

from __future__ import annotations

import psutil
import pytest

from pipeline.runtime import ray_seam


@pytest.fixture(scope="module")
def noop(ray_cluster):
    @ray_cluster.remote(num_cpus=1)
    def shard(i: int, fail_until: int = 0, attempt: int = 0) -> dict[str, int]:
        if attempt < fail_until:
            raise RuntimeError(f"shard {i} attempt {attempt} fails on purpose")
        return {"shard_id": i, "attempt": attempt}

    ray_cluster.get(shard.remote(0))
    return shard


def test_every_item_once_under_the_cap_and_read_lazily(noop):
    cap, n = 32, 3000
    pulled, landed = [0], []
    lead = [0]

    def items():
        for i in range(n):
            pulled[0] += 1
            lead[0] = max(lead[0], pulled[0] - len(landed))  # items taken from the source but not finished
            yield i

    stats = ray_seam.run_bounded(lambda i, a: noop.remote(i), items(), cap, 0,
                                 lambda i, m: landed.append((i, m["shard_id"])), lambda i, e: pytest.fail(e))
    assert sorted(i for i, _ in landed) == list(range(n)) and all(i == s for i, s in landed)
    assert stats == {"submitted": n, "completed": n, "failed": 0, "retried": 0, "peak_in_flight": cap}
    assert lead[0] <= cap + 1  # the source is never read ahead of the cap (the +1: the item being submitted)


def test_failures_are_retried_then_reported_never_dropped(noop):
    # item % 3 == 0 fails once, item % 5 == 0 (not % 3) fails three times: more than the 2 retries allowed
    def fail_until(i: int) -> int:
        return 1 if i % 3 == 0 else 3 if i % 5 == 0 else 0

    done, failed, warned = {}, {}, []
    stats = ray_seam.run_bounded(lambda i, a: noop.remote(i, fail_until(i), a), range(60), 8, 2,
                                 lambda i, m: done.__setitem__(i, m["attempt"]),
                                 lambda i, e: failed.__setitem__(i, e), name=lambda i: warned.append(i) or f"#{i}")
    gave_up = {i for i in range(60) if i % 5 == 0 and i % 3}
    assert set(failed) == gave_up and set(done) == set(range(60)) - gave_up
    assert all(done[i] == (1 if i % 3 == 0 else 0) for i in done)  # the attempt number reaches the task
    assert all("attempt 2 fails on purpose" in failed[i] for i in gave_up)  # the last error is the one reported
    assert stats["retried"] == 20 + 2 * len(gave_up) and stats["failed"] == len(gave_up)


def test_driver_memory_stays_flat_as_the_task_count_grows(noop):
    """12,000 tasks after 2,000: the driver holds at most ``cap`` refs, so its RSS does not grow with the count.
    (Holding every ref and result, as ``ray.get([f.remote(i) for i in range(n)])`` does, grows it ~7 MB per
    1,000 tasks here, 84 MB for these: benchmarks/bench_scheduler.py measures both.)"""
    proc = psutil.Process()
    total = [0]

    def run(n: int) -> int:
        ray_seam.run_bounded(lambda i, a: noop.remote(i), range(n), 128, 0,
                             lambda i, m: total.__setitem__(0, total[0] + 1), lambda i, e: pytest.fail(e))
        return proc.memory_info().rss

    warm = run(2000)
    after = run(12000)
    assert total[0] == 14000
    print(f"driver RSS growth over 12,000 tasks: {(after - warm) / 2**20:.1f} MB")
    assert after - warm < 25 * 2**20, f"driver grew {(after - warm) / 2**20:.0f} MB over 12,000 tasks"
