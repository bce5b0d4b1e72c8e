"""Tiled prediction: stitching across tile borders, rescaling, progress, real model path."""

import numpy as np
import torch

from conftest import OracleModel, image_with_squares, tiny_config
from napari_bach.checkpoint import load_checkpoint
from napari_bach.predict import Progress, iter_predict, predict
from napari_bach.synthetic import synthetic_he


def test_object_across_tile_border_comes_out_once():
    cfg = tiny_config(tile_size=128, tile_overlap=40)
    # tiles start at 0, 88, 172; borders of the cores at 108 and 192
    squares = [(100, 100, 16), (20, 180, 14), (180, 20, 12), (60, 60, 10), (190, 190, 15)]
    rgb = image_with_squares((300, 300), squares)
    model = OracleModel(cfg)
    det = predict(rgb, model, pixel_size=cfg.mpp)
    seg = det.refilter(0.5, 0.5)
    assert len(seg.ids) == len(squares)
    for y, x, s in squares:
        inside = seg.labels[y:y + s, x:x + s]
        ids = np.unique(inside[inside > 0])
        assert len(ids) == 1 and (inside == ids[0]).mean() > 0.7, (y, x, ids)
    assert det.tissue_probs.argmax() == 2


def test_rescaling_to_model_resolution_and_back():
    cfg = tiny_config(mpp=0.4)
    rgb = image_with_squares((200, 160), [(50, 40, 20), (120, 100, 30)])
    det = predict(rgb, OracleModel(cfg), pixel_size=0.2)  # image at twice the model's resolution
    seg = det.refilter(0.5, 0.5)
    assert seg.labels.shape == (200, 160) and len(seg.ids) == 2
    np.testing.assert_allclose(sorted(seg.boxes[:, 0]), [40, 100], atol=2)


def test_an_image_within_two_percent_of_the_model_scale_is_not_resampled_and_stays_in_place():
    """Not resampled, so its boxes must not be rescaled either (they were, by 1/1.015: a
    nucleus 1000 px from the origin came back 15 px off)."""
    cfg = tiny_config(mpp=0.4)
    squares = [(20, 30, 12), (900, 950, 14), (500, 40, 10)]
    rgb = image_with_squares((1000, 1000), squares)
    model = OracleModel(cfg)
    seg = predict(rgb, model, pixel_size=0.4 * 1.015).refilter(0.5, 0.5)
    assert model.seen.shape[-1] <= cfg.tile_size and len(seg.ids) == len(squares)
    for y, x, s in squares:
        inside = seg.labels[y:y + s, x:x + s]
        assert (inside > 0).mean() > 0.7, (y, x)


def test_progress_per_tile_and_glass_tiles_are_skipped():
    cfg = tiny_config(tile_size=128, tile_overlap=32)
    rgb = image_with_squares((128, 400), [(30, 30, 10)])  # mostly blank glass
    model = OracleModel(cfg)
    gen = iter_predict(rgb, model, cfg.mpp)
    steps = []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        det = stop.value
    assert all(isinstance(s, Progress) for s in steps)
    assert [s.done for s in steps] == list(range(len(steps))) and steps[-1].done == steps[-1].total
    assert model.calls == 1 and len(det.refilter(0.5, 0.5).ids) == 1


def test_image_smaller_than_a_tile_is_padded_with_glass_not_zeros():
    cfg = tiny_config(tile_size=128, tile_overlap=32)
    rgb = image_with_squares((100, 70), [(10, 10, 12), (80, 50, 15)])  # the second touches the corner
    model = OracleModel(cfg)
    seg = predict(rgb, model, cfg.mpp).refilter(0.5, 0.5)
    assert tuple(model.seen.shape[-2:]) == (128, 128)
    assert (model.seen[:, 100:, :] == 1.0).all() and (model.seen[:, :, 70:] == 1.0).all()
    assert len(seg.ids) == 2 and seg.labels.shape == (100, 70)
    assert (seg.boxes[:, 2] <= 70).all() and (seg.boxes[:, 3] <= 100).all()


def test_real_model_on_synthetic_he(tiny_checkpoint):
    model, info = load_checkpoint(tiny_checkpoint)
    rgb, _ = synthetic_he((200, 260), mpp=0.42, seed=1)
    det = predict(rgb, model, 0.42, tissue_trained=info.tissue_trained)
    assert det.tissue_probs is None  # untrained head: no made-up probabilities
    assert det.classes == ("Normal", "Benign", "InSitu", "Invasive")
    seg = det.refilter(0.05, 0.5)
    assert seg.labels.shape == (200, 260) and seg.labels.dtype == np.int32
    assert len(seg.ids) == len(np.unique(seg.labels)) - 1 and (np.diff(seg.scores) <= 0).all()


