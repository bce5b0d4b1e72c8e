"""Correct masks, export training labels, figures and reports (issue: correct & export)."""
import numpy as np
import pytest
from PIL import Image

from napari_bach._qt.curate_widget import VIEW, CurateWidget
from napari_bach._qt.segment_widget import SegmentWidget
from napari_bach._qt.writer import write_training_sample
from napari_bach.edit import delete_label, next_free_label, relabel_consecutive, remove_small, segmentation_from_labels
from napari_bach.report import report_numbers
from napari_bach.synthetic import synthetic_he
from src_train.datasets import load_exported


def test_edit_helpers():
    labels = np.zeros((10, 10), np.int32)
    labels[0:3, 0:3], labels[5:6, 5:6], labels[7:10, 7:10] = 2, 5, 9
    assert next_free_label(labels) == 10
    assert remove_small(labels, 4) == [5] and 5 not in labels
    assert delete_label(labels, 9) == 9 and labels.max() == 2
    labels[7:10, 7:10] = 7
    assert relabel_consecutive(labels) == {2: 1, 7: 2} and set(np.unique(labels)) == {0, 1, 2}
    seg = segmentation_from_labels(labels, {1: 0.9})
    assert list(seg.ids) == [1, 2] and seg.scores[0] == pytest.approx(0.9) and np.isnan(seg.scores[1])
    np.testing.assert_array_equal(seg.boxes, [[0, 0, 3, 3], [7, 7, 10, 10]])
    with pytest.raises(ValueError):
        delete_label(labels, 0)


def test_report_numbers_by_hand():
    rgb = np.full((100, 200, 3), 255, np.uint8)
    rgb[:, :50] = 120  # a quarter of the image is tissue
    table = {"index": np.array([1, 2, 3]), "area_um2": np.array([10.0, 20.0, 30.0])}
    n = report_numbers(rgb, table, 0.5, {"Normal": 0.1, "Benign": 0.6, "InSitu": 0.2, "Invasive": 0.1})
    assert n["image_area_mm2"] == pytest.approx(100 * 200 * 0.25e-6)
    assert n["tissue_area_mm2"] == pytest.approx(100 * 50 * 0.25e-6)
    assert n["density_per_tissue_mm2"] == pytest.approx(3 / (100 * 50 * 0.25e-6))
    assert n["area_mean"] == 20 and n["area_median"] == 20 and n["area_unit"] == "µm²" and n["tissue_class"] == "Benign"
    assert report_numbers(rgb, table, 0.5, None)["tissue_class"] == "not trained"


@pytest.fixture
def segmented(make_napari_viewer, qtbot, tiny_checkpoint):
    viewer = make_napari_viewer()
    rgb, _ = synthetic_he((180, 220), seed=11)
    viewer.add_image(rgb, name="b007", rgb=True, scale=(0.42, 0.42), metadata={"mpp": 0.42, "tissue_class": "Benign"})
    seg = SegmentWidget(viewer)
    seg.tissue_model = None  # no tissue classifier: the report says "not trained"
    viewer.window.add_dock_widget(seg)
    seg.model.use_file(tiny_checkpoint)
    seg._score.value = 0.05
    seg.run()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=120_000)
    cur = CurateWidget(viewer)
    viewer.window.add_dock_widget(cur)
    cur._image.value = viewer.layers["b007"]
    cur._nuclei.value = viewer.layers["b007 nuclei"]
    return viewer, cur


def _in_sync(viewer):
    labels, boxes = viewer.layers["b007 nuclei"], viewer.layers["b007 boxes"]
    ids = sorted(set(np.unique(labels.data)) - {0})
    return list(labels.features["index"]) == ids == sorted(boxes.features["index"]) and len(boxes.data) == len(ids)


