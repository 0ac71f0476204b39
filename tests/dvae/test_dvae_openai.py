"""OpenAI's dall_e encoder.pkl / decoder.pkl → our DVAE: same tokens, same images, without dall_e importable."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

dall_e = pytest.importorskip("dall_e")  # dev extra: builds files in OpenAI's format with OpenAI's own classes

from pipeline.config import load_config  # noqa: E402
from pipeline.dvae.model import load_dvae, save_dvae  # noqa: E402
from pipeline.dvae.openai import import_weights, load_openai, preprocess, read_dall_e_module  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 512


def _dall_e_pair(vocab: int = VOCAB, seed: int = 0):
    torch.manual_seed(seed)
    # dall_e 0.1's group_count is a class constant (4 groups, hard-coded), not a constructor argument.
    enc = dall_e.encoder.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=vocab, requires_grad=False)
    dec = dall_e.decoder.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=vocab, requires_grad=False)
    return enc.eval(), dec.eval()


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """Random-weight dall_e modules saved exactly as OpenAI's files are: torch.save(module, path)."""
    d = tmp_path_factory.mktemp("openai")
    enc, dec = _dall_e_pair()
    torch.save(enc, d / "encoder.pkl")
    torch.save(dec, d / "decoder.pkl")
    return enc, dec, str(d / "encoder.pkl"), str(d / "decoder.pkl")


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(n // 2, 3, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    structured = []
    for i in range(n - n // 2):  # gradients, stripes, checkerboards, flat colours
        a = torch.stack([xx, yy, (xx + yy) / 2]) if i % 2 == 0 else ((xx * (4 + i)).floor() % 2).expand(3, -1, -1)
        structured.append(a * torch.rand(3, 1, 1, generator=g))
    return torch.cat([noise, torch.stack(structured)]).float().contiguous()


def test_same_tokens_and_images_as_dall_e(openai_files):
    enc, dec, enc_path, dec_path = openai_files
    ours = load_openai(enc_path, dec_path)
    assert not ours.training and ours.shape.vocab_size == VOCAB and ours.shape.group_count == 4
    assert ours.shape.n_init == 32 and ours.shape.recon == "logit_laplace"
    x = _images()
    with torch.no_grad():
        want = enc(dall_e.map_pixels(x)).argmax(1)
        codes = ours.encode(x)
        assert codes.shape == (8, 4, 4) and torch.equal(codes, want)
        assert want.unique().numel() > 4  # not a degenerate all-one-code comparison
        onehot = F.one_hot(want, VOCAB).permute(0, 3, 1, 2).float()
        ref = dall_e.unmap_pixels(torch.sigmoid(dec(onehot).float()[:, :3]))
        torch.testing.assert_close(ours.decode(codes), ref, atol=1e-5, rtol=0)


def test_legacy_format_http_and_fsspec_sources(openai_files, tmp_path):
    enc, _, enc_path, _ = openai_files
    legacy = tmp_path / "encoder_legacy.pkl"
    torch.save(enc, legacy, _use_new_zipfile_serialization=False)
    ref_state, ref_attrs = read_dall_e_module(enc_path)
    assert ref_attrs["kind"] == "encoder" and ref_attrs["n_hid"] == 64 and ref_attrs["group_count"] == 4
    assert set(ref_state) == {k for k in enc.state_dict()}
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=os.path.dirname(enc_path))
    handler.log_message = lambda *a: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            sources = [str(legacy), f"{url}/encoder.pkl", f"file://{enc_path}"]
            for src in sources:
                state, attrs = read_dall_e_module(src)
                assert attrs["vocab_size"] == VOCAB and state.keys() == ref_state.keys()
                assert all(torch.equal(state[k], ref_state[k]) for k in state), src
            with pytest.raises(ValueError, match=f"{url}/missing.pkl.*cannot read"):
                read_dall_e_module(f"{url}/missing.pkl")
        finally:
            server.shutdown()


def test_loader_does_not_need_dall_e(openai_files, tmp_path):
    enc, _, enc_path, dec_path = openai_files
    x = _images()
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys; sys.modules['dall_e'] = None\n"  # any 'import dall_e' now raises ImportError
        "import torch\n"
        "from pipeline.dvae.openai import load_openai\n"
        "try:\n    import dall_e\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('dall_e importable')\n"
        f"m = load_openai({enc_path!r}, {dec_path!r})\n"
        "assert not any(k == 'dall_e' or k.startswith('dall_e.') for k, v in sys.modules.items() if v is not None)\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save(m.encode(x), {str(tmp_path / 'codes.pt')!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        want = enc(dall_e.map_pixels(x)).argmax(1)
    assert torch.equal(torch.load(tmp_path / "codes.pt"), want)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_pickle_names_the_file(openai_files, tmp_path, legacy):
    enc, _, _, _ = openai_files
    full = tmp_path / "full.pkl"
    torch.save(enc, full, _use_new_zipfile_serialization=not legacy)
    data = full.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"truncated_{cut}.pkl"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"{bad}: cannot unpickle \\(truncated or corrupt"):
            read_dall_e_module(str(bad))
    with pytest.raises(ValueError, match="missing.pkl.*cannot read"):
        read_dall_e_module(str(tmp_path / "missing.pkl"))


