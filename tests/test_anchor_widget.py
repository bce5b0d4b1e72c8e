"""RPN anchors & proposals widget in a real viewer."""
import numpy as np
import pytest

from napari_bach._qt.anchor_widget import AnchorWidget, parse_ratios, parse_sizes
from napari_bach._qt.common import SHAPES
from napari_bach.synthetic import synthetic_he


def _setup(make_napari_viewer, checkpoint, shape=(240, 320)):
    viewer = make_napari_viewer()
    rgb, labels = synthetic_he(shape, seed=8)
    viewer.add_image(rgb, name="he", rgb=True, scale=(0.42, 0.42), metadata={"mpp": 0.42})
    viewer.add_labels(labels, name="truth", scale=(0.42, 0.42))
    w = AnchorWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.model.use_file(checkpoint)
    w._image.value = viewer.layers["he"]
    return viewer, w, labels


def _wait(qtbot, w):
    assert w.worker is not None  # anchors run in a worker: napari stays responsive
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)


def test_parsing_of_sizes_and_ratios():
    assert parse_sizes("8,11 16,23") == ((8.0, 11.0), (16.0, 23.0)) and parse_sizes(" ") is None
    assert parse_ratios("0.5, 1 2") == (0.5, 1.0, 2.0)
    with pytest.raises(ValueError, match="not a list of numbers"):
        parse_sizes("8,x 16")


def test_anchors_in_the_view_coloured_by_training_label(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer, w, labels = _setup(make_napari_viewer, tiny_checkpoint)
    viewer.reset_view()
    w._nuclei.value = viewer.layers["truth"]
    w._levels.value = ["P2"]
    w._cap.value = 500
    w.show_anchors()
    _wait(qtbot, w)
    assert w._progress.value == w._progress.max  # progress reached the end
    layer = viewer.layers["anchors"]
    assert set(layer.shape_type) == {"rectangle"} and set(layer.features["level"]) == {"P2"}
    assert set(layer.features["label"]) <= {"positive", "negative", "ignored"}
    assert "positive" in set(layer.features["label"])
    assert len(layer.data) == 500 and "drawing 500" in w._status.value and "positive" in w._status.value
    w.show_anchors()  # again: replaced, not stacked
    _wait(qtbot, w)
    assert [l.name for l in viewer.layers].count("anchors") == 1


def test_anchors_in_a_drawn_box_without_nuclei(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer, w, _ = _setup(make_napari_viewer, tiny_checkpoint)
    box = np.array([[10, 10], [10, 40], [40, 40], [40, 10]]) * 0.42  # world units (µm)
    viewer.add_shapes([box], shape_type="rectangle", name="roi")
    w._region.value = SHAPES
    w._region_layer.value = viewer.layers["roi"]
    w._levels.value = ["P2", "P3"]
    w.show_anchors()
    _wait(qtbot, w)
    layer = viewer.layers["anchors"]
    corners = np.stack(layer.data)  # in data pixels of the image
    centres = corners.mean(1)
    assert len(layer.data) > 0 and set(layer.features["label"]) == {"unlabelled"}
    assert (centres >= 10 - 1).all() and (centres <= 40 + 1).all()
    assert "choose a Nuclei labels layer" in w._status.value


def test_proposals_before_and_after_nms_through_the_worker(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer, w, _ = _setup(make_napari_viewer, tiny_checkpoint)
    viewer.reset_view()
    w._k.value = 40
    w._nms.value = 0.5
    w.show_proposals()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    before, after = viewer.layers["proposals before NMS"], viewer.layers["proposals after NMS"]
    assert len(before.data) == 40 and 0 < len(after.data) <= 40
    assert "objectness" in before.features and (np.diff(before.features["objectness"]) <= 0).all()
    # issue 14.11: "top 40 before NMS, 40 after" read as if NMS removed nothing
    import re

    status = w._status.value
    kept, total = (int(n.replace(",", "")) for n in re.search(r"kept ([\d,]+) of the ([\d,]+)", status).groups())
    assert len(after.data) <= kept < total
    assert "the 40 best before NMS (magenta)" in status and before.edge_color[0].tolist() != [1, 1, 0, 1]


def test_errors_are_reported_in_the_widget(make_napari_viewer, tiny_checkpoint, tmp_path):
    viewer, w, _ = _setup(make_napari_viewer, tiny_checkpoint)
    w._region.value = SHAPES
    w.show_anchors()
    assert "draw a box" in w._status.value
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"x")
    w.model.use_file(bad)
    w.show_anchors()
    assert "not a PyTorch checkpoint" in w._status.value and w.worker is None


@pytest.mark.parametrize("sizes, ratios, message", [
    ("8,11 16", "", "one group per FPN level"),  # 2 levels, not 5: was torchvision's AssertionError
    ("", "0", "aspect ratios must be positive"),  # drew nothing, silently
    ("", "-1 1", "aspect ratios must be positive"),
    ("8 16 32 64 -128", "", "anchor sizes must be positive"),
])
def test_impossible_anchor_settings_say_why(make_napari_viewer, tiny_checkpoint, sizes, ratios, message):
    viewer, w, _ = _setup(make_napari_viewer, tiny_checkpoint)
    w._sizes.value, w._ratios.value = sizes, ratios
    w.show_anchors()
    assert w.worker is None and message in w._status.value and "anchors" not in viewer.layers


def test_cancel_stops_anchors_on_a_large_view(make_napari_viewer, qtbot, tiny_checkpoint):
    """All FPN levels on a 1000×1000 view froze napari for a minute; now it is a worker."""
    viewer, w, _ = _setup(make_napari_viewer, tiny_checkpoint, shape=(1000, 1000))
    viewer.reset_view()
    w._nuclei.value = viewer.layers["truth"]
    w._levels.value = ["P2", "P3", "P4", "P5", "P6"]
    w.show_anchors()
    assert w.worker is not None and not w._show_anchors.enabled and w._cancel.enabled
    w.task.cancel()
    qtbot.waitUntil(lambda: w.worker is None, timeout=120_000)
    assert "Cancelled" in w._status.value and "anchors" not in viewer.layers and w._show_anchors.enabled


def test_a_view_with_too_many_anchors_shows_its_centre_and_says_so(make_napari_viewer, qtbot, tiny_checkpoint,
                                                                   monkeypatch):
    """A whole BACH image on P2 with five sizes took napari past 19 GB: the work is capped."""
    import napari_bach.anchors as anchors

    monkeypatch.setattr(anchors, "MAX_ANCHORS", 400_000)
    viewer, w, _ = _setup(make_napari_viewer, tiny_checkpoint, shape=(1000, 1200))
    viewer.reset_view()
    w._nuclei.value = viewer.layers["truth"]
    w._levels.value = ["P2"]
    w._sizes.value = "8,11,16,23,32 16,23 32,45 64,91 128,181"
    w.show_anchors()
    _wait(qtbot, w)
    assert "only its centre" in w._status.value and "400,000" in w._status.value
    centres = (viewer.layers["anchors"].data[0][0] + viewer.layers["anchors"].data[0][2]) / 2
    assert len(viewer.layers["anchors"].data) > 0 and np.isfinite(centres).all()