def test_edit_then_export_round_trips_into_src_train(segmented, tmp_path):
    viewer, cur = segmented
    nuclei = viewer.layers["b007 nuclei"]
    n0 = nuclei.data.max()
    nuclei.selected_label = 1
    cur.delete_selected()
    assert 1 not in nuclei.data and _in_sync(viewer)
    cur.paint_new()
    new = max(n0 + 1, nuclei.metadata["first_free_id"])  # never the id of a model candidate
    assert nuclei.selected_label == new and nuclei.mode == "paint"
    data = nuclei.data.copy()
    data[5:15, 5:15] = new  # a hand-painted nucleus
    nuclei.data = data
    cur.sync()
    assert _in_sync(viewer) and np.isnan(nuclei.features["score"].iloc[-1])
    cur._min_area.value = 5.0
    cur.remove_small()
    cur.relabel()
    assert _in_sync(viewer) and list(nuclei.features["index"]) == list(range(1, nuclei.data.max() + 1))

    cur._tissue.value = "InSitu"  # the pathologist's correction
    cur._dataset.value = str(tmp_path / "dataset")
    cur._on_exists.value = "version"
    folder = cur.export()
    (sample,) = load_exported(tmp_path / "dataset")
    np.testing.assert_array_equal(sample.labels, nuclei.data)
    np.testing.assert_array_equal(sample.image, viewer.layers["b007"].data)
    assert sample.tissue == 2 and sample.mpp == 0.42 and folder.name == "b007"
    assert cur.export().name == "b007_v2"  # never clobbered


