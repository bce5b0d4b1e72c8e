"""Export format: round trip into src_train, COCO RLE, refusal to clobber, invalid labels."""
import json

import numpy as np
import pytest

from napari_bach.export import SampleExistsError, export_sample, list_samples, read_sample, rle_in_box
from napari_bach.synthetic import synthetic_he
from src_train.datasets import instances_from_labels, load_exported


def decode_rle(counts, shape):
    flat = np.zeros(shape[0] * shape[1], bool)
    pos, value = 0, False
    for c in counts:
        flat[pos:pos + c] = value
        pos, value = pos + c, not value
    return flat.reshape(shape[1], shape[0]).T  # column-major


def test_rle_matches_full_image_mask():
    mask = np.zeros((12, 9), bool)
    mask[3:7, 2:5] = True
    mask[5, 6] = True
    counts = rle_in_box(mask[3:7, 2:7], 3, 2, mask.shape)
    assert sum(counts) == mask.size
    np.testing.assert_array_equal(decode_rle(counts, mask.shape), mask)


def test_export_round_trip_into_src_train(tmp_path):
    rgb, labels = synthetic_he((120, 140), seed=9)
    labels[labels == 5] = 0  # an edit: a deleted nucleus leaves a gap in the ids
    export_sample(tmp_path, "is001", rgb, labels, 0.42, "InSitu", {"model": "m", "score_threshold": 0.5})
    export_sample(tmp_path, "b002", rgb[:60], labels[:60], 0.42, None)
    (sample,) = [s for s in load_exported(tmp_path) if s.name == "is001"]
    np.testing.assert_array_equal(sample.image, rgb)
    np.testing.assert_array_equal(sample.labels, labels)
    assert sample.tissue == 2 and sample.mpp == 0.42
    boxes, _, ids = instances_from_labels(sample.labels)
    assert len(ids) == len(np.unique(labels)) - 1
    coco = json.loads((tmp_path / "is001" / "annotations.json").read_text())
    assert len(coco["annotations"]) == len(ids) and coco["images"][0]["tissue_class"] == "InSitu"
    for ann in coco["annotations"]:
        mask = decode_rle(ann["segmentation"]["counts"], labels.shape)
        np.testing.assert_array_equal(mask, labels == ann["label"])
        assert ann["area"] == mask.sum()
    assert [p.name for p in list_samples(tmp_path)] == ["is001", "b002"]
    assert read_sample(tmp_path / "is001")["meta"]["model"] == "m"


def test_export_refuses_to_clobber_and_can_version(tmp_path):
    rgb, labels = synthetic_he((50, 50), seed=1)
    first = export_sample(tmp_path, "a", rgb, labels, 0.42)
    before = (first / "labels.tif").read_bytes()
    with pytest.raises(SampleExistsError):
        export_sample(tmp_path, "a", rgb, labels[::-1].copy(), 0.42)
    assert (first / "labels.tif").read_bytes() == before
    assert export_sample(tmp_path, "a", rgb, labels, 0.42, on_exists="version").name == "a_v2"
    assert len(list_samples(tmp_path)) == 2


@pytest.mark.parametrize("bad, reason", [
    (np.zeros((49, 50), np.int32), "does not match"),
    (np.full((50, 50), -1, np.int32), "negative"),
    (np.zeros((50, 50), np.float32), "integers"),
])
def test_invalid_labels_write_nothing(tmp_path, bad, reason):
    rgb, _ = synthetic_he((50, 50), seed=1)
    with pytest.raises(ValueError, match=reason):
        export_sample(tmp_path / "ds", "x", rgb, bad, 0.42)
    assert not (tmp_path / "ds").exists()  # validated before anything is created


def test_qupath_polygons_are_the_masks_exactly_with_corners_only():
    """Outlines for QuPath keep only the contour's corners, and still enclose exactly the
    mask's pixels (pixel centres inside the polygon)."""
    from matplotlib.path import Path as Polygon
    from scipy import ndimage

    from napari_bach.geojson import polygons
    from napari_bach.synthetic import synthetic_he

    _, labels = synthetic_he((300, 300), mpp=0.4, seed=4)
    ids = np.unique(labels)[1:]
    rings = polygons(labels, ids, (10, 20))
    slices = ndimage.find_objects(labels)
    for i, nucleus in zip(ids, rings):
        assert len(nucleus) == 1  # synthetic nuclei are one piece each
        ring = np.array(nucleus[0])
        assert (ring[0] == ring[-1]).all() and len(ring) >= 4
        sl = slices[i - 1]
        ys, xs = np.mgrid[sl[0], sl[1]]
        inside = Polygon(ring - [20, 10]).contains_points(np.c_[xs.ravel(), ys.ravel()]).reshape(ys.shape)
        assert (inside == (labels[sl] == i)).all()
    straight = np.zeros((12, 12), np.int32)
    straight[2:9, 3:10] = 1  # a square: four sides and four half-pixel corner cuts, closed
    assert len(polygons(straight, np.array([1]), (0, 0))[0][0]) == 9


def test_a_nucleus_in_pieces_is_a_multipolygon_covering_every_piece(tmp_path):
    """Issue 28.21: a label of scattered strokes became one polygon of one piece (IoU 0.32)."""
    import json

    from matplotlib.path import Path as Polygon

    from napari_bach.detections import Segmentation
    from napari_bach.geojson import write_geojson
    from napari_bach.measure import measure_nuclei

    labels = np.zeros((40, 60), np.int32)
    labels[5:12, 5:12] = 1
    labels[20:30, 30:45] = 1  # the same label, a second stroke
    labels[30:36, 5:9] = 2
    seg = Segmentation(labels, np.array([1, 2]), np.array([[5, 5, 45, 30], [5, 30, 9, 36]], float),
                       np.array([0.9, 0.8]))
    path = write_geojson(tmp_path / "n.geojson", seg, measure_nuclei(seg, np.zeros(labels.shape)))
    first, second = json.loads(path.read_text())["features"]
    assert first["geometry"]["type"] == "MultiPolygon" and second["geometry"]["type"] == "Polygon"
    ys, xs = np.mgrid[0:40, 0:60]
    points = np.c_[xs.ravel(), ys.ravel()]
    covered = np.zeros(labels.size, bool)
    for polygon in first["geometry"]["coordinates"]:
        covered |= Polygon(np.array(polygon[0])).contains_points(points)
    assert (covered.reshape(labels.shape) == (labels == 1)).all()  # every piece, exactly


def test_exported_samples_and_models_are_readable_by_others_under_the_usual_umask(tmp_path):
    """Issue 28.17: sample folders were created 0700 and manifest.json 0600."""
    import os
    import stat

    from napari_bach.tissue import TissueConfig, TissueInfo, TissueNet, save_tissue_model

    old = os.umask(0o022)
    try:
        rgb, labels = synthetic_he((64, 64), seed=1)
        folder = export_sample(tmp_path / "ds", "s1", rgb, labels, 0.5)
        model = save_tissue_model(tmp_path / "t.pt", TissueNet(TissueConfig.for_backbone("efficientnet_lite0")),
                                  TissueInfo())
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for path in (tmp_path / "ds" / "manifest.json", folder / "meta.json", model):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
