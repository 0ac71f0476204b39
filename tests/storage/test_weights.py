"""Model weights as safetensors + JSON config: every model kind round-trips without ``torch.load``, an earlier
version's ``.pt`` is refused with how to re-export it, and a config that disagrees with its tensors is refused naming
the tensor and both shapes."""

import dataclasses
import json

import pytest
import torch

from pipeline.decoder.checkpoints import load_decoder
from pipeline.decoder.model import Decoder, DecoderShape
from pipeline.dvae.model import DVAE, DVAEShape, load_dvae, save_dvae
from pipeline.errors import InputError
from pipeline.prior.checkpoints import load_prior, read_weights, save_prior
from pipeline.prior.diffusion import DiffusionPrior, DiffusionShape
from pipeline.prior.transformer import DalleTransformer, PriorShape
from pipeline.storage.weights import FORMAT

DVAE_SHAPE = DVAEShape(vocab_size=16, n_hid=4, group_count=2, n_blk_per_group=1, n_init=8)
AR = PriorShape(text_vocab=30, text_len=4, image_vocab=16, image_grid=2, n_layer=1, n_head=2, n_embd=8)
DIFFUSION = DiffusionShape(text_vocab=30, text_len=4, embed_dim=8, n_layer=1, n_head=2, n_embd=8, timesteps=10)
DECODER = DecoderShape(image_size=8, embed_dim=8, channels=8, channel_mult=(1,), num_res_blocks=1,
                       attention_levels=(), head_channels=8, context_dim=8, timesteps=10)
META = {"grid": 2, "embed_dim": 8, "tokenizer": {"vocab_size": 30}, "dvae": {"vocab_size": 16}}


def _no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a weights loader called torch.load")

    monkeypatch.setattr(torch, "load", refuse)


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_model_kind_round_trips_without_torch_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    dvae = DVAE(DVAE_SHAPE)
    save_dvae(dvae, str(tmp_path / "dvae.safetensors"), extra={"steps": 7, "final_loss": 0.5})
    ar = DalleTransformer(AR)
    save_prior(str(tmp_path / "ar" / "model.safetensors"), "ar", dataclasses.asdict(AR), ar.state_dict(), META, 11)
    diffusion, decoder = DiffusionPrior(DIFFUSION), Decoder(DECODER)
    ema = {k: v + 1 for k, v in diffusion.state_dict().items()}  # the EMA weights sampling uses, and the raw ones
    save_prior(str(tmp_path / "diffusion" / "model.safetensors"), "diffusion", dataclasses.asdict(DIFFUSION),
               diffusion.state_dict(), META, 12, ema)
    save_prior(str(tmp_path / "decoder" / "model.safetensors"), "decoder", dataclasses.asdict(DECODER),
               decoder.state_dict(), META, 13, decoder.state_dict())

    _no_torch_load(monkeypatch)
    assert _equal(load_dvae(str(tmp_path / "dvae.safetensors")), dvae)
    loaded, meta = load_prior(str(tmp_path / "ar" / "model.safetensors"), "ar")
    assert _equal(loaded, ar) and meta == META and loaded.shape == AR
    loaded, _ = load_prior(str(tmp_path / "diffusion" / "model.safetensors"), "diffusion")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())  # the EMA weights are the model's
    raw = read_weights(str(tmp_path / "diffusion" / "model.safetensors"), "diffusion")["raw_state_dict"]
    assert all(torch.equal(raw[k], v) for k, v in diffusion.state_dict().items())
    loaded, _ = load_decoder(str(tmp_path / "decoder" / "model.safetensors"))
    assert _equal(loaded, decoder) and loaded.shape == DECODER

    config = json.loads((tmp_path / "dvae.json").read_text())  # shape and provenance beside the tensors
    assert config["kind"] == "dvae" and config["shape"] == dataclasses.asdict(DVAE_SHAPE)
    assert config["extra"] == {"steps": 7, "final_loss": 0.5} and config["format"] == FORMAT
    config = json.loads((tmp_path / "diffusion" / "model.json").read_text())
    assert (config["kind"], config["steps"], config["tokens_meta"]) == ("diffusion", 12, META)
    assert len(config["sha256"]) == 64 and config["weights"] == "model.safetensors"