def test_export_asks_and_cancel_writes_nothing(segmented, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    viewer, cur = segmented
    cur._dataset.value = str(tmp_path / "ds")
    cur.export()
    before = (tmp_path / "ds" / "b007" / "labels.tif").read_bytes()
    monkeypatch.setattr(QMessageBox, "exec", lambda self: 0)  # the user closes the question: cancel
    monkeypatch.setattr(QMessageBox, "clickedButton", lambda self: None)
    edited = np.array(viewer.layers["b007 nuclei"].data)
    edited[edited == edited.max()] = 0  # the user deleted a nucleus, then exports again under the same name
    viewer.layers["b007 nuclei"].data = edited
    assert cur.export() is None and "cancelled" in cur._status.value
    assert (tmp_path / "ds" / "b007" / "labels.tif").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["b007", "manifest.json"]


def test_invalid_labels_are_refused_by_the_widget(segmented, tmp_path):
    viewer, cur = segmented
    viewer.add_labels(np.zeros((10, 10), np.int32), name="wrong")
    cur._nuclei.value = viewer.layers["wrong"]
    cur._dataset.value = str(tmp_path / "ds")
    assert cur.export() is None and "does not match" in cur._status.value
    assert not (tmp_path / "ds").exists()


def test_figure_and_report_contain_what_the_widget_shows(segmented, tmp_path, monkeypatch):
    import napari_bach._qt.curate_widget as curate

    viewer, cur = segmented
    written = {}
    real_report = curate.write_report
    monkeypatch.setattr(curate, "write_report", lambda *a: written.setdefault("settings", a[-1]) and real_report(*a))
    cur._figure.value = str(tmp_path / "full.png")
    cur.save_figure()
    cur._figure_mode.value = VIEW
    cur._figure.value = str(tmp_path / "view.png")
    cur.save_figure()
    for name in ("full.png", "view.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert viewer.scale_bar.visible
    cur._report.value = str(tmp_path / "report.pdf")
    cur.save_report()
    n = cur.numbers["nuclei"]
    assert n == len(np.unique(viewer.layers["b007 nuclei"].data)) - 1 > 0
    assert f"{n} nuclei" in cur._status.value
    pdf = (tmp_path / "report.pdf").read_bytes()
    assert pdf.startswith(b"%PDF") and f"nuclei={n}".encode() in pdf and b"tissue_class=not trained" in pdf
    # the page names the minimum area the nuclei were kept at, in µm² and px (issue 28.22)
    assert "µm²" in written["settings"]["Minimum nucleus area"]
    rows = (tmp_path / "report_nuclei.csv").read_text().splitlines()
    assert len(rows) == n + 1 and rows[0].startswith("index,score,area_um2")
    import json

    features = json.loads((tmp_path / "report_nuclei.geojson").read_text())["features"]
    assert len(features) == n and "report_nuclei.geojson" in cur._status.value
    assert {f["properties"]["label"] for f in features} == set(np.unique(viewer.layers["b007 nuclei"].data)[1:].tolist())


def test_npe2_writer_exports_a_sample(tmp_path):
    rgb, labels = synthetic_he((60, 70), seed=2)
    paths = write_training_sample(str(tmp_path / "ds"), [
        (rgb, {"name": "n003", "metadata": {"mpp": 0.42, "tissue_class": "Normal"}}, "image"),
        (labels, {"name": "n003 nuclei", "metadata": {}}, "labels")])
    (sample,) = load_exported(tmp_path / "ds")
    assert paths == [str(tmp_path / "ds" / "n003")] and sample.tissue == 0
    np.testing.assert_array_equal(sample.labels, labels)
    with pytest.raises(ValueError, match="exactly one image"):
        write_training_sample(str(tmp_path / "ds"), [(rgb, {"name": "x"}, "image")])


def test_typed_pixel_size_reaches_edits_export_and_report(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    """An untagged image, 0.25 typed in Segment nuclei: Correct recomputed areas at 0.42,
    meta.json/manifest.json recorded 0.42 and the PDF said 0.42 µm/px (issue 9, item 1)."""
    import json

    viewer = make_napari_viewer()
    rgb, _ = synthetic_he((160, 200), seed=12)
    viewer.add_image(rgb, name="plain", rgb=True)
    seg = SegmentWidget(viewer)
    seg.tissue_model = None  # no tissue classifier: the report says "not trained"
    viewer.window.add_dock_widget(seg)
    assert seg._mpp.native.text() == "unknown" and seg.pixel_size().mpp is None  # no silent 0.42
    seg.model.use_file(tiny_checkpoint)
    seg._score.value = 0.05
    seg._mpp.value = 0.2527
    assert seg._mpp.value == pytest.approx(0.2527)  # 4 decimals, not 0.25
    seg._mpp.value = 0.25
    seg.run()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=120_000)
    image, nuclei = viewer.layers["plain"], viewer.layers["plain nuclei"]
    assert image.scale[-1] == pytest.approx(0.25) and nuclei.scale[-1] == pytest.approx(0.25)
    assert nuclei.metadata["mpp"] == 0.25 and nuclei.metadata["mpp_source"] == "given"
    table = nuclei.features
    np.testing.assert_allclose(table["area_um2"], table["area_px"] * 0.0625)

    cur = CurateWidget(viewer)
    viewer.window.add_dock_widget(cur)
    cur._image.value, cur._nuclei.value = image, nuclei
    nuclei.selected_label = int(nuclei.features["index"].iloc[0])
    cur.delete_selected()  # the first edit
    np.testing.assert_allclose(nuclei.features["area_um2"], nuclei.features["area_px"] * 0.0625)
    cur._dataset.value = str(tmp_path / "ds")
    folder = cur.export()
    assert json.loads((folder / "meta.json").read_text())["mpp"] == 0.25
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text())["samples"][0]["mpp"] == 0.25
    cur._report.value = str(tmp_path / "r.pdf")
    cur.save_report()
    assert cur.numbers["mpp"] == 0.25
    assert cur.numbers["image_area_mm2"] == pytest.approx(160 * 200 * 0.25**2 * 1e-6)


def test_unknown_pixel_size_measures_in_pixels_everywhere(make_napari_viewer, qtbot, tiny_checkpoint, tmp_path):
    viewer = make_napari_viewer()
    viewer.add_image(synthetic_he((120, 150), seed=13)[0], name="plain", rgb=True)
    seg = SegmentWidget(viewer)
    seg.tissue_model = None  # no tissue classifier: the report says "not trained"
    seg.model.use_file(tiny_checkpoint)
    seg._score.value = 0.05
    seg.run()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=120_000)
    assert "µm/px unknown" in seg._status.value
    nuclei = viewer.layers["plain nuclei"]
    assert nuclei.metadata["mpp"] is None and nuclei.features["area_um2"].isna().all()
    cur = CurateWidget(viewer)
    cur._image.value, cur._nuclei.value = viewer.layers["plain"], nuclei
    cur._report.value = str(tmp_path / "r.pdf")
    cur.save_report()
    assert cur.numbers["mpp"] is None and cur.numbers["area_unit"] == "px²" and "density_per_mm2" not in cur.numbers
    cur.remove_small()
    assert "µm/px unknown" in cur._status.value


