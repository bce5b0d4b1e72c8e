"""The plugin in a real viewer: reader, sample, Segment nuclei widget (run, refilter,
re-run, cancel, empty image, closed viewer, bad checkpoint)."""
import numpy as np
import pytest
import tifffile

from napari_bach._qt.segment_widget import SegmentWidget
from napari_bach.synthetic import synthetic_he

PLUGIN = "napari-bach"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def _widget(viewer, checkpoint, score=0.05, tissue_model=None):
    w = SegmentWidget(viewer)
    w.tissue_model = tissue_model  # the shipped classifier only where a test asks for one
    viewer.window.add_dock_widget(w)
    w.model.use_file(checkpoint)
    w._score.value = score
    return w


def _run_and_wait(qtbot, w, timeout=120_000):
    """Start a run and wait for the widget's own finished handler (connected before the
    worker starts, so a run that ends at once cannot be missed)."""
    w.run()
    assert w.worker is not None
    qtbot.waitUntil(lambda: w.worker is None, timeout=timeout)


def _slide(qtbot, slider, value):
    """Move a slider as a user would: the widget re-filters once Qt is idle."""
    slider.value = value
    qtbot.wait(1)


def _result_layers(viewer):
    return [l for l in viewer.layers if "napari_bach" in (l.metadata or {})]


@pytest.mark.parametrize("name", ["Segment nuclei", "RPN anchors & proposals", "Correct, export & report"])
def test_each_widget_opens_from_the_plugins_menu(viewer, name):
    """napari builds the dock widget itself and injects the viewer by annotation."""
    viewer.open_sample(PLUGIN, "synthetic_he")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    assert widget._viewer.layers[0].name == "synthetic H&E"
    assert widget._image.value is viewer.layers[0]


