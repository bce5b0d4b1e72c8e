"""Anchor grid, anchor labelling and RPN proposals (Qt-free core)."""
import numpy as np
import torch
from torchvision.ops import box_iou

from conftest import tiny_config
from napari_bach.anchors import (IGNORED, NEGATIVE, POSITIVE, anchors_in_region, feature_sizes, iter_proposals,
                                 label_anchors, level_anchors, make_generator)
from napari_bach.model import build_model
from napari_bach.synthetic import synthetic_he


def test_anchor_count_per_level_is_feature_map_times_sizes_times_ratios():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    h, w = 200, 150
    with torch.no_grad():
        batch, _ = model.transform([torch.rand(3, h, w)])
        feats = list(model.backbone(batch.tensors).values())
    assert [tuple(f.shape[-2:]) for f in feats] == feature_sizes(h, w)
    gen = make_generator(cfg.anchor_sizes, cfg.aspect_ratios)
    per_level = level_anchors(gen, h, w)
    for anchors, (fh, fw), sizes in zip(per_level, feature_sizes(h, w), cfg.anchor_sizes):
        assert len(anchors) == fh * fw * len(sizes) * len(cfg.aspect_ratios)
    # the very anchors the model's own RPN uses
    torch.testing.assert_close(torch.cat(per_level), model.rpn.anchor_generator(batch, feats)[0])


def test_labelling_matches_a_hand_computed_case():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    anchors = torch.tensor([
        [0.0, 0, 10, 10],   # IoU 1.0   -> positive
        [0.0, 0, 10, 12],   # IoU 0.833 -> positive
        [0.0, 0, 10, 20],   # IoU 0.5   -> ignored (between 0.3 and 0.7)
        [5.0, 0, 15, 10],   # IoU 0.333 -> ignored
        [8.0, 8, 18, 18],   # IoU 0.02  -> negative
        [50.0, 50, 60, 60],  # IoU 0     -> negative
    ])
    assert label_anchors(anchors, gt).tolist() == [POSITIVE, POSITIVE, IGNORED, IGNORED, NEGATIVE, NEGATIVE]
    assert label_anchors(anchors, gt, fg=0.9, bg=0.4).tolist() == [POSITIVE, IGNORED, IGNORED, NEGATIVE, NEGATIVE, NEGATIVE]
    # a nucleus no anchor reaches 0.7 with still gets its best anchor (torchvision's rule)
    lone = label_anchors(anchors[2:], gt)
    assert lone.tolist() == [POSITIVE, IGNORED, NEGATIVE, NEGATIVE]
    assert (label_anchors(anchors, torch.zeros(0, 4)) == NEGATIVE).all()


def test_region_counts_are_exact_and_drawing_is_capped_on_a_bach_sized_image():
    cfg = tiny_config()
    gen = make_generator(cfg.anchor_sizes, cfg.aspect_ratios)
    gt = np.array([[100, 100, 120, 118], [300, 200, 316, 214]], np.float32)
    view = anchors_in_region(gen, (1536, 2048), 0.42 / cfg.mpp, (0, 0, 2048, 1536), [0, 1, 2, 3, 4], gt, max_drawn=5000)
    assert view.capped and len(view.boxes) == 5000 and view.total == view.counts["anchors"] > 1_000_000
    assert view.counts["positive"] + view.counts["negative"] + view.counts["ignored"] == view.total
    assert (view.labels == POSITIVE).sum() == view.counts["positive"] > 0  # every positive is drawn
    small = anchors_in_region(gen, (1536, 2048), 0.42 / cfg.mpp, (0, 0, 64, 64), [0], None)
    assert not small.capped and small.labels is None
    centres = (small.boxes[:, :2] + small.boxes[:, 2:]) / 2
    assert (centres >= 0).all() and (centres < 64).all() and (small.levels == 0).all()


def test_a_region_labels_its_anchors_as_the_whole_image_would():
    """Nuclei outside the region must not lend it 'best anchor' positives (IoU 0 ties)."""
    cfg = tiny_config()
    gen = make_generator(cfg.anchor_sizes, cfg.aspect_ratios)
    gt = np.array([[10, 10, 26, 24], [58, 40, 75, 55], [300, 300, 318, 316], [500, 20, 512, 34]], np.float32)
    whole = anchors_in_region(gen, (400, 600), 1.0, (0, 0, 600, 400), [0, 1, 2, 3, 4], gt, max_drawn=10**7)
    part = anchors_in_region(gen, (400, 600), 1.0, (0, 0, 64, 64), [0, 1, 2, 3, 4], gt, max_drawn=10**7)
    key = {tuple(b): l for b, l in zip(whole.boxes.round(3).tolist(), whole.labels.tolist())}
    assert [key[tuple(b)] for b in part.boxes.round(3).tolist()] == part.labels.tolist()
    assert 0 < part.counts["positive"] < 60 and part.counts["ignored"] > 0