def test_mismatched_or_swapped_files(openai_files, tmp_path):
    _, _, enc_path, dec_path = openai_files
    _, dec_1024 = _dall_e_pair(vocab=1024)
    other = tmp_path / "decoder_1024.pkl"
    torch.save(dec_1024, other)
    with pytest.raises(ValueError, match=f"{enc_path}.*{other}.*vocab_size 512 vs vocab_size 1024"):
        load_openai(enc_path, str(other))
    with pytest.raises(ValueError, match=f"{dec_path}: expected a dall_e encoder"):
        load_openai(dec_path, enc_path)


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_other_pickles_are_rejected(tmp_path):
    cases = {"dict.pkl": {"blocks.input.w": torch.zeros(2)}, "linear.pkl": torch.nn.Linear(2, 2),
             "evil.pkl": _Evil(str(tmp_path / "ran"))}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=f"{tmp_path / name}: not a dall_e Encoder/Decoder"):
            read_dall_e_module(str(tmp_path / name))
    assert not (tmp_path / "ran").exists()  # the pickle's open() call was refused, not run


def test_preprocess_matches_openai_notebook():
    from PIL import Image
    from torchvision.transforms import functional as TF

    img = Image.fromarray((torch.rand(70, 90, 3) * 255).byte().numpy())
    x = preprocess(img, size=64)
    assert x.shape == (1, 3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    # OpenAI's usage notebook, minus its map_pixels (DVAE.encode applies it)
    r = 64 / min(img.size)
    ref = TF.resize(img, [round(r * img.size[1]), round(r * img.size[0])], interpolation=TF.InterpolationMode.LANCZOS)
    ref = TF.to_tensor(TF.center_crop(ref, [64, 64])).unsqueeze(0)
    assert torch.equal(x, ref)
    with pytest.raises(ValueError, match="shorter side 70 is below the size 256"):
        preprocess(img)


def test_import_weights_writes_a_loadable_checkpoint(openai_files, tmp_path):
    enc, _, enc_path, dec_path = openai_files
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"run_dir={tmp_path}", "dvae.weights=openai", f"dvae.encoder_path={enc_path}",
                       f"dvae.decoder_path={dec_path}", "download.image_size=32"])
    extra = import_weights(cfg)
    assert extra["source"] == "openai" and extra["grid"] == 4 and extra["vocab_size"] == VOCAB
    assert extra["image_size"] == 32 and len(extra["encoder_sha256"]) == 64 and extra["decoder_path"] == dec_path
    path = tmp_path / "dvae" / "dvae.safetensors"
    model = load_dvae(str(path))
    assert json.loads((tmp_path / "dvae" / "metrics.json").read_text())["result"] == extra
    x = _images()
    with torch.no_grad():
        assert torch.equal(model.encode(x), enc(dall_e.map_pixels(x)).argmax(1))

    # weights: one of our checkpoints → validated and copied
    ours = tmp_path / "ours.safetensors"
    save_dvae(model, str(ours))
    cfg2 = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                       [f"run_dir={tmp_path / 'run2'}", f"dvae.weights={ours}", "download.image_size=32"])
    extra2 = import_weights(cfg2)
    assert extra2["source"] == str(ours) and len(extra2["sha256"]) == 64
    assert torch.equal(load_dvae(str(tmp_path / "run2" / "dvae" / "dvae.safetensors")).encode(x), model.encode(x))

    bad = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"run_dir={tmp_path / 'run3'}", f"dvae.weights={ours}", "download.image_size=36"])
    with pytest.raises(ValueError, match="image_size 36 is not divisible by the dVAE's downsampling 8"):
        import_weights(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    junk = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                       [f"run_dir={tmp_path / 'run4'}", f"dvae.weights={tmp_path / 'junk.safetensors'}"])
    with pytest.raises(ValueError, match="junk.safetensors"):
        import_weights(junk)