def test_several_tiles_per_forward_pass_give_the_same_result():
    """GPU speed: batches of tiles; the result must not depend on the batch size."""
    cfg = tiny_config(tile_size=128, tile_overlap=32)
    rgb = image_with_squares((300, 300), [(100, 100, 16), (20, 180, 14), (180, 20, 12), (250, 250, 20)])
    one, four = OracleModel(cfg), OracleModel(cfg)
    a = predict(rgb, one, cfg.mpp, batch_size=1).refilter(0.5, 0.5)
    b = predict(rgb, four, cfg.mpp, batch_size=4).refilter(0.5, 0.5)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert set(one.batches) == {1} and max(four.batches) == 4 and sum(four.batches) == sum(one.batches)


def test_real_model_batched_equals_one_by_one(tiny_checkpoint):
    model, _ = load_checkpoint(tiny_checkpoint)
    rgb, _ = synthetic_he((300, 300), mpp=0.42, seed=2)
    a = predict(rgb, model, 0.42, batch_size=1)
    b = predict(rgb, model, 0.42, batch_size=3)
    assert len(a) == len(b)
    np.testing.assert_allclose(np.sort(a.scores), np.sort(b.scores), atol=1e-4)


def test_flip_tta_maps_every_view_back_and_keeps_each_object_once():
    """Asymmetric objects near a corner: flipped views must come back to the same place."""
    cfg = tiny_config(tile_size=128, tile_overlap=32)
    squares = [(10, 20, 12), (60, 90, 18), (100, 15, 9)]
    rgb = image_with_squares((128, 128), squares)
    plain = predict(rgb, OracleModel(cfg), cfg.mpp).refilter(0.5, 0.5)
    model = OracleModel(cfg)
    tta = predict(rgb, model, cfg.mpp, tta=True)
    assert model.batches == [4]  # four views of the one tile in one pass
    seg = tta.refilter(0.5, 0.5)
    np.testing.assert_array_equal(seg.labels > 0, plain.labels > 0)
    assert len(seg.ids) == len(squares) and tta.tissue_probs.argmax() == 2


def test_minimum_area_drops_small_candidates_and_fragments_left_by_overlaps():
    """Issue 14.4: 1–7 px "nuclei" were kept. A small candidate, and what a larger one
    leaves visible of a lower-scoring one under it, are both dropped; pixels too."""
    from napari_bach.detections import Detections

    crops = [np.ones((10, 10), bool), np.ones((2, 2), bool), np.ones((10, 12), bool)]
    offsets = np.array([[0, 0], [30, 30], [0, 0]])  # the third lies under the first but for a 10×2 strip
    boxes = np.array([[0, 0, 10, 10], [30, 30, 32, 32], [0, 0, 12, 10]], np.float32)
    det = Detections((40, 40), boxes, np.array([0.9, 0.8, 0.7], np.float32), offsets, crops)
    everything = det.refilter(0.5, 1.0)
    assert list(everything.ids) == [1, 2, 3]
    kept = det.refilter(0.5, 1.0, min_area=25)
    assert list(kept.ids) == [1] and set(np.unique(kept.labels)) == {0, 1}
    assert (kept.labels == 1).sum() == 100


def test_headless_runs_compute_masks_only_for_kept_nuclei_and_equal_the_widget(tiny_checkpoint):
    """Issue 15.1: the CLI and slides know their threshold before the network runs; the
    nuclei they get equal the widget's (full candidate cache, refiltered) at that threshold."""
    from napari_bach.checkpoint import load_checkpoint
    from napari_bach.synthetic import synthetic_he

    model, _ = load_checkpoint(tiny_checkpoint)
    rgb, _ = synthetic_he((300, 340), seed=11)
    cache = predict(rgb, model, 0.42)
    threshold = float(np.quantile(cache.scores, 0.7))
    headless = predict(rgb, model, 0.42, score_floor=threshold)
    assert len(headless) < 0.5 * len(cache)  # fewer masks computed
    for nms_iou in (0.3, 0.5, 0.7):
        a = cache.refilter(threshold, nms_iou, min_area=10).labels
        b = headless.refilter(threshold, nms_iou, min_area=10).labels
        assert (a > 0).sum() > 0
        np.testing.assert_array_equal(a > 0, b > 0)
        assert len(np.unique(a)) == len(np.unique(b))
    assert model.roi_heads.score_thresh == model.config.candidate_score  # the shared model is left as it was


class RampMaskModel(OracleModel):
    """Each nucleus's mask probability rises from 0 at its box's left edge to 1 at its right."""

    @staticmethod
    def _one(image):
        out = OracleModel._one(image)
        out["masks"] = out["masks"] * torch.linspace(0, 1, 28)
        return out


def test_the_models_mask_threshold_sets_how_much_of_a_box_is_nucleus():
    rgb = image_with_squares((120, 120), [(30, 30, 40)])
    kept = {}
    for t in (0.3, 0.7):
        seg = predict(rgb, RampMaskModel(tiny_config(mask_threshold=t)), pixel_size=0.4).refilter(0.5, 0.5)
        kept[t] = (seg.labels > 0).sum() / 40**2
    assert abs(kept[0.3] - 0.7) < 0.08 and abs(kept[0.7] - 0.3) < 0.08, kept