def test_saving_into_a_missing_folder_is_a_message(segmented, tmp_path):
    viewer, cur = segmented
    cur._figure.value = str(tmp_path / "nowhere" / "f.png")
    assert cur.save_figure() is None and "does not exist" in cur._status.value
    cur._report.value = str(tmp_path / "nowhere" / "r.pdf")
    assert cur.save_report() is None and "does not exist" in cur._status.value
    assert not (tmp_path / "nowhere").exists()


def test_existing_report_files_are_replaced_only_when_the_user_says_so(segmented, tmp_path, monkeypatch):
    """Issue 28.6: the report overwrote an existing PDF/CSV/GeoJSON without asking."""
    from qtpy.QtWidgets import QMessageBox

    viewer, cur = segmented
    (tmp_path / "r_nuclei.csv").write_text("mine")
    cur._report.value = str(tmp_path / "r.pdf")
    monkeypatch.setattr(QMessageBox, "exec", lambda self: 0)
    monkeypatch.setattr(QMessageBox, "clickedButton", lambda self: None)  # the user cancels
    assert cur.save_report() is None and "you kept them" in cur._status.value
    assert (tmp_path / "r_nuclei.csv").read_text() == "mine" and not (tmp_path / "r.pdf").exists()
    monkeypatch.setattr(QMessageBox, "clickedButton", lambda self: next(b for b in self.buttons() if b.text() == "Replace"))
    assert cur.save_report() == tmp_path / "r.pdf" and (tmp_path / "r_nuclei.csv").read_text() != "mine"


def test_dock_failures_are_said_in_the_dock(segmented, tmp_path, monkeypatch):
    """Issue 28.10: a read-only folder raised uncaught errors under an unrelated status."""
    import napari_bach._qt.curate_widget as curate

    viewer, cur = segmented

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(curate, "write_report", refuse)
    cur._report.value = str(tmp_path / "r.pdf")
    assert cur.save_report() is None and "report not saved" in cur._status.value and "Permission" in cur._status.value
    monkeypatch.setattr(curate, "export_sample", refuse)
    cur._dataset.value = str(tmp_path / "ds")
    assert cur.export() is None and "not exported" in cur._status.value and "Permission" in cur._status.value


@pytest.mark.parametrize("name", ["../escaped_sample", "a/b", ".hidden", "..", "c:d"])
def test_sample_names_stay_inside_the_dataset(segmented, tmp_path, name):
    """Issue 28.9: '../x' was written outside the dataset and into the manifest."""
    viewer, cur = segmented
    cur._dataset.value = str(tmp_path / "ds")
    cur._sample.value = name
    assert cur.export() is None and "not a sample name" in cur._status.value
    assert not (tmp_path / "escaped_sample").exists() and not (tmp_path / "ds" / "manifest.json").exists()


def test_labels_without_nuclei_are_not_exported(segmented, tmp_path):
    """Issue 28.18: an all-zero labels layer became a training sample with 0 nuclei."""
    viewer, cur = segmented
    viewer.layers["b007 nuclei"].data = np.zeros_like(viewer.layers["b007 nuclei"].data)
    cur._dataset.value = str(tmp_path / "ds")
    assert cur.export() is None and "no nuclei" in cur._status.value


def test_full_figure_leaves_out_layers_in_other_units(segmented, tmp_path):
    """Issue 28.23: a pixel-unit layer beside a µm image made the image fill a corner of a
    black figure with a unitless scale bar."""
    viewer, cur = segmented
    image = cur._image.value
    for layer in (image, cur._nuclei.value, viewer.layers["b007 boxes"]):  # the result in µm, as Segment nuclei puts it
        layer.scale, layer.units = (0.42, 0.42), ("um", "um")
    viewer.add_image(np.zeros((2000, 2000), np.uint8), name="pixels")  # scale 1, unit pixels
    assert str(viewer.layers["pixels"].units[-1]) != str(image.units[-1])
    cur._figure.value = str(tmp_path / "full.png")
    cur.save_figure()
    assert "left out, in other units: pixels" in cur._status.value and "pixels" in viewer.layers  # put back
    with Image.open(tmp_path / "full.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    h, w = image.data.shape[:2]
    assert rgb.shape[:2] == (h, w)  # the image's own extent at full resolution (was 4762², the image in a corner)