def test_torch_loads_after_the_opengl_canvas():
    """napari opens its canvas before a plugin widget imports torch; on software OpenGL
    (Mesa's LLVM) torch's triton import used to segfault there."""
    import subprocess
    import sys
    code = ("import napari; v = napari.Viewer(show=False); v.add_image(__import__('numpy').zeros((8, 8)));"
            "import napari_bach._qt.segment_widget, napari_bach.model, torch;"
            "from napari_bach.config import ModelConfig; m = napari_bach.model.build_model(ModelConfig()).eval();"
            "print(len(m([torch.rand(3, 64, 64)])[0]['boxes']) >= 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("True"), out.stderr[-2000:]


def test_choosing_a_model_starts_from_its_own_thresholds(viewer, tmp_path):
    from conftest import tiny_config
    from napari_bach.checkpoint import ModelInfo, save_checkpoint
    from napari_bach.model import build_model
    path = save_checkpoint(tmp_path / "tuned.pt", build_model(tiny_config(default_score_threshold=0.35,
                                                                          default_nms_iou=0.4)), ModelInfo())
    w = SegmentWidget(viewer)
    w.model.use_file(path)
    assert (w._score.value, w._nms.value) == pytest.approx((0.35, 0.4))
    w._score.value = 0.6  # the user's choice stands until another model is chosen
    assert w._score.value == pytest.approx(0.6)


def test_sample_data_opens_scaled_in_microns(viewer):
    layers = viewer.open_sample(PLUGIN, "synthetic_he")
    (layer,) = layers
    assert layer.rgb and layer.data.dtype == np.uint8 and layer.data.shape[-1] == 3
    assert layer.scale[-1] == pytest.approx(0.42) and str(layer.units[-1]) == "micrometer"


def test_reader_opens_bach_file_with_class_and_rejects_corrupt_file(viewer, tmp_path):
    rgb, _ = synthetic_he((64, 80), seed=2)
    good = tmp_path / "iv007.tif"
    tifffile.imwrite(good, rgb)
    (layer,) = viewer.open(str(good), plugin=PLUGIN)
    assert layer.metadata["tissue_class"] == "Invasive" and layer.metadata["mpp"] == 0.42
    np.testing.assert_array_equal(layer.data, rgb)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    assert viewer.open(str(bad), plugin=PLUGIN) == []  # an error notification, no layer, no crash
    assert len(viewer.layers) == 1


def test_run_shows_layers_refilters_live_and_rerun_replaces(viewer, qtbot, tiny_checkpoint):
    rgb, _ = synthetic_he((200, 240), seed=3)
    viewer.add_image(rgb, name="he", rgb=True, metadata={"mpp": 0.42, "tissue_class": "Benign"})
    w = _widget(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, w)
    labels, boxes = viewer.layers["he nuclei"], viewer.layers["he boxes"]
    ids = np.unique(labels.data)[1:]
    n = len(ids)
    assert n > 0 and labels.data.shape == (200, 240)
    assert len(boxes.data) == n and sorted(boxes.features["index"]) == list(ids)
    table = labels.features
    assert {"index", "score", "area_um2", "perimeter_um", "eccentricity", "mean_hematoxylin"} <= set(table.columns)
    assert len(table) == n and (table["area_um2"] > 0).all()
    assert labels.metadata["tissue_probs"] is None and "not trained" in w._tissue.value
    assert "File name says: Benign" in w._tissue.value
    assert "UNTRAINED" in labels.metadata["model"]

    # a stricter threshold re-filters the cached detections: fewer nuclei, no new run
    det = w.result.det
    _slide(qtbot, w._score, float(np.quantile(det.scores, 0.9)))
    assert w.worker is None and w.result.det is det
    w.measure()  # boxes and the table follow when the slider rests
    shown = np.unique(viewer.layers["he nuclei"].data)[1:]
    assert 0 < len(shown) < n and set(shown) <= set(ids)  # each nucleus keeps its id (and colour)
    assert len(viewer.layers["he boxes"].data) == len(shown)
    assert set(viewer.layers["he boxes"].shape_type) == {"rectangle"}

    _run_and_wait(qtbot, w)
    assert [l.name for l in viewer.layers] == ["he", "he nuclei", "he boxes"]  # replaced, not stacked


def test_cancel_stops_between_tiles_and_keeps_the_viewer_usable(viewer, qtbot, tiny_checkpoint):
    rgb, _ = synthetic_he((900, 900), seed=4)  # 64 tiles of 128 px for the tiny model
    viewer.add_image(rgb, name="big", rgb=True)
    w = _widget(viewer, tiny_checkpoint)
    w.run()
    qtbot.waitUntil(lambda: w._progress.value >= 1, timeout=60_000)
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    assert "Cancelled" in w._status.value
    assert _result_layers(viewer) == [] and w._run.enabled and not w._cancel.enabled


def test_blank_image_gives_empty_layers_without_errors(viewer, qtbot, tiny_checkpoint):
    viewer.add_image(np.full((100, 120, 3), 250, np.uint8), name="glass", rgb=True)
    w = _widget(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, w)
    assert viewer.layers["glass nuclei"].data.max() == 0 and len(viewer.layers["glass boxes"].data) == 0
    assert w._status.value.startswith("0 nuclei")


def test_bad_checkpoint_reports_instead_of_crashing(viewer, qtbot, tmp_path):
    viewer.add_image(np.zeros((50, 50, 3), np.uint8), name="img", rgb=True)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    w = _widget(viewer, bad)
    _run_and_wait(qtbot, w)
    assert "Failed" in w._status.value and "not a PyTorch checkpoint" in w._status.value
    assert _result_layers(viewer) == []
    w.model.use_file(tmp_path / "nowhere.pt")
    w.run()
    assert w.worker is None and "not found" in w._status.value


def test_closing_the_viewer_during_a_run_is_harmless(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_he((600, 600), seed=5)[0], name="he", rgb=True)
    w = _widget(viewer, tiny_checkpoint)
    w.run()
    worker = w.worker
    with qtbot.waitSignal(worker.finished, timeout=120_000):
        viewer.close()
    assert w.task.closed


def test_edits_survive_the_sliders(viewer, qtbot, tiny_checkpoint):
    """Delete 3 nuclei, paint 1, move the score slider 0.30 -> 0.31: edits used to vanish."""
    rgb, _ = synthetic_he((200, 240), seed=3)
    viewer.add_image(rgb, name="he", rgb=True, metadata={"mpp": 0.42})
    w = _widget(viewer, tiny_checkpoint, score=0.30)
    _run_and_wait(qtbot, w)
    _slide(qtbot, w._score, 0.05)  # under the cached floor (0.15): the rest is computed first
    qtbot.waitUntil(lambda: w.worker is None and w.result.det.score_floor <= 0.05, timeout=120_000)
    layer = viewer.layers["he nuclei"]
    ids = [int(i) for i in np.unique(layer.data)[1:4]]
    data = layer.data
    for i in ids:
        data[data == i] = 0  # deleted by hand (Correct widget or the eraser)
    new = int(layer.metadata["first_free_id"])
    data[2:12, 2:12] = new  # painted by hand
    layer.data = data
    for value in (0.30, 0.31, 0.05):
        _slide(qtbot, w._score, value)
        now = viewer.layers["he nuclei"].data
        assert not set(ids) & set(np.unique(now).tolist()), value
        assert (now[2:12, 2:12] == new).all(), value
    w.measure()
    table = viewer.layers["he nuclei"].features
    assert new in set(table["index"]) and np.isnan(table.set_index("index").loc[new, "score"])
    assert "with your edits" in w._status.value
    _run_and_wait(qtbot, w)  # a re-run keeps what was drawn and deleted by hand
    again = np.array(viewer.layers["he nuclei"].data)
    assert (again[2:12, 2:12] > 0).all() and "edits of the last run were kept" in w._status.value
    # the same model finds the same candidates (same ids) again: the deleted ones stay deleted
    assert not set(ids) & set(np.unique(again).tolist())


def test_image_opened_by_another_reader_keeps_its_scale_and_class(viewer, tmp_path):
    """File > Open with napari's builtin reader lost µm/px and the BACH class."""
    path = tmp_path / "b003.png"
    from PIL import Image
    Image.fromarray(synthetic_he((64, 80), seed=2)[0]).save(path)
    viewer.open(str(path), plugin="napari")
    w = SegmentWidget(viewer)
    assert w._mpp.value == pytest.approx(0.42) and w.pixel_size().source == "BACH file name"
    assert "0.42 µm/px (BACH file name)" in w._status.value
    from napari_bach._qt.common import layer_tissue_class
    assert layer_tissue_class(viewer.layers[0]) == "Benign"


def test_model_rows_line_up_and_two_docks_fit_a_small_screen(viewer):
    """The Model row sat in a nested form, out of line; Segment and Correct docks together
    overflowed a 1000 px screen."""
    viewer.open_sample(PLUGIN, "synthetic_he")
    _, seg = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment nuclei")
    _, cur = viewer.window.add_plugin_dock_widget(PLUGIN, "Correct, export & report")
    assert seg.model.choice in list(seg) and seg.model.file in list(seg)  # rows of the one form
    heights = [w.native.minimumSizeHint().height() for w in (seg, cur)]
    assert sum(heights) <= 800, heights  # 200 px left for menus, dock titles and status lines


def test_a_failed_run_resets_progress_and_a_new_run_clears_the_status(viewer, qtbot, tiny_checkpoint, tmp_path):
    viewer.add_image(np.full((60, 60, 3), 120, np.uint8), name="img", rgb=True, metadata={"mpp": 0.42})
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    w = _widget(viewer, bad)
    _run_and_wait(qtbot, w)
    assert "Failed" in w._status.value
    w.model.use_file(tiny_checkpoint)
    w.run()
    assert w._status.value == "Starting…" and w._progress.value == 0
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    assert "Failed" not in w._status.value and "nuclei" in w._status.value


def test_outlines_boxes_minimum_area_view_and_counts_as_peers_show_them(viewer, qtbot, tiny_checkpoint):
    """Issue 14.4, 14.5, 14.9 and 14.12: nuclei as outlines with boxes hidden (a checkbox
    shows them), fragments under the model's minimum area dropped (in µm², or px when the
    µm/px is unknown), the camera kept on the image when it changes to µm, and the Correct
    dock's count following the sliders."""
    from napari_bach._qt.curate_widget import CurateWidget

    rgb, _ = synthetic_he((200, 240), seed=3)
    viewer.add_image(rgb, name="he", rgb=True)
    w = _widget(viewer, tiny_checkpoint)
    assert w._min_area.value == 3.0  # the model's own default, in µm²
    w._mpp.value = 0.42  # typed: the image switches from pixels to µm
    _run_and_wait(qtbot, w)
    labels, boxes = viewer.layers["he nuclei"], viewer.layers["he boxes"]
    assert labels.contour == 1 and not boxes.visible
    w._show_boxes.value = True
    assert boxes.visible
    w._outlines.value = False
    assert labels.contour == 0
    # the camera followed the image into µm (it used to stay on pixel coordinates)
    assert viewer.camera.center[-2:] == pytest.approx((100 * 0.42, 120 * 0.42), abs=2)
    areas = {i: a for i, a in zip(labels.features["index"], labels.features["area_px"])}
    assert min(areas.values()) >= 3.0 / 0.42**2  # no fragment below 3 µm²
    cur = CurateWidget(viewer)
    viewer.window.add_dock_widget(cur)
    n = len(labels.features)
    assert f"{n} nuclei" in cur._status.value and f"{n} nuclei" in w._status.value
    w._min_area.value = 60.0
    qtbot.wait(5)
    shown = np.unique(labels.data)[1:]
    assert len(shown) < n and all(areas[i] >= 60 / 0.42**2 for i in shown)
    w.measure()
    assert f"{len(shown)} nuclei" in cur._status.value and f"{len(shown)} nuclei" in w._status.value

    # unknown µm/px: the minimum is in pixels, at the model's own scale
    viewer.add_image(rgb, name="plain", rgb=True)
    w._image.value = viewer.layers["plain"]
    assert "drawn in pixels beside he" in w._status.value  # issue 14.5: napari's "inconsistent units", explained
    w._min_area.value = 3.0
    _run_and_wait(qtbot, w)
    model_mpp = w.result.model_mpp  # 0.4 for the tiny model
    assert w._area_row.label == "Min area px" and w._min_area.value == pytest.approx(3.0 / model_mpp**2, abs=0.1)


def test_candidates_below_the_slider_are_computed_when_the_slider_reaches_them(viewer, qtbot, tiny_checkpoint):
    """Issue 15.1: a run computes candidates (and their masks) only from a margin below the
    score threshold; moving the slider under that floor computes the rest, keeping edits."""
    from napari_bach.config import CANDIDATE_MARGIN as FLOOR_MARGIN

    rgb, _ = synthetic_he((200, 240), seed=3)
    viewer.add_image(rgb, name="he", rgb=True, metadata={"mpp": 0.42})
    w = _widget(viewer, tiny_checkpoint, score=0.4)
    _run_and_wait(qtbot, w)
    det = w.result.det
    assert det.score_floor == pytest.approx(0.4 - FLOOR_MARGIN) and det.scores.min() >= det.score_floor
    labels = viewer.layers["he nuclei"]
    drawn = int(labels.data.max()) + 1000
    labels.data[:6, :6] = drawn  # a hand-drawn nucleus
    _slide(qtbot, w._score, 0.3)  # still above the floor: no run
    assert w.worker is None and w.result.det is det
    w._score.value = 0.1  # below it: the rest is computed
    qtbot.waitUntil(lambda: w.worker is None and w.result.det is not det, timeout=120_000)
    assert w.result.det.score_floor <= 0.1 and len(w.result.det) >= len(det)
    assert (viewer.layers["he nuclei"].data[:6, :6] > 0).all()  # the edit survived the re-run


def test_slider_writes_each_changed_nucleus_as_a_small_redraw_in_one_undo_step(viewer):
    """Outlines are recomputed over the box of each write: scattered nuclei are written one
    by one (small boxes), and the whole change is still one undo step."""
    from napari_bach._qt.layers import write_changed_nuclei

    before = np.zeros((400, 500), np.int32)
    before[10:20, 10:20] = 1
    before[300:320, 400:420] = 2
    layer = viewer.add_labels(before.copy())
    layer.contour = 1
    after = before.copy()
    after[10:20, 10:20] = 0  # nucleus 1 hidden, 3 shown far away, 2 unchanged
    after[350:360, 30:45] = 3
    boxes = []
    layer.events.labels_update.connect(lambda e: boxes.append(e.data.shape[:2]))
    assert write_changed_nuclei(layer, after) == 2
    np.testing.assert_array_equal(layer.data, after)
    assert boxes and max(h * w for h, w in boxes) < 0.01 * after.size  # never the whole image
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)
    assert write_changed_nuclei(layer, before) == 0


