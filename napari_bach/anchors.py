"""RPN anchors and proposals for inspection (Qt-free).

Uses the model's own torchvision pieces: ``AnchorGenerator.grid_anchors`` for the anchor
grid, the RPN's ``Matcher`` rule for positive (IoU > fg), negative (< bg) and ignored
anchors, and the RPN head plus box coder for proposals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Generator

import numpy as np
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import box_iou, clip_boxes_to_image, nms

from .model import BachMaskRCNN, for_inference
from .predict import Progress, drain, run_tiled

LEVELS = ("P2", "P3", "P4", "P5", "P6")  # FPN outputs "0", "1", "2", "3", "pool"
POSITIVE, NEGATIVE, IGNORED = 1, 0, -1


def feature_sizes(height: int, width: int, divisible: int = 32) -> list[tuple[int, int]]:
    """FPN feature-map sizes for an image, padded as the model's transform pads it."""
    h, w = math.ceil(height / divisible) * divisible, math.ceil(width / divisible) * divisible
    sizes = [(h // s, w // s) for s in (4, 8, 16, 32)]
    sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))  # max_pool2d(kernel 1, stride 2)
    return sizes


def make_generator(sizes, ratios) -> AnchorGenerator:
    """The model's anchor generator for other sizes/ratios; ValueError says what is wrong
    (torchvision itself only asserts)."""
    sizes = tuple(tuple(float(s) for s in level) for level in sizes)
    ratios = tuple(float(r) for r in ratios)
    if len(sizes) != len(LEVELS):
        raise ValueError(f"anchor sizes need one group per FPN level: {len(LEVELS)} groups separated by spaces "
                         f"({' '.join(LEVELS)}), got {len(sizes)}")
    if not all(level for level in sizes) or min(min(level) for level in sizes) <= 0:
        raise ValueError("anchor sizes must be positive numbers of model pixels")
    if not ratios or min(ratios) <= 0:
        raise ValueError("aspect ratios must be positive (height ÷ width, e.g. 0.5 1 2)")
    return AnchorGenerator(sizes, (ratios,) * len(sizes))


