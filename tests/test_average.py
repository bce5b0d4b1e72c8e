"""Weight averaging of checkpoints (``python -m src_train average``)."""
import torch

from napari_bach.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from napari_bach.model import build_model
from src_train.__main__ import main
from conftest import tiny_config


def _saved(tmp_path, name, seed, steps, **config):
    torch.manual_seed(seed)
    model = build_model(tiny_config(**config))
    return save_checkpoint(tmp_path / name, model, ModelInfo(name="run", nuclei_trained=True, steps=steps)), model


def test_average_is_the_mean_of_the_weights_with_the_latest_provenance(tmp_path, capsys):
    a_path, a = _saved(tmp_path, "a.pt", 0, 1000)
    b_path, b = _saved(tmp_path, "b.pt", 1, 2000, default_score_threshold=0.45)  # settings may differ
    assert main(["average", str(a_path), str(b_path), "--out", str(tmp_path / "avg.pt")]) == 0
    avg, info = load_checkpoint(tmp_path / "avg.pt")
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in avg.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (sa[k] + sb[k]) / 2)
    assert not torch.equal(sa["roi_heads.box_head.fc6.weight"], sb["roi_heads.box_head.fc6.weight"])
    assert info.steps == 2000 and info.nuclei_trained and "averaged over 2 checkpoints (steps 1000, 2000)" in info.notes
    assert "averaged over 2" in capsys.readouterr().out


def test_average_refuses_other_architectures_and_a_single_file(tmp_path, capsys):
    a_path, _ = _saved(tmp_path, "a.pt", 0, 10)
    c_path, _ = _saved(tmp_path, "c.pt", 0, 10, fpn_channels=32)
    assert main(["average", str(a_path), str(c_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert "fpn_channels" in capsys.readouterr().err
    assert main(["average", str(a_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert "at least two" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()
