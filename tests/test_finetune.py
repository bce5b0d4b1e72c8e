"""Fine-tuning on exported corrections: before/after measured on held-out images, the new
model written only where asked, nothing the user exported or the starting model touched."""
from __future__ import annotations

import hashlib
import json

import pytest

from napari_bach.export import export_sample
from napari_bach.synthetic import synthetic_he


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def corrections(tmp_path):
    dataset = tmp_path / "my corrections"
    for i in range(3):
        rgb, labels = synthetic_he((128, 128), mpp=0.4, seed=20 + i)
        export_sample(dataset, f"tile{i}", rgb, labels, 0.4, None, {})
    return dataset


def test_finetune_command_prints_before_after_and_writes_only_a_new_model(tmp_path, corrections, tiny_checkpoint,
                                                                          capsys):
    from src_train.__main__ import main

    before_data, before_model = _digest(corrections), tiny_checkpoint.read_bytes()
    out = tmp_path / "models"
    assert main(["finetune", str(corrections), "--model", str(tiny_checkpoint), "--minutes", "0.05",
                 "--out", str(out), "--threads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "held-out image(s) (tile2)" in printed
    (model,) = out.glob("napari-bach-finetuned-*-my-corrections.pt")
    table = json.loads(model.with_suffix(".json").read_text())
    assert table["held_out_images"] == ["tile2"] and table["train_images"] == ["tile0", "tile1"]
    assert table["steps"] > 0 and set(table["before"]) == set(table["after"]) >= {"f1", "aji", "pq"}
    from napari_bach.checkpoint import load_checkpoint

    tuned, info = load_checkpoint(model)
    assert info.metrics["finetune"]["after"] == table["after"] and "fine-tuned" in info.notes
    assert _digest(corrections) == before_data and tiny_checkpoint.read_bytes() == before_model
    assert (next(out.glob("*-run")) / "last.pt").is_file()  # the last good checkpoint of the run


def test_finetune_refuses_unusable_input_with_exit_2(tmp_path, corrections, tiny_checkpoint, capsys):
    from src_train.__main__ import main

    empty = tmp_path / "empty"
    rgb, labels = synthetic_he((64, 64), mpp=0.4, seed=1)
    export_sample(empty, "only", rgb, labels, 0.4, None, {})
    (tmp_path / "not-a-model.pt").write_bytes(b"PK\x03\x04 nonsense")
    for argv, message in (
        ([str(empty), "--model", str(tiny_checkpoint), "--minutes", "1"], "at least 2 are needed"),
        ([str(tmp_path), "--model", str(tiny_checkpoint), "--minutes", "1"], "not a napari-bach dataset"),
        ([str(corrections), "--model", str(tmp_path / "not-a-model.pt"), "--minutes", "1"], "not a PyTorch checkpoint"),
        ([str(corrections), "--model", str(tiny_checkpoint), "--minutes", "0"], "above 0 minutes"),
    ):
        assert main(["finetune", *argv, "--out", str(tmp_path / "o")]) == 2, argv
        assert message in capsys.readouterr().err
