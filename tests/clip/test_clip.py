import numpy as np

from pipeline.clip import model as clip
from pipeline.clip.train import train_clip
from pipeline.config import ClipConfig
from pipeline.demo import synth


def test_trained_clip_loads_through_open_clip_local_dir(tmp_path):
    samples, _ = synth.make_samples(64, 0.1, seed=0)
    images = np.stack([np.asarray(synth.render(s, 16)) for s in samples])
    caps = [s.caption for s in samples]
    cfg = ClipConfig(embed_dim=16, width=32, layers=1, patch_size=8, context_length=20, steps=5, batch_size=16)
    result = train_clip(cfg, images, caps, str(tmp_path), seed=0)
    assert np.isfinite(result["final_loss"])
    assert (tmp_path / "open_clip_config.json").exists() and (tmp_path / "open_clip_model.safetensors").exists()
    bundle = clip.load_clip(f"local-dir:{tmp_path}")
    assert bundle.image_size == 16 and bundle.embed_dim == 16
    img = clip.encode_images(bundle, images[:4])
    txt = clip.encode_texts(bundle, caps[:4])
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-4)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-4)
    again = clip.load_clip(f"local-dir:{tmp_path}")
    assert again.weights_sha256 == bundle.weights_sha256