def level_anchors(generator: AnchorGenerator, height: int, width: int) -> list[torch.Tensor]:
    """All anchors of every FPN level (x0 y0 x1 y1, model pixels), via torchvision's grid."""
    grids = feature_sizes(height, width)
    ph, pw = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
    strides = [[torch.tensor(ph // g[0]), torch.tensor(pw // g[1])] for g in grids]
    generator.set_cell_anchors(torch.float32, torch.device("cpu"))
    return generator.grid_anchors([list(g) for g in grids], strides)


def label_anchors(anchors: torch.Tensor, gt_boxes: torch.Tensor, fg: float = 0.7, bg: float = 0.3) -> torch.Tensor:
    """RPN training labels: 1 positive, 0 negative, -1 ignored (torchvision's Matcher,
    including its rule that each nucleus's best anchor is positive)."""
    if len(gt_boxes) == 0:
        return torch.zeros(len(anchors), dtype=torch.int8)
    matched = Matcher(fg, bg, allow_low_quality_matches=True)(box_iou(gt_boxes, anchors))
    labels = torch.full((len(anchors),), IGNORED, dtype=torch.int8)
    labels[matched >= 0] = POSITIVE
    labels[matched == Matcher.BELOW_LOW_THRESHOLD] = NEGATIVE
    return labels


def _touching(a: torch.Tensor, b: torch.Tensor, chunk: int = 65536) -> Generator[Progress, None, torch.Tensor]:
    """Which boxes of ``a`` overlap any box of ``b`` (chunked: a BACH image has ~1.6M
    anchors); yields between chunks so a caller can report progress and cancel."""
    out = torch.zeros(len(a), dtype=torch.bool)
    for s in range(0, len(a), chunk):
        c = a[s:s + chunk, None]
        out[s:s + chunk] = ((c[..., 0] < b[:, 2]) & (c[..., 2] > b[:, 0]) & (c[..., 1] < b[:, 3])
                            & (c[..., 3] > b[:, 1])).any(1)
        yield Progress(min(s + chunk, len(a)), len(a), f"matching {len(a)} boxes with {len(b)}")
    return out


@dataclass
class AnchorView:
    boxes: np.ndarray  # drawn anchors, x0 y0 x1 y1 in image pixels
    levels: np.ndarray  # index into LEVELS per drawn anchor
    labels: np.ndarray | None  # per drawn anchor, None without nuclei
    counts: dict = field(default_factory=dict)  # over all anchors in the region, not only drawn
    total: int = 0
    capped: bool = False


def anchors_in_region(*args, **kwargs) -> AnchorView:
    """:func:`iter_anchors_in_region` run to its end."""
    return drain(iter_anchors_in_region(*args, **kwargs))


def iter_anchors_in_region(generator: AnchorGenerator, image_hw: tuple[int, int], factor: float,
                           region: tuple[float, float, float, float], levels: list[int],
                           gt_boxes: np.ndarray | None = None, fg: float = 0.7, bg: float = 0.3,
                           max_drawn: int = 5000, seed: int = 0) -> Generator[Progress, None, AnchorView]:
    """Anchors whose centre lies in ``region`` (image px, x0 y0 x1 y1) on the chosen levels.

    ``factor`` = image µm/px ÷ model µm/px. Labels use every level in the region, as the
    RPN matches nuclei against all anchors; counts are exact, drawing is capped. Yields
    progress between steps (a napari worker can cancel there)."""
    h, w = (max(1, round(s * factor)) for s in image_hw)
    x0, y0, x1, y1 = (c * factor for c in region)
    yield Progress(0, 3, "anchor grid")
    per_level = level_anchors(generator, h, w)
    everywhere = torch.cat(per_level)
    lvl = torch.cat([torch.full((len(a),), i) for i, a in enumerate(per_level)])
    cx, cy = (everywhere[:, 0] + everywhere[:, 2]) / 2, (everywhere[:, 1] + everywhere[:, 3]) / 2
    inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    boxes, lvl = everywhere[inside], lvl[inside]
    labels = None
    if gt_boxes is not None:
        yield Progress(1, 3, f"labelling {len(boxes)} anchors")
        gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4) * factor
        labels = torch.full((len(boxes),), NEGATIVE, dtype=torch.int8)  # IoU 0 with every nucleus
        gt = gt[(yield from _touching(gt, boxes))]  # the only nuclei that can label anchors of this region
        if len(gt):
            # Match against every anchor of the image that touches them, as the RPN does:
            # a nucleus's "best anchor" may lie outside the region.
            near = yield from _touching(everywhere, gt)
            all_labels = torch.full((len(everywhere),), NEGATIVE, dtype=torch.int8)
            all_labels[near] = label_anchors(everywhere[near], gt, fg, bg)
            labels = all_labels[inside]
    yield Progress(2, 3, "choosing anchors to draw")
    chosen = torch.isin(lvl, torch.tensor(levels))
    boxes, lvl = boxes[chosen], lvl[chosen]
    labels = labels[chosen] if labels is not None else None
    counts = {"anchors": len(boxes)}
    if labels is not None:
        counts.update(positive=int((labels == POSITIVE).sum()), negative=int((labels == NEGATIVE).sum()),
                      ignored=int((labels == IGNORED).sum()))
    idx = np.arange(len(boxes))
    if len(idx) > max_drawn:  # every positive first (they are few and the point), then a sample
        rng = np.random.default_rng(seed)
        pos = idx[labels.numpy() == POSITIVE] if labels is not None else idx[:0]
        rest = np.setdiff1d(idx, pos)
        idx = np.sort(np.concatenate([pos[:max_drawn], rng.choice(rest, max(0, max_drawn - len(pos)), replace=False)]))
    yield Progress(3, 3, f"{len(idx)} of {len(boxes)} anchors to draw")
    return AnchorView((boxes[idx] / factor).numpy(), lvl[idx].numpy(),
                      None if labels is None else labels[idx].numpy(), counts, len(boxes), len(idx) < len(boxes))


@dataclass
class Proposals:
    boxes: np.ndarray  # x0 y0 x1 y1 image pixels
    scores: np.ndarray  # objectness (sigmoid)
    count: int = 0  # proposals at this stage in the region, of which the top k are shown


def iter_proposals(rgb: np.ndarray, model: BachMaskRCNN, image_mpp: float | None,
                   region: tuple[float, float, float, float], k: int = 200,
                   nms_iou: float = 0.7) -> Generator[Progress, None, tuple[Proposals, Proposals]]:
    """Top-k RPN proposals in ``region`` (image px) before and after NMS, tile by tile."""
    model = for_inference(model)
    cfg = model.config
    x0, y0, x1, y1 = (int(round(c)) for c in region)
    if x1 <= x0 or y1 <= y0:
        raise ValueError("the region is empty: zoom or pan so the image is in view, or draw a box")

    def rpn(crops: list[torch.Tensor], regions: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [rpn_one(crop) for crop in crops]

    def rpn_one(crop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _ = model.transform([crop])
        feats = list(model.backbone(batch.tensors).values())
        objectness, deltas = model.rpn.head(feats)
        anchors = model.rpn.anchor_generator(batch, feats)[0]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = clip_boxes_to_image(model.rpn.box_coder.decode(deltas, [anchors]).view(-1, 4), batch.image_sizes[0])
        scores = objectness.view(-1).sigmoid()
        top = scores.topk(min(cfg.rpn_pre_nms_test, len(scores))).indices
        return boxes[top], scores[top]

    geometry, outputs = yield from run_tiled(rgb[y0:y1, x0:x1], model, image_mpp, rpn)
    all_boxes, all_scores = [torch.zeros(0, 4)], [torch.zeros(0)]
    for tile, (boxes, scores), _ in outputs:
        boxes, own = geometry.to_image(boxes, tile)
        all_boxes.append(boxes[own])
        all_scores.append(scores.float().cpu()[own])
    boxes, scores = torch.cat(all_boxes), torch.cat(all_scores)
    order = scores.argsort(descending=True)
    kept = nms(boxes, scores, nms_iou)
    offset = np.array([x0, y0, x0, y0], np.float32)

    def to_image(idx, count: int) -> Proposals:
        return Proposals(boxes[idx].numpy() + offset, scores[idx].numpy(), count)

    return to_image(order[:k], len(order)), to_image(kept[:k], len(kept))
