"""Which models saw a removed row: from the data plan frozen in each checkpoint (or the run's consumed-keys audit),
forget names every checkpoint whose training consumed a removed row with the first step that did, and the clean
ones; the step computed from the plan alone is the step the loader really yields the row at."""

from __future__ import annotations

import json
import os

from takedown_run import make_run

from pipeline.forget.exposure import format_report
from pipeline.forget.run import run_forget
from pipeline.prior.loader import TokenLoader, make_plan

SEC = {"micro_batch_size": 2, "text_len": 8, "shuffle_buffer": 4, "gradient_accumulation_steps": 1}
SEED, WORLD = 7, 2


def _checkpoint(folder: str, step: int, plan, world: int = WORLD, kind: str = "ar") -> None:
    tag = os.path.join(folder, f"step{step:08d}")
    os.makedirs(tag)
    held = dict(SEC, heldout_percent=99.99)  # the decoder here holds out (nearly) every row
    for name, doc in (("train_state.json", {"step": step, "seed": SEED, "data_plan": plan.to_json(), "kind": kind}),
                      ("config.json", {"seed": SEED, "prior": SEC, "diffusion": SEC, "decoder": held}),
                      ("complete.json", {"step": step, "world_size": world, "files": {}})):
        with open(os.path.join(tag, name), "w") as f:
            json.dump(doc, f)


def _consumed(plan, steps: int) -> dict[str, int]:
    """Key → first loader step (from 1) it is yielded at on any rank, by reading the batches."""
    first: dict[str, int] = {}
    for rank in range(WORLD):
        loader = TokenLoader(plan, rank=rank, world=WORLD, micro_batch=2, text_len=8, seed=SEED, shuffle_buffer=4)
        batches = loader.batches(0)
        for _ in range(steps):
            b = next(batches)
            for k in b.keys:
                first[k] = min(first.get(k, 1 << 30), b.step + 1)
        loader.close()
    return first


def test_the_report_names_the_checkpoints_that_consumed_a_removed_row_and_the_first_step(tmp_path):
    cfg = make_run(str(tmp_path / "run"), export=False, dedup=False)
    plan = make_plan(cfg.path("tokens"), unit_rows=2)
    truth = _consumed(plan, 6)
    late = sorted(k for k, s in truth.items() if s == 3)[0]  # first read at step 3
    never = sorted(set(plan_keys(cfg)) - set(truth))[0]  # not read in 6 steps
    prior = cfg.path("prior")
    for step in (2, 6):
        _checkpoint(prior, step, plan)
    audited = cfg.path("prior_diffusion")  # a run with prior.record_keys: its audit is read instead
    _checkpoint(audited, 5, plan)
    with open(os.path.join(audited, "keys.rank1.txt"), "w") as f:
        f.write(f"0\tother\n3\t{never}\n")
    _checkpoint(cfg.path("decoder"), 6, plan, kind="decoder")
    os.makedirs(cfg.path("dvae"))
    open(os.path.join(cfg.path("dvae"), "dvae.safetensors"), "wb").write(b"weights")
    open(os.path.join(cfg.path("dvae"), "recon_step000010.png"), "wb").write(b"png")
    (tmp_path / "k.txt").write_text(f"{late}\n{never}\n")
    out = run_forget(cfg, {"keys": str(tmp_path / "k.txt")})
    rep = out["models"][prior]
    assert rep["saw"] == ["step00000006"] and rep["clean"] == ["step00000002"]
    assert rep["checkpoints"]["step00000006"]["consumed"] == {late: 3} and rep["checkpoints"]["step00000006"][
        "first_step"] == 3 and rep["checkpoints"]["step00000006"]["how"] == "data plan"
    aud = out["models"][audited]["checkpoints"]["step00000005"]
    assert aud["consumed"] == {never: 4} and aud["how"] == "keys audit" and out["models"][audited]["saw"] == [
        "step00000005"]
    assert out["models"][cfg.path("dvae")]["saw"] == ["dvae.safetensors"]
    assert out["models"]["pictures"]["may_show"] == [os.path.join(cfg.path("dvae"), "recon_step000010.png")]
    dec = out["models"][cfg.path("decoder")]  # read in its batches, but masked out of the loss: not trained on
    assert dec["checkpoints"]["step00000006"]["read_not_trained"] == [late] and dec["clean"] == ["step00000006"]
    lines = format_report(out["models"])
    assert f"{prior} (prior): saw removed rows: step00000006 (first at step 3); clean: step00000002" in lines
    record = json.loads(open(out["record"]).read())
    assert record["models"] == out["models"]


def test_a_plan_of_an_older_generation_cannot_be_called_clean(tmp_path):
    cfg = make_run(str(tmp_path / "run"), export=False, dedup=False)
    old_plan = make_plan(cfg.path("tokens"), unit_rows=2)
    (tmp_path / "a.txt").write_text("0000101\n")
    run_forget(cfg, {"keys": str(tmp_path / "a.txt")})
    _checkpoint(cfg.path("prior"), 2, old_plan)  # trained on generation 0 of shard 1 (its footer is gone now)
    (tmp_path / "b.txt").write_text("0000102\n")
    out = run_forget(cfg, {"keys": str(tmp_path / "b.txt")})
    ck = out["models"][cfg.path("prior")]["checkpoints"]["step00000002"]
    assert ck["unplaced_shards"] == [1] and not ck["clean"]


def plan_keys(cfg) -> list[str]:
    from pipeline.storage import schema

    table, _ = schema.read_token_shards(cfg.path("tokens"), ["key"])
    return table.column("key").to_pylist()


def test_first_step_from_the_plan_agrees_with_the_loader_for_every_row(tmp_path):
    import pyarrow.parquet as pq

    cfg = make_run(str(tmp_path / "run"), export=False, dedup=False)
    for flt in ("", "key <> '0000003' and key <> '0000104'"):
        plan = make_plan(cfg.path("tokens"), unit_rows=2, filter=flt)
        truth = _consumed(plan, 4)
        got: dict[str, int] = {}
        for rank in range(WORLD):
            loader = TokenLoader(plan, rank=rank, world=WORLD, micro_batch=2, text_len=8, seed=SEED, shuffle_buffer=4)
            for i, s in enumerate(plan.shards):
                for row, k in enumerate(pq.read_table(s["path"], columns=["key"]).column("key").to_pylist()):
                    if (step := loader.first_step(i, row, 4)) is not None:
                        got[k] = min(got.get(k, 1 << 30), step + 1)
        assert len(truth) >= 12 and got == truth, flt  # 4 steps x 2 ranks x 2 rows, and the same steps
        if flt:
            assert "0000003" not in got and "0000104" not in got  # the filter's dropped rows are never consumed
