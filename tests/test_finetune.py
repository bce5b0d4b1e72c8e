"""Fine-tuning on exported corrections: before/after measured on held-out images, the new
model written only where asked, nothing the user exported or the starting model touched."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
    original = tmp_path / "original"  # the model's own training data, replayed beside the corrections
    (original / "images").mkdir(parents=True)
    (original / "labels").mkdir()
    import tifffile
    from PIL import Image

    rgb, labels = synthetic_he((96, 96), mpp=0.4, seed=5)
    Image.fromarray(rgb).save(original / "images" / "o.png")
    tifffile.imwrite(original / "labels" / "o.tif", labels.astype("int32"))
    assert main(["finetune", str(corrections), "--model", str(tiny_checkpoint), "--minutes", "0.05",
                 "--out", str(out), "--threads", "2", "--replay", f"orig:{original}:0.4", "--no-lab-scale"]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "held-out image(s) (tile2)" in printed
    (model,) = out.glob("napari-bach-finetuned-*-my-corrections.pt")
    table = json.loads(model.with_suffix(".json").read_text())
    assert table["held_out_images"] == ["tile2"] and table["train_images"] == ["tile0", "tile1"]
    assert table["replay_images"] == 1
    assert table["mpp"][0] == table["mpp"][1] and table["recipe"]["lab_scale"] is False
    assert table["mask_threshold"][0] == table["mask_threshold"][1] and not table["recipe"]["choose_mask_threshold"]
    assert table["steps"] > 0 and set(table["before"]) == set(table["after"]) >= {"f1", "aji", "pq"}
    from napari_bach.checkpoint import load_checkpoint

    tuned, info = load_checkpoint(model)
    assert info.metrics["finetune"]["after"] == table["after"] and "fine-tuned" in info.notes
    assert _digest(corrections) == before_data and tiny_checkpoint.read_bytes() == before_model
    assert (next(out.glob("*-run")) / "last.pt").is_file()  # the last good checkpoint of the run
    # an untrained model on 0.05 min cannot improve: the table and the printout say so
    assert table["better"] is False and "NOT better than the starting model" in printed
    assert "keep using tiny.pt" in printed and "NOT better" in info.notes


def test_the_original_data_is_replayed_by_default_when_it_is_there(tmp_path, corrections, tiny_checkpoint,
                                                                    monkeypatch):
    import tifffile
    from PIL import Image

    import src_train.finetune as ft
    from napari_bach._qt.finetune_widget import finetune_command
    from src_train.__main__ import main

    original = tmp_path / "original"
    (original / "images").mkdir(parents=True)
    (original / "labels").mkdir()
    rgb, labels = synthetic_he((96, 96), mpp=0.4, seed=5)
    Image.fromarray(rgb).save(original / "images" / "o.png")
    tifffile.imwrite(original / "labels" / "o.tif", labels.astype("int32"))
    data_list = tmp_path / "data.toml"
    data_list.write_text(f'[[source]]\nname = "orig"\npath = "{original}"\nmpp = 0.4\n')
    monkeypatch.setattr(ft, "default_replay", lambda: data_list)
    for extra, replayed in (([], 1), (["--no-replay"], 0)):
        out = tmp_path / f"models{replayed}"
        assert main(["finetune", str(corrections), "--model", str(tiny_checkpoint), "--minutes", "0.02",
                     "--out", str(out), "--threads", "1", *extra]) == 0
        (table,) = out.glob("*.json")
        assert json.loads(table.read_text())["replay_images"] == replayed
    assert "--no-replay" in finetune_command("d", "m.pt", 5, "o", "cpu", None)


def test_better_means_pq_up_by_the_margin_with_f1_and_aji_not_lower():
    from src_train.finetune import better

    start = {"f1": 0.60, "aji": 0.45, "pq": 0.47}
    assert better(start, {"f1": 0.65, "aji": 0.50, "pq": 0.52}, 0.005)
    assert not better(start, {"f1": 0.65, "aji": 0.50, "pq": 0.473}, 0.005)  # within noise
    assert not better(start, {"f1": 0.59, "aji": 0.50, "pq": 0.52}, 0.005)  # fewer nuclei found
    assert better(start, start, 0.0) and not better(start, start, 0.001)  # equal is better only without a margin


def test_a_recipe_refuses_impossible_settings():
    from src_train.finetune import FinetuneError, Recipe

    for kw, message in (({"lr": 0}, "learning rate"), ({"parts": "trunk"}, "parts must be"),
                        ({"ema": 1.0}, "ema"), ({"replay_share": 1.0}, "replay share"),
                        ({"box_batch": 0}, "at least 1"), ({"box_positive_fraction": 0}, "positive share"),
                        ({"augment": "heavy"}, "augment must be")):
        with pytest.raises(FinetuneError, match=message):
            Recipe(**kw)


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


def test_the_whole_loop_in_napari_export_finetune_in_a_process_then_segment_with_it(make_napari_viewer, qtbot,
                                                                                    tiny_checkpoint, tmp_path,
                                                                                    monkeypatch):
    """Issue 16: export corrections → fine-tune in a separate process (the viewer stays
    responsive) → before/after table → the new model chosen in Segment nuclei; Cancel
    leaves the viewer usable and the export untouched."""
    import numpy as np

    from napari_bach._qt import finetune_widget
    from napari_bach._qt.curate_widget import CurateWidget

    viewer = make_napari_viewer()
    cur = CurateWidget(viewer)
    viewer.window.add_dock_widget(cur)
    for i in range(3):  # three corrected images, exported as a pathologist would
        rgb, labels = synthetic_he((128, 128), mpp=0.4, seed=30 + i)
        image = viewer.add_image(rgb, name=f"tile{i}", rgb=True, scale=(0.4, 0.4), metadata={"mpp": 0.4})
        nuclei = viewer.add_labels(labels, name=f"tile{i} nuclei", scale=(0.4, 0.4))
        cur._image.value, cur._nuclei.value = image, nuclei
        cur._dataset.value = str(tmp_path / "dataset")
        assert cur.export() is not None
    exported = _digest(tmp_path / "dataset")

    monkeypatch.setitem(finetune_widget.BUDGETS, "5 min", 0.05)  # 3 s of training, not 5 min
    _, w = viewer.window.add_plugin_dock_widget("napari-bach", "Fine-tune on corrections")  # Plugins menu
    assert str(w._dataset.value) == str(tmp_path / "dataset")  # the folder just exported to
    w.model.use_file(tiny_checkpoint)
    w._replay.value = False  # the tiny test model is not trained on ../shared anyway
    w.run()
    assert "Choose a folder to save" in w._status.value and w.process is None
    w._out.value = str(tmp_path / "models")
    w.run()
    assert w.process is not None
    qtbot.waitUntil(lambda: w.process is None, timeout=180_000)
    assert w.result is not None, w._status.value
    assert "before" in w._table.value and "after" in w._table.value and "tile2" in w._table.value
    assert "<table" in w._table.value  # columns aligned in any font
    assert w._use.enabled and Path(w.result["model"]).parent == tmp_path / "models"
    # an untrained model cannot get better in 3 s: said plainly, and Use asks before switching
    assert w.result["better"] is False and "Not better" in w._status.value and "not better" in w._table.value
    _, segment = viewer.window.add_plugin_dock_widget("napari-bach", "Segment nuclei")
    segment.model.use_file(tiny_checkpoint)
    asked = []
    monkeypatch.setattr(type(w), "_confirm_not_better", lambda self: asked.append(1) or False)
    w.use_model()
    assert asked and segment.model.path() == Path(tiny_checkpoint) and "Kept" in w._status.value
    monkeypatch.setattr(type(w), "_confirm_not_better", lambda self: True)
    w.use_model()
    assert segment.model.path() == Path(w.result["model"])

    monkeypatch.setitem(finetune_widget.BUDGETS, "5 min", 5.0)
    w.run()
    qtbot.waitUntil(lambda: "training on" in w._status.value or "step" in w._status.value, timeout=120_000)
    w.cancel()
    qtbot.waitUntil(lambda: w.process is None, timeout=30_000)
    assert "Cancelled" in w._status.value and _digest(tmp_path / "dataset") == exported
    viewer.add_image(np.zeros((8, 8)), name="still usable")
    assert "still usable" in [layer.name for layer in viewer.layers]


def test_replay_takes_its_share_of_the_crops_and_can_draw_each_source_as_often():
    import numpy as np

    from src_train.datasets import Sample
    from src_train.finetune import mix_replay

    def sample(group, weight):
        return Sample(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.int32), 0.25, weight=weight, group=group)

    mine = [sample("", 1.0)] * 3
    replay = [sample("big", 1.0)] * 90 + [sample("small", 4.0)] * 2
    for even, small_share in ((False, 8 / 98), (True, 1 / 2)):
        mixed = mix_replay(mine, replay, 0.25, even)
        weights = {g: sum(s.weight for s in mixed if s.group == g) for g in ("", "big", "small")}
        total = sum(weights.values())
        assert weights[""] / total == pytest.approx(0.75)
        assert weights["small"] / (weights["big"] + weights["small"]) == pytest.approx(small_share)
    assert mix_replay(mine, [], 0.5, True) == mine


def test_lab_scale_matches_the_corrections_nucleus_size_to_the_models():
    import numpy as np

    from napari_bach.config import ModelConfig
    from src_train.datasets import Sample
    from napari_bach.scale import ZOOM_LIMITS
    from src_train.finetune import at_scale, lab_mpp, zoomed

    def discs(radius_px: float, mpp: float, n: int = 36) -> Sample:
        yy, xx = np.mgrid[:60 * 6, :60 * 6]
        labels = np.zeros(yy.shape, np.int32)
        for i in range(n):
            cy, cx = 30 + 60 * (i // 6), 30 + 60 * (i % 6)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius_px ** 2] = i + 1
        return Sample(np.zeros((*labels.shape, 3), np.uint8), labels, mpp)

    cfg = ModelConfig(mpp=0.3, nucleus_diameter_um=6.0)
    # discs of ~4.5 µm (diameter ~18 px at 0.25 µm/px): a lab of small nuclei
    small = discs(9, 0.25)
    d = np.sqrt(4 * np.median(np.bincount(small.labels.ravel())[1:]) / np.pi) * 0.25
    assert lab_mpp([small], cfg) == pytest.approx(round(0.3 * d / 6.0, 4))
    assert lab_mpp([small], cfg) < 0.3
    assert lab_mpp([discs(12, 0.25)], cfg) == 0.3  # ~6 µm: the model's own size, its own scale
    assert lab_mpp([discs(3, 0.25)], cfg) == pytest.approx(0.3 * ZOOM_LIMITS[0])  # implausible: bounded
    assert lab_mpp([discs(9, 0.25, n=5)], cfg) == 0.3  # too few nuclei to say
    assert lab_mpp([small], ModelConfig(mpp=0.3, nucleus_diameter_um=0.0)) == 0.3  # no reference size
    # each correction trains as a lab model sees it: zoomed by its own nuclei, on the lab's side only
    lab = lab_mpp([small], cfg)
    lab_cfg = ModelConfig(mpp=0.3, nucleus_diameter_um=6.0, lab_mpp=lab)
    assert zoomed(small, lab_cfg).mpp == pytest.approx(0.25 * 0.3 / lab)  # its nuclei at 6 µm's size
    assert zoomed(discs(14, 0.25), lab_cfg).mpp == 0.25  # larger than the reference: as it is
    assert zoomed(discs(4, 0.25), lab_cfg).mpp == pytest.approx(0.25 / ZOOM_LIMITS[0])  # at most 2×

    from conftest import tiny_config
    from napari_bach.model import build_model

    model = build_model(tiny_config(mpp=0.3, nucleus_diameter_um=6.0))
    lab = at_scale(model, 0.2)  # the weights' own scale and reference size stay; each image is zoomed by its nuclei
    assert (lab.config.mpp, lab.config.nucleus_diameter_um, lab.config.lab_mpp) == (0.3, 6.0, 0.2)
    assert at_scale(model, 0.3) is model


@pytest.mark.parametrize("lab_is_better", [True, False])
def test_the_lab_scale_is_kept_only_when_the_held_out_corrections_score_better_at_it(
        tmp_path, corrections, tiny_checkpoint, monkeypatch, lab_is_better):
    import src_train.finetune as ft
    from napari_bach.checkpoint import load_checkpoint

    from napari_bach.checkpoint import save_checkpoint
    from napari_bach.model import with_settings

    start, info = load_checkpoint(tiny_checkpoint)
    start = with_settings(start, nucleus_diameter_um=6.0)  # a reference size, which a lab's scale needs
    tiny_checkpoint = save_checkpoint(tmp_path / "start.pt", start, info)
    lab = round(start.config.mpp * 0.8, 4)
    monkeypatch.setattr(ft, "lab_mpp", lambda samples, config: lab)
    real = ft.candidates

    def candidates(model, held, thresholds):  # the held-out corrections' verdict on each scale
        scores = real(model, held, thresholds)
        if lab_is_better and model.config.lab_mpp == lab:
            scores = {t: {**m, "f1": m["f1"] + 0.1, "aji": m["aji"] + 0.1, "pq": m["pq"] + 0.1} for t, m in scores.items()}
        return scores

    monkeypatch.setattr(ft, "candidates", candidates)
    table = ft.finetune(corrections, tiny_checkpoint, 0.02, tmp_path / "out", threads=2, recipe=ft.Recipe(patience=0))
    tuned, info = load_checkpoint(table["model"])
    expected = lab if lab_is_better else start.config.mpp
    assert table["mpp"] == [start.config.mpp, expected] and tuned.config.mpp == start.config.mpp
    assert tuned.config.lab_mpp == pytest.approx(lab if lab_is_better else 0.0)
    zoom = f"({start.config.mpp / lab:.2f}× on the median), are zoomed"
    assert (zoom in ft.format_table(table)) is lab_is_better
    assert (zoom in info.notes) is lab_is_better
    from napari_bach._qt.finetune_widget import table_text

    assert (zoom in table_text(table)) is lab_is_better  # the dock says so too


@pytest.mark.parametrize("choose", [True, False])
def test_the_mask_threshold_is_re_chosen_for_the_kept_weights_on_the_held_out_corrections(
        tmp_path, corrections, tiny_checkpoint, monkeypatch, choose):
    import src_train.finetune as ft
    from napari_bach.checkpoint import load_checkpoint
    from napari_bach._qt.finetune_widget import table_text

    start, _ = load_checkpoint(tiny_checkpoint)
    own = start.config.mask_threshold
    real = ft.score
    seen = []

    def score(model, held):  # the held-out corrections prefer looser masks than the model's own
        seen.append(model.config.mask_threshold)
        m = real(model, held)
        return {**m, "f1": m["f1"] + 0.2, "aji": m["aji"] + 0.2, "pq": m["pq"] + 0.2} \
            if model.config.mask_threshold == 0.45 else m

    monkeypatch.setattr(ft, "score", score)
    recipe = ft.Recipe(patience=0, lab_scale=False, choose_mask_threshold=choose)
    table = ft.finetune(corrections, tiny_checkpoint, 0.02, tmp_path / "out", threads=2, recipe=recipe)
    tuned, info = load_checkpoint(table["model"])
    chosen = 0.45 if choose else own
    assert table["mask_threshold"] == [own, chosen] and tuned.config.mask_threshold == chosen
    assert sorted(seen) == (sorted({*ft.MASK_THRESHOLDS, own}) if choose else [])  # one pass each, or none
    if choose:  # the table is the chosen threshold's, and says which it is
        assert table["after"]["f1"] >= 0.2 and f"mask threshold {chosen:g}" in info.notes
    assert f"/ {chosen:g}" in ft.format_table(table) and f"/ {chosen:g}" in table_text(table)


def test_a_tie_keeps_the_models_own_mask_threshold(monkeypatch):
    import src_train.finetune as ft
    from conftest import tiny_config
    from napari_bach.model import build_model

    monkeypatch.setattr(ft, "score", lambda model, held: {"f1": 0.5, "aji": 0.4, "pq": 0.3})
    chosen, scores = ft.choose_mask_threshold(build_model(tiny_config(mask_threshold=0.55)), [])
    assert chosen == 0.55 and set(scores) == set(ft.MASK_THRESHOLDS)


@pytest.mark.parametrize("keep", ["last", "best"])
def test_the_final_weights_are_kept_when_better_than_the_start_or_the_best_check_when_asked(
        tmp_path, corrections, tiny_checkpoint, monkeypatch, keep):
    import src_train.finetune as ft
    from napari_bach.checkpoint import load_checkpoint

    calls = []

    def candidates(model, held, thresholds):  # the start 0.5, the first check 0.9, later checks 0.6
        calls.append(len(calls))
        pq = 0.5 if len(calls) == 1 else 0.9 if len(calls) == 2 else 0.6
        return {t: {"f1": pq, "aji": pq, "pq": pq, "dice": pq, "precision": pq, "recall": pq} for t in thresholds}

    monkeypatch.setattr(ft, "candidates", candidates)
    recipe = ft.Recipe(keep=keep, check_every=1, lab_scale=False, choose_mask_threshold=False)
    table = ft.finetune(corrections, tiny_checkpoint, 0.1, tmp_path / "out", threads=2, recipe=recipe)
    assert table["steps"] >= 2 and table["better"] is True
    if keep == "last":  # nothing uses checks on the way: the start, then the final weights alone
        assert len(calls) == 2 and (table["chosen_step"], table["after"]["pq"]) == (table["steps"], 0.9)
    else:  # the start, then every step; the best check is kept
        assert len(calls) == table["steps"] + 1 and (table["chosen_step"], table["after"]["pq"]) == (1, 0.9)
    _, info = load_checkpoint(table["model"])
    assert f"weights of step {table['chosen_step']} of {table['steps']}" in info.notes
    with pytest.raises(ft.FinetuneError, match="keep must be one of"):
        ft.Recipe(keep="first")


def test_a_run_whose_final_weights_are_not_better_keeps_the_starting_ones(tmp_path, corrections, tiny_checkpoint,
                                                                         monkeypatch):
    """The default (final weights): a lucky early check (a caller's on_check makes them) does not
    count, the final weights are not better."""
    import torch

    import src_train.finetune as ft
    from napari_bach.checkpoint import load_checkpoint

    calls = []

    def candidates(model, held, thresholds):  # the start 0.5; every check 0.4, but for a lucky first one
        calls.append(len(calls))
        pq = 0.5 if len(calls) == 1 else 0.55 if len(calls) == 2 else 0.4
        return {t: {"f1": pq, "aji": pq, "pq": pq, "dice": pq, "precision": pq, "recall": pq} for t in thresholds}

    monkeypatch.setattr(ft, "candidates", candidates)
    recipe = ft.Recipe(check_every=1, lab_scale=False)
    assert recipe.keep == "last" and not recipe.choose_mask_threshold  # the defaults
    table = ft.finetune(corrections, tiny_checkpoint, 0.1, tmp_path / "out", threads=2, recipe=recipe,
                        on_check=lambda model, step: None)
    assert len(calls) == table["steps"] + 1 and table["chosen_step"] == 0 and table["better"] is False and table["after"]["pq"] == 0.5
    start, _ = load_checkpoint(tiny_checkpoint)
    tuned, info = load_checkpoint(table["model"])
    for (name, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3), name  # the starting weights (saved in fp16)
    assert "NOT better" in info.notes and "NOT better" in ft.verdict(table)
