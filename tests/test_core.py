"""Tiling, box-local paste, refilter semantics and the tiled predictor."""
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from napari_bach.detections import Detections
from napari_bach.paste import mask_crops, paste_labels
from napari_bach.tiling import tile_grid


def test_tile_cores_partition_the_image():
    tiles = tile_grid(300, 517, size=128, overlap=32)
    owners = np.zeros((300, 517), int)
    for t in tiles:
        y0, x0, y1, x1 = t.core
        owners[y0:y1, x0:x1] += 1
        assert t.y1 - t.y0 == 128 and t.x1 - t.x0 == 128
        assert t.y0 <= y0 and y1 <= t.y1 and t.x0 <= x0 and x1 <= t.x1
    assert (owners == 1).all()
    # neighbouring tiles overlap by at least the requested margin
    xs = sorted({(t.x0, t.x1) for t in tiles})
    assert all(a[1] - b[0] >= 32 for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("length", [513, 700, 2150, 2867, 4097])
def test_balanced_tiles_cover_with_the_same_count_and_less_overlap(length):
    fixed = tile_grid(length, 64, 512, 96)
    balanced = tile_grid(length, 64, 512, 96, balanced=True)
    assert len(balanced) == len(fixed)
    sizes = {t.y1 - t.y0 for t in balanced}
    assert len(sizes) == 1 and sizes.pop() % 32 == 0  # one shape (tiles batch), no padding to 32
    owners = np.zeros(length, int)
    for t in balanced:
        owners[t.core[0]:t.core[2]] += 1
        assert t.y0 <= t.core[0] and t.core[2] <= t.y1
    assert (owners == 1).all() and balanced[-1].y1 == length
    spans = sorted((t.y0, t.y1) for t in balanced)
    assert all(a[1] - b[0] >= 96 for a, b in zip(spans, spans[1:]))  # the model's context margin kept
    assert sum(t.y1 - t.y0 for t in balanced) <= sum(t.y1 - t.y0 for t in fixed)


def test_small_image_is_one_tile():
    (t,) = tile_grid(50, 60, 128, 32)
    assert (t.y0, t.x0, t.y1, t.x1) == (0, 0, 50, 60) and t.owns(49.9, 59.9)


@pytest.mark.parametrize("threshold", [0.5, 0.6])
def test_box_local_paste_equals_torchvision_reference(rng, threshold):
    masks = torch.from_numpy(rng.random((6, 28, 28)).astype(np.float32))
    boxes = torch.tensor([[3.2, 4.7, 20.1, 17.9], [0.0, 0.0, 9.5, 30.0], [40.3, 5.0, 63.9, 12.2],
                          [-4.0, 50.0, 8.0, 70.0], [55.0, 60.0, 80.0, 90.0], [10.0, 10.0, 10.4, 10.6]])
    shape = (72, 64)
    offsets, crops = mask_crops(masks, boxes, shape, threshold)
    reference = paste_masks_in_image(masks[:, None], boxes, shape)[:, 0] > threshold
    for i in range(len(masks)):
        full = np.zeros(shape, bool)
        y0, x0 = offsets[i]
        full[y0:y0 + crops[i].shape[0], x0:x0 + crops[i].shape[1]] = crops[i]
        np.testing.assert_array_equal(full, reference[i].numpy(), err_msg=f"mask {i}")


def _square_detections(specs, shape=(60, 60), candidate_nms=1.0):
    """Candidates that are filled squares: (x0, y0, size, score)."""
    boxes = np.array([[x, y, x + s, y + s] for x, y, s, _ in specs], np.float32)
    scores = np.array([sc for *_, sc in specs], np.float32)
    offsets = np.array([[y, x] for x, y, _, _ in specs])
    crops = [np.ones((s, s), bool) for _, _, s, _ in specs]
    return Detections(shape, boxes, scores, offsets, crops, candidate_nms=candidate_nms)


def test_refilter_threshold_and_nms_semantics():
    det = _square_detections([(0, 0, 10, 0.9), (1, 1, 10, 0.8), (30, 30, 8, 0.4), (45, 5, 6, 0.6)])
    # overlap IoU of the first two squares: 81 / 119 = 0.68
    seg = det.refilter(0.5, 0.5)
    np.testing.assert_allclose(seg.scores, [0.9, 0.6])  # second square suppressed, 0.4 below threshold
    assert set(np.unique(seg.labels)) == {0, 1, 4}  # a candidate's id is its index + 1, at every threshold
    assert (seg.labels[0:10, 0:10] == 1).all() and (seg.labels[5:11, 45:51] == 4).all()
    seg = det.refilter(0.5, 0.7)  # NMS looser than the overlap: both squares survive
    np.testing.assert_allclose(seg.scores, [0.9, 0.8, 0.6])
    assert (seg.labels[10, 1:11] == 2).all()  # the lower score only keeps uncontested pixels
    assert (seg.labels[1:10, 1:10] == 1).all()
    seg = det.refilter(0.3, 0.5)
    np.testing.assert_allclose(seg.scores, [0.9, 0.6, 0.4])
    assert seg.labels.max() == 4 and list(seg.ids) == [1, 4, 3]
    assert len(det.refilter(0.95, 0.5).ids) == 0


def test_refilter_drops_fully_covered_candidates_and_consecutive_renumbers():
    det = _square_detections([(0, 0, 10, 0.9), (2, 2, 4, 0.8), (20, 20, 5, 0.7)])
    seg = det.refilter(0.1, 0.9)
    assert list(seg.ids) == [1, 3] and set(np.unique(seg.labels)) == {0, 1, 3}
    np.testing.assert_allclose(seg.scores, [0.9, 0.7])
    flat = seg.consecutive()  # what files get: 1..N in row order
    assert list(flat.ids) == [1, 2] and set(np.unique(flat.labels)) == {0, 1, 2}
    np.testing.assert_array_equal(flat.labels == 2, seg.labels == 3)


def test_paste_labels_first_crop_wins():
    labels, written = paste_labels((5, 5), np.array([[0, 0], [1, 1]]), [np.ones((3, 3), bool)] * 2, np.array([1, 0]))
    assert labels[1, 1] == 2 and labels[0, 0] == 1 and labels[3, 3] == 2
    assert written.tolist() == [9, 5]


def test_measurements_equal_scikit_image_regionprops():
    """The vectorised table must be the same numbers skimage's per-region loop gives."""
    from skimage.measure import regionprops_table

    from napari_bach.detections import Segmentation
    from napari_bach.measure import hematoxylin, measure_nuclei
    from napari_bach.pixelsize import PixelSize
    from napari_bach.synthetic import synthetic_he

    rgb, labels = synthetic_he((300, 420), mpp=0.42, seed=4)
    labels = labels.astype(np.int32)
    labels[5:9, 5:30] = labels.max() + 1  # a thin bar: eccentricity near 1
    labels[50, 50] = labels.max() + 1  # a single pixel: eccentricity 0
    ids = np.unique(labels[labels > 0])[::-1]  # any order: rows follow seg.ids
    seg = Segmentation(labels, ids, np.zeros((len(ids), 4), np.float32), np.linspace(0.9, 0.5, len(ids)),
                       PixelSize(0.5, "given"))
    hema = hematoxylin(rgb)
    table = measure_nuclei(seg, hema)
    only_nuclei = hematoxylin(rgb, labels > 0)  # what the CLI and slides compute: the nuclei only
    np.testing.assert_allclose(only_nuclei, np.where(labels > 0, hema, 0), rtol=1e-6)
    ref = regionprops_table(labels, intensity_image=hema,
                            properties=("label", "area", "perimeter", "eccentricity", "intensity_mean", "centroid"))
    order = np.searchsorted(ref["label"], ids)
    np.testing.assert_array_equal(table["index"], ids)
    np.testing.assert_allclose(table["area_um2"], ref["area"][order] * 0.25)
    np.testing.assert_allclose(table["perimeter_um"], ref["perimeter"][order] * 0.5)
    np.testing.assert_allclose(table["area_px"], ref["area"][order])
    np.testing.assert_allclose(table["mean_hematoxylin"], ref["intensity_mean"][order], rtol=1e-5)
    unknown = measure_nuclei(Segmentation(labels, ids, seg.boxes, seg.scores), hema)
    assert np.isnan(unknown["area_um2"]).all() and np.isnan(unknown["perimeter_um"]).all()  # no guessed µm
    np.testing.assert_allclose(unknown["area_px"], ref["area"][order])
    np.testing.assert_allclose(table["eccentricity"], ref["eccentricity"][order], atol=1e-4)
    np.testing.assert_allclose(table["mean_hematoxylin"], ref["intensity_mean"][order], rtol=1e-5)
    np.testing.assert_allclose(table["centroid_y"], ref["centroid-0"][order])
    np.testing.assert_allclose(table["centroid_x"], ref["centroid-1"][order])


def test_edits_survive_refiltering():
    """Delete 3 nuclei, paint 1, redraw 1, move the score slider: every edit stays
    (it used to rebuild the labels from the model, edits gone, no undo)."""
    from napari_bach.edit import Edits

    specs = [(2 + 12 * k, 2, 8, 0.9 - 0.05 * k) for k in range(6)] + [(2, 40, 8, 0.32)]
    det = _square_detections(specs, shape=(60, 80))
    edits = Edits(first_free=len(det) + 1)
    shown = det.refilter(0.30, 0.5, edits).labels
    current = shown.copy()
    for i in (1, 3, 5):
        current[current == i] = 0  # deleted by hand
    current[50:58, 70:78] = 8  # painted: a new nucleus
    current[2:10, 26:34][current[2:10, 26:34] == 0] = 0
    current[2:4, 26:30] = 0  # nucleus 3 (x 26..34) was deleted; redraw nucleus 2 smaller instead
    current[current == 2] = 0
    current[3:7, 15:19] = 2
    assert edits.absorb(shown, current, det.scores) == 5
    seg = det.refilter(0.31, 0.5, edits)  # the slider moves
    np.testing.assert_array_equal(seg.labels, current)
    assert {1, 3, 5} & set(seg.ids.tolist()) == set() and {2, 4, 6, 7, 8} <= set(seg.ids.tolist())
    scores = dict(zip(seg.ids.tolist(), seg.scores.tolist()))
    assert np.isnan(scores[8]) and scores[2] == pytest.approx(0.85)  # redrawn keeps the model's score
    np.testing.assert_array_equal(seg.boxes[seg.ids.tolist().index(8)], [70, 50, 78, 58])
    strict = det.refilter(0.5, 0.5, edits)  # model nuclei below the threshold go, the user's stay
    assert 7 not in strict.ids and {2, 8} <= set(strict.ids.tolist())
    assert not Edits(first_free=9) and edits


def _grid_of_nuclei(h: int, w: int):
    labels = np.zeros((h, w), np.int32)
    yy, xx = np.mgrid[0:h:20, 0:w:20]
    ids = np.arange(1, yy.size + 1)
    for i, y, x in zip(ids, yy.ravel(), xx.ravel()):
        labels[y + 2:y + 12, x + 3:x + 14] = i
    return labels, ids


def _peak_bytes(fn, *args):
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn(*args)
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


def test_measurement_memory_does_not_grow_with_image_size():
    """A 12000² image peaked at 12.4 GB in the measurement step (full-size float64 and
    index arrays); band by band, the temporaries stay the same as the image grows."""
    from napari_bach.detections import Segmentation
    from napari_bach.measure import hematoxylin, measure_nuclei
    from napari_bach.pixelsize import PixelSize

    peaks = []
    for h in (1500, 6000):
        labels, ids = _grid_of_nuclei(h, 1000)
        rgb = np.full((h, 1000, 3), 200, np.uint8)
        seg = Segmentation(labels, ids, np.zeros((len(ids), 4), np.float32), np.ones(len(ids), np.float32),
                           PixelSize(0.5, "given"))
        hema_peak, hema = _peak_bytes(hematoxylin, rgb)
        table_peak, table = _peak_bytes(measure_nuclei, seg, hema)
        peaks.append((hema_peak - hema.nbytes, table_peak))
        np.testing.assert_allclose(table["area_um2"], 110 * 0.25)
        np.testing.assert_allclose(table["perimeter_px"], 38.0)  # skimage's value for an 11×10 box
    (hema_small, table_small), (hema_big, table_big) = peaks
    assert hema_big < 1.2 * hema_small + 1e6, peaks  # 4× the pixels, the same temporaries
    assert table_big < 1.2 * table_small + 1e6, peaks
    assert table_big < 0.5 * 6000 * 1000 * 4, peaks  # well under the label image itself


def test_edits_carry_over_to_a_new_run():
    """A re-run (new candidates) keeps what was drawn and deletes again what matches a
    deleted nucleus, by box overlap."""
    from napari_bach.edit import Edits

    old = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
    edits = Edits(first_free=4, removed={1, 3}, drawn={3: (40, 40, np.ones((5, 5), bool), 0.7),
                                                      5: (0, 30, np.ones((3, 3), bool), np.nan)})
    new = np.array([[21, 21, 30, 30], [1, 0, 11, 10], [60, 60, 70, 70]], np.float32)
    carried = edits.carried_to(old, new, first_free=4)
    assert carried.removed == {2}  # new candidate 2 overlaps deleted nucleus 1; 3 was redrawn, not deleted
    assert sorted(carried.drawn) == [4, 5] and carried.drawn[4][3] == pytest.approx(0.7)


def test_live_labels_equal_a_fresh_refilter_along_a_slider_walk():
    """A score step pastes or erases only the nuclei that change; any move (score, NMS,
    minimum area, deleted nuclei) gives exactly what re-filtering from scratch gives."""
    from napari_bach.detections import LiveLabels
    from napari_bach.edit import Edits

    rng = np.random.default_rng(0)
    shape = (120, 160)
    boxes, scores, offsets, crops = [], [], [], []
    for _ in range(150):  # overlapping blobs of many sizes: contested pixels and fragments
        h, w = rng.integers(3, 20, 2)
        y0, x0 = rng.integers(0, shape[0] - h), rng.integers(0, shape[1] - w)
        yy, xx = np.mgrid[0:h, 0:w]
        crops.append(((yy - h / 2) ** 2 / (h / 2) ** 2 + (xx - w / 2) ** 2 / (w / 2) ** 2) <= 1)
        boxes.append((x0, y0, x0 + w, y0 + h))
        offsets.append((y0, x0))
        scores.append(rng.choice([rng.uniform(0.05, 1.0), 0.5]))  # ties too
    det = Detections(shape, np.array(boxes, np.float32), np.array(scores, np.float32), np.array(offsets),
                     crops, candidate_nms=0.7)
    live, edits = LiveLabels(det), Edits(first_free=len(det) + 1)
    score, nms_iou, min_area = 0.5, 0.5, 0.0
    for step in range(60):
        move = rng.integers(0, 10)
        if move < 7:
            score = float(np.clip(score + rng.choice([-1, 1]) * rng.uniform(0.005, 0.1), 0.05, 1.0))
        elif move == 7:
            nms_iou = float(rng.choice([0.3, 0.5, 0.7]))
        elif move == 8:
            min_area = float(rng.choice([0.0, 20.0, 60.0]))
        else:
            edits.removed.add(int(rng.integers(1, len(det) + 1)))
        got, want = live.refilter(score, nms_iou, edits, min_area), det.refilter(score, nms_iou, edits, min_area)
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.scores, want.scores)
    assert len(want.ids) > 5