def test_tissue_class_map_and_colour_warning_are_shown(viewer, qtbot, tmp_path, random_tissue_model):
    from src_train.stress import STRESS

    from napari_bach.checkpoint import ModelInfo, save_checkpoint
    from napari_bach.model import build_model

    from conftest import tiny_config

    tissue = random_tissue_model
    nuclei = save_checkpoint(tmp_path / "coarse.pt", build_model(tiny_config(mpp=2.0)), ModelInfo(name="coarse"))
    rgb, _ = synthetic_he((700, 900), mpp=2.0, seed=4)  # 1.4 × 1.8 mm: larger than one BACH field
    viewer.add_image(STRESS["maroon-lavender"](rgb), name="big", rgb=True, metadata={"mpp": 2.0})
    w = _widget(viewer, nuclei, tissue_model=tissue)
    _run_and_wait(qtbot, w)
    probs = viewer.layers["big nuclei"].metadata["tissue_probs"]
    assert set(probs) == {"Normal", "Benign", "InSitu", "Invasive"} and abs(sum(probs.values()) - 1) < 1e-4
    assert "Tissue class:" in w._tissue.value and "not trained" not in w._tissue.value
    tmap = viewer.layers["big tissue map"]
    assert len(tmap.data) > 1 and {"tissue_class", "p_Invasive"} <= set(tmap.features.columns)
    assert tuple(tmap.scale) == (2.0, 2.0)
    assert "WARNING: colours unlike" in w._status.value and "tissue class trained (test tissue" in w._status.value
    meta = viewer.layers["big nuclei"].metadata["model"]  # what the report prints: no "not trained" beside a class
    assert "tissue class trained (test tissue" in meta and "not trained" not in meta
    _run_and_wait(qtbot, w)
    assert [l.name for l in viewer.layers].count("big tissue map") == 1  # replaced on re-run