def test_a_legacy_pt_is_refused_with_how_to_reexport(tmp_path, capsys):
    from pipeline.cli import main

    run = tmp_path / "run"
    (run / "dvae").mkdir(parents=True)
    (run / "prior").mkdir()
    torch.save({"kind": "dvae", "shape": dataclasses.asdict(DVAE_SHAPE), "state_dict": DVAE(DVAE_SHAPE).state_dict()},
               run / "dvae" / "dvae.pt")
    torch.save({"kind": "ar", "shape": dataclasses.asdict(AR), "state_dict": {}}, run / "prior" / "model.pt")
    with pytest.raises(InputError, match=r"dvae\.pt: a torch pickle from an earlier version of the pipeline, no longer "
                                         r"loaded .* now dvae\.safetensors \+ dvae\.json\. Re-export it: rerun "
                                         r"`python -m pipeline train-dvae`"):
        load_dvae(str(run / "dvae" / "dvae.pt"))
    renamed = tmp_path / "renamed.safetensors"  # a pickle under the new name is refused the same way
    renamed.write_bytes((run / "prior" / "model.pt").read_bytes())
    (tmp_path / "renamed.json").write_text("{}")
    with pytest.raises(InputError, match="renamed.safetensors: a torch pickle from an earlier version"):
        load_prior(str(renamed), "ar")

    # The run's default location holds only the earlier version's file: the one-line error says what to run.
    assert main(["sample", f"run_dir={run}", "sample.captions=[a red circle]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run / 'prior' / 'model.pt'}: a torch pickle"), err
    assert "`python -m pipeline export-prior`" in err[0] and "rerunning train-prior" in err[0]
    assert main(["sample", f"run_dir={run}", "sample.captions=[x]", f"sample.checkpoint={tmp_path / 'gone.pt'}"]) == 2
    assert "gone.pt: no such file or folder" in capsys.readouterr().err


def test_a_config_that_disagrees_with_its_tensors_is_refused_naming_both_shapes(tmp_path):
    path = tmp_path / "dvae.safetensors"
    save_dvae(DVAE(DVAE_SHAPE), str(path))
    config = json.loads((tmp_path / "dvae.json").read_text())
    config["shape"]["n_hid"] = 6  # the config now describes a wider model than the tensors hold
    (tmp_path / "dvae.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=rf"{path}: tensor 'encoder\.blocks\.input\.weight' has shape \(4, 3, 7, 7\), "
                                         rf"but the model {tmp_path / 'dvae.json'} describes expects \(6, 3, 7, 7\)"):
        load_dvae(str(path))

    model = tmp_path / "prior" / "model.safetensors"
    save_prior(str(model), "ar", dataclasses.asdict(AR), DalleTransformer(AR).state_dict(), META, 1)
    config = json.loads((tmp_path / "prior" / "model.json").read_text())
    config["shape"]["n_layer"] = 2  # a layer the file has no tensors for
    (tmp_path / "prior" / "model.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"model\.safetensors: no tensor 'blocks\.1\.[^']*', which the model "
                                         r".*model\.json describes has \(shape \(\d+"):
        load_prior(str(model), "ar")
    config["shape"]["n_layer"] = 1
    (tmp_path / "prior" / "model.json").write_text(json.dumps(config))
    assert load_prior(str(model), "ar")[0].shape == AR
    model.write_bytes(model.read_bytes()[:-4] + b"\0\0\0\0")  # tensors rewritten without their config
    with pytest.raises(InputError, match=r"model\.safetensors: its bytes do not match the sha256 in .*model\.json"):
        load_prior(str(model), "ar")
