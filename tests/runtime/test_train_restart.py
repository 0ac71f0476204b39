"""A restarted Ray Train worker group says so, whether or not Ray Train received a checkpoint before the failure."""

import ray.train

from pipeline.runtime import ray_seam


def test_the_first_group_is_quiet_and_a_replacement_announces_itself(tmp_path, monkeypatch, capsys):
    marker = str(tmp_path / "train-prior" / "_started_abc")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # a node lost before its first report
    ray_seam._announce_restart(marker)
    assert "restarted" not in capsys.readouterr().out
    ray_seam._announce_restart(marker)  # the group Ray Train starts in place of the failed one
    assert "restarted after a failure; last reported checkpoint none reported yet" in capsys.readouterr().out


def test_a_replacement_names_the_checkpoint_ray_train_last_received(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "reported"
    folder.mkdir()
    (folder / "pointer.json").write_text('{"tag": "step00000010"}')
    marker = str(tmp_path / "_started_def")
    ray_seam._announce_restart(marker)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(folder)))
    ray_seam._announce_restart(marker)
    assert 'last reported checkpoint {"tag": "step00000010"}' in capsys.readouterr().out
