"""The decoder's join of image shards and token shards by key: order, exact resume, counts, masks and refusals."""

import json

import numpy as np
import pytest
import torch
from decoder_shards import _commit_tar, write_joined

from pipeline.decoder.data import DecoderLoader, DecoderPlan, check_decoder_plan, make_decoder_plan
from pipeline.demo import synth
from pipeline.errors import DataError, NotFoundError
from pipeline.prior.loader import TokenLoader

NO_IMAGE = ("000000003", "000010007")
NO_TOKENS = ("000000005", "000010001", "000010002")


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    root = tmp_path_factory.mktemp("joined")
    by_key = write_joined(root, no_image=NO_IMAGE, no_tokens=NO_TOKENS)
    return root, by_key


def _loader(plan, rank=0, world=1, **kw):
    args = {"micro_batch": 4, "text_len": 4, "seed": 3, "shuffle_buffer": 8, "heldout_percent": 10.0, **kw}
    return DecoderLoader(plan, rank=rank, world=world, **args)


def test_join_counts_both_sides_and_the_plan_round_trips(joined):
    root, _ = joined
    plan = make_decoder_plan(str(root / "tokens"), str(root / "images"), 4, 16, count_join=True)
    assert plan.join == {"joined": 48 - 2 - 3, "tokens_without_image": 2, "images_without_tokens": 3,
                         "token_shards_without_image_shard": 0, "image_shards_without_token_shard": 0}
    again = DecoderPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.to_json() == plan.to_json() and again.image_size == 16
    assert make_decoder_plan(str(root / "tokens"), str(root / "images"), 4, 16, count_join=False).join == {}
    with pytest.raises(DataError, match="no image shards"):
        DecoderPlan.from_json(plan.tokens.to_json())  # a prior's plan is not a decoder's


def test_pixels_are_each_keys_own_image_and_missing_ones_are_masked(joined):
    root, by_key = joined
    plan = make_decoder_plan(str(root / "tokens"), str(root / "images"), 4, 16, count_join=True)
    loader = _loader(plan)
    tokens = TokenLoader(plan.tokens, rank=0, world=1, micro_batch=4, text_len=4, seed=3, shuffle_buffer=8,
                         embeddings=True, heldout_percent=10.0, embed_columns=("clip_image_emb",))
    seen_missing, seen = 0, set()
    for b, t in zip(loader.batches(0), tokens.batches(0)):
        assert b.keys == t.keys and torch.equal(b.image_emb, t.image_emb)  # the token loader's order, untouched
        for i, key in enumerate(b.keys):
            seen.add(key)
            if key in NO_IMAGE:
                assert not b.valid[i] and bool((b.image[i] == -1).all())  # no pixels: black, masked
                seen_missing += 1
                continue
            want = np.asarray(synth.render(by_key[key], 16), np.float32) / 127.5 - 1
            assert np.allclose(b.image[i].permute(1, 2, 0).numpy(), want, atol=1e-6), key
            assert float(b.image[i].min()) >= -1 and float(b.image[i].max()) <= 1
        if len(seen) >= 40:
            break
    loader.close()
    tokens.close()
    assert loader.missing_images >= seen_missing >= 1  # counted (the next batch is joined ahead: >=)
    assert not seen & set(NO_TOKENS)


def test_batches_resume_exactly_at_any_step_on_every_rank(joined):
    root, _ = joined
    plan = make_decoder_plan(str(root / "tokens"), str(root / "images"), 4, 16, count_join=False)
    for rank in range(2):
        loader = _loader(plan, rank=rank, world=2)
        it = loader.batches(0)
        full = [next(it) for _ in range(9)]
        it.close()
        for start in (1, 4, 7):
            it = loader.batches(start)
            for want in full[start:]:
                got = next(it)
                assert got.step == want.step and got.keys == want.keys
                assert torch.equal(got.image, want.image) and torch.equal(got.valid, want.valid)
            it.close()
        loader.close()


def test_a_token_shard_without_image_embeddings_is_refused_naming_the_file(tmp_path):
    write_joined(tmp_path, shards=1, image_emb=False)
    plan = make_decoder_plan(str(tmp_path / "tokens"), str(tmp_path / "images"), 4, 16, count_join=True)
    loader = _loader(plan)
    with pytest.raises(DataError, match=r"00000\.parquet: no column\(s\) clip_image_emb; the decoder is "
                                        r"conditioned on CLIP image embeddings"):
        next(loader.batches(0))
    loader.close()


def test_images_of_another_resolution_are_refused_before_training(tmp_path):
    write_joined(tmp_path, shards=1, size=16)
    with pytest.raises(DataError, match=r"images/00000 key 000000000: image is 16x16, the decoder generates "
                                        r"32x32"):
        make_decoder_plan(str(tmp_path / "tokens"), str(tmp_path / "images"), 4, 32, count_join=True)
    # a later shard at another size, found when its pixels are read
    samples, _ = synth.make_samples(4, 0.1, seed=5)
    _commit_tar(tmp_path / "images", 0, [(f"00000{i:04d}", s) for i, s in enumerate(samples)], 8)
    write_joined(tmp_path / "b", shards=1, size=16)
    plan = make_decoder_plan(str(tmp_path / "b" / "tokens"), str(tmp_path / "b" / "images"), 4, 16, True)
    plan.images = str(tmp_path / "images")
    plan.image_shards = {0: json.loads((tmp_path / "images" / "00000.done.json").read_text())["files"]}
    loader = _loader(plan)
    with pytest.raises(DataError, match=r"00000\.tar key 00000000\d: image is 8x8, the decoder generates 16x16"):
        for _, _ in zip(range(12), loader.batches(0)):
            pass
    loader.close()


def test_no_join_and_no_images_are_refused(tmp_path):
    write_joined(tmp_path / "a", shards=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no committed image shards"):
        make_decoder_plan(str(tmp_path / "a" / "tokens"), str(tmp_path / "empty"), 4, 16, True)
    samples, _ = synth.make_samples(3, 0.1, seed=1)
    other = tmp_path / "other"
    other.mkdir()
    _commit_tar(other, 0, [(f"x{i}", s) for i, s in enumerate(samples)], 16)
    with pytest.raises(DataError, match="no token row has an image in"):
        make_decoder_plan(str(tmp_path / "a" / "tokens"), str(other), 4, 16, True)


def test_a_rewritten_image_shard_is_refused_on_resume(tmp_path):
    write_joined(tmp_path, shards=1)
    plan = make_decoder_plan(str(tmp_path / "tokens"), str(tmp_path / "images"), 4, 16, True)
    check_decoder_plan(plan)
    samples, _ = synth.make_samples(24, 0.1, seed=9)
    _commit_tar(tmp_path / "images", 0, [(f"00000{i:04d}", s) for i, s in enumerate(samples)], 16)
    with pytest.raises(DataError, match=r"images/00000: rewritten since the plan was made"):
        check_decoder_plan(plan)