def test_results_follow_a_rerun_at_another_pixel_size(viewer, qtbot, tiny_checkpoint):
    """Issue 28.1: re-run at another µm/px moved the image but left the outlines at the old scale."""
    rgb, _ = synthetic_he((200, 240), seed=3)
    viewer.add_image(rgb, name="he", rgb=True, metadata={"mpp": 0.25})
    w = _widget(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, w)
    assert tuple(viewer.layers["he nuclei"].scale) == (0.25, 0.25)
    w._mpp.value = 0.467
    _run_and_wait(qtbot, w)
    for name in ("he", "he nuclei", "he boxes"):
        assert tuple(viewer.layers[name].scale) == pytest.approx((0.467, 0.467)), name


def test_cancel_keeps_the_count_and_the_pixel_size_of_the_results_shown(viewer, qtbot, tiny_checkpoint):
    """Issue 28.15: after Cancel the status lost the count, and the µm/px box kept the
    cancelled run's value while the layers were at the earlier one."""
    rgb, _ = synthetic_he((900, 900), seed=4)
    viewer.add_image(rgb, name="big", rgb=True, metadata={"mpp": 0.42})
    w = _widget(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, w)
    n = len(w.result.seg.ids)
    w._mpp.value = 0.3
    w.run()
    qtbot.waitUntil(lambda: w._progress.value >= 1, timeout=60_000)
    w.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    assert "Cancelled" in w._status.value and f"{n} nuclei" in w._status.value
    assert w._mpp.value == pytest.approx(0.42)