def test_proposals_before_and_after_nms(tiny_checkpoint):
    from napari_bach.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    rgb, _ = synthetic_he((260, 300), seed=3)
    gen = iter_proposals(rgb, model, 0.42, (20, 10, 280, 250), k=50, nms_iou=0.5)
    progress = []
    try:
        while True:
            progress.append(next(gen))
    except StopIteration as stop:
        before, after = stop.value
    assert progress[-1].done == progress[-1].total > 1
    assert len(before.boxes) == 50 and len(after.boxes) <= 50
    assert before.count > after.count >= len(after.boxes)  # what NMS compared and kept, not the top-k cut
    assert (np.diff(before.scores) <= 0).all() and (np.diff(after.scores) <= 0).all()
    assert before.boxes[:, 0].min() >= 20 - 1e-3 and before.boxes[:, 2].max() <= 280 + 1e-3
    pair = box_iou(torch.from_numpy(after.boxes), torch.from_numpy(after.boxes)).fill_diagonal_(0)
    assert pair.max() <= 0.5 + 1e-5


def test_region_labels_equal_torchvisions_dense_labels_of_the_whole_image():
    cfg = tiny_config()
    gen = make_generator(cfg.anchor_sizes, cfg.aspect_ratios)
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 280, (120, 2))
    gt = np.concatenate([xy, xy + rng.uniform(6, 30, (120, 2))], 1).astype(np.float32)
    everywhere = torch.cat(level_anchors(gen, 300, 320))
    dense = label_anchors(everywhere, torch.as_tensor(gt))
    key = {tuple(b): int(l) for b, l in zip(everywhere.numpy().round(3).tolist(), dense.tolist())}
    region = (40, 30, 200, 170)
    view = anchors_in_region(gen, (300, 320), 1.0, region, [0, 1, 2, 3, 4], gt, max_drawn=10**7)
    assert not view.shrunk and view.total == len(view.boxes)
    assert [key[tuple(b)] for b in view.boxes.round(3).tolist()] == view.labels.tolist()
    assert view.counts["positive"] > 20


def test_a_view_with_too_many_anchors_is_shrunk_about_its_centre(monkeypatch):
    """All of a BACH image on P2 with five anchor sizes is ~8 million anchors: the work is
    capped (what is generated and labelled), the centre of the view is shown, and said."""
    import napari_bach.anchors as anchors

    sizes = ((8, 11, 16, 23, 32),) * 5
    gen = make_generator(sizes, (0.5, 1.0, 2.0))
    made = []
    part = anchors._Grid.part
    monkeypatch.setattr(anchors._Grid, "part", lambda self, boxes: made.append(self.count(boxes)) or part(self, boxes))
    rng = np.random.default_rng(0)
    xy = rng.uniform([824, 618], [1200, 900], (3000, 2))  # crowded about the centre the view shrinks to
    gt = np.concatenate([xy, xy + rng.uniform(8, 25, (3000, 2))], 1).astype(np.float32)
    steps = []
    it = anchors.iter_anchors_in_region(gen, (1536, 2048), 0.42 / 0.3, (0, 0, 2048, 1536), [0], gt,
                                        max_anchors=400_000)
    while True:
        try:
            steps.append(next(it))
        except StopIteration as end:
            view = end.value
            break
    assert view.shrunk and max(made) <= 400_000
    x0, y0, x1, y1 = view.region
    assert abs((x0 + x1) / 2 - 1024) < 1 and abs((y0 + y1) / 2 - 768) < 1 and x1 - x0 < 2048
    centres = (view.boxes[:, :2] + view.boxes[:, 2:]) / 2
    assert (centres >= [x0 - 1, y0 - 1]).all() and (centres <= [x1 + 1, y1 + 1]).all()
    labelling = [s for s in steps if "labelling" in s.message]
    assert len(labelling) >= 2  # Cancel is heard between chunks of nuclei