def test_the_count_follows_edits_made_in_another_dock(viewer, qtbot, tiny_checkpoint):
    """Issue 28.16: the Segment nuclei count went stale after edits in Correct, export & report."""
    rgb, _ = synthetic_he((200, 240), seed=3)
    viewer.add_image(rgb, name="he", rgb=True, metadata={"mpp": 0.42})
    w = _widget(viewer, tiny_checkpoint)
    _run_and_wait(qtbot, w)
    layer = viewer.layers["he nuclei"]
    data = np.array(layer.data)
    gone = np.unique(data)[1:3]
    data[np.isin(data, gone)] = 0
    layer.data = data  # as Correct, export & report writes its edits
    left = len(np.unique(data)) - 1
    qtbot.waitUntil(lambda: w._status.value.startswith(f"{left} nuclei"), timeout=5_000)


def test_three_docks_fit_a_1000_px_screen_and_scroll(make_napari_viewer, qtbot):
    """With Segment nuclei, Correct, export & report and Fine-tune open, the window grew
    past a 1000 px screen and cut off the status lines: each dock now scrolls instead."""
    from qtpy.QtWidgets import QScrollArea

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    docks = [viewer.window.add_plugin_dock_widget("napari-bach", name)[1]
             for name in ("Segment nuclei", "Correct, export & report", "Fine-tune on corrections")]
    qtbot.wait(200)
    assert window.height() <= 1000
    for dock in docks:
        area = dock.native.findChild(QScrollArea)
        assert area is not None and area.height() > 60  # each keeps a usable share
        area.verticalScrollBar().setValue(area.verticalScrollBar().maximum())
    status = docks[2]._status.native
    qtbot.wait(50)
    area = docks[2].native.findChild(QScrollArea)
    top = status.mapTo(area.viewport(), status.rect().topLeft()).y()
    assert 0 <= top < area.viewport().height()  # the bottom rows are reachable by scrolling
