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
from .predict import Progress, drain, relayed, run_tiled

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
    """RPN training labels from the dense IoU matrix (torchvision's ``Matcher``, including its
    rule that each nucleus's best anchor is positive): the reference for a few anchors."""
    if len(gt_boxes) == 0:
        return torch.zeros(len(anchors), dtype=torch.int8)
    return _labels(Matcher(fg, bg, allow_low_quality_matches=True)(box_iou(gt_boxes, anchors)))


def _labels(matched: torch.Tensor) -> torch.Tensor:
    labels = torch.full((len(matched),), IGNORED, dtype=torch.int8)
    labels[matched >= 0] = POSITIVE
    labels[matched == Matcher.BELOW_LOW_THRESHOLD] = NEGATIVE
    return labels


# Anchors a region may hold, with the margin its labels need: ~50 MB of boxes. A larger
# view (all of a BACH image on P2 with five sizes is ~8 million, and labelling them
# against every nucleus densely took napari past 19 GB) is shrunk about its centre.
MAX_ANCHORS = 3_000_000
MATCH_CHUNK = 256  # nuclei labelled per step: bounded memory, and Cancel is heard between steps


@dataclass(frozen=True)
class _Grid:
    """The image's anchor grid per FPN level: cells, strides (model px), each cell's anchors."""

    shapes: list[tuple[int, int]]
    strides: list[tuple[int, int]]
    cells: list[torch.Tensor]  # a × 4 per level, centred on the cell's point

    @classmethod
    def of(cls, generator: AnchorGenerator, height: int, width: int) -> "_Grid":
        shapes = feature_sizes(height, width)
        ph, pw = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
        generator.set_cell_anchors(torch.float32, torch.device("cpu"))
        return cls(shapes, [(ph // h, pw // w) for h, w in shapes], list(generator.cell_anchors))

    def reach(self, level: int | None = None) -> float:
        """How far an anchor of ``level`` (None: any level) reaches from its cell's point (model px)."""
        cells = self.cells if level is None else [self.cells[level]]
        return float(max(c.abs().max() for c in cells))

    def span(self, level: int, box) -> tuple[int, int, int, int]:
        """Cells (y0, y1, x0, x1, half-open) of ``level`` whose point lies in ``box`` (x0 y0 x1 y1)."""
        (h, w), (sy, sx) = self.shapes[level], self.strides[level]
        x0, x1 = (min(w, max(0, math.ceil(v / sx))) for v in (box[0], box[2]))
        y0, y1 = (min(h, max(0, math.ceil(v / sy))) for v in (box[1], box[3]))
        return y0, max(y0, y1), x0, max(x0, x1)

    def count(self, boxes) -> int:
        """Anchors whose point lies in ``boxes`` (one box per level)."""
        spans = (self.span(i, box) for i, box in enumerate(boxes))
        return sum((y1 - y0) * (x1 - x0) * len(c) for (y0, y1, x0, x1), c in zip(spans, self.cells))

    def margins(self, box) -> list[tuple[float, float, float, float]]:
        """Per level, ``box`` grown by what labelling its anchors needs: the anchors of
        that level that can overlap a nucleus any anchor of the box touches."""
        far = self.reach()
        return [_grow(box, far + self.reach(i)) for i in range(len(self.cells))]

    def part(self, boxes) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        """The anchors whose point lies in ``boxes`` (one box per level), in torchvision's
        order (level, row, column, shape), their levels, and the part's grid shapes and
        strides for sparse matching."""
        boxes_out, levels, shapes = [], [], []
        for i, (cell, box) in enumerate(zip(self.cells, boxes)):
            y0, y1, x0, x1 = self.span(i, box)
            sy, sx = self.strides[i]
            ys, xs = torch.meshgrid(torch.arange(y0, y1) * sy, torch.arange(x0, x1) * sx, indexing="ij")
            shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).float()
            boxes_out.append((shifts + cell.view(1, -1, 4)).reshape(-1, 4))
            levels.append(torch.full((len(boxes_out[-1]),), i))
            shapes.append((y1 - y0, x1 - x0))
        return torch.cat(boxes_out), torch.cat(levels), shapes, self.strides


def _grow(box, by: float) -> tuple[float, float, float, float]:
    return box[0] - by, box[1] - by, box[2] + by, box[3] + by


def fit_region(grid: _Grid, region, max_anchors: int) -> tuple[tuple[float, float, float, float], bool]:
    """``region`` (model px), shrunk about its centre until it and the margin its labels
    need hold at most ``max_anchors``; and whether it was shrunk."""
    box, shrunk = tuple(float(c) for c in region), False
    for _ in range(20):
        n = grid.count(grid.margins(box))
        if n <= max_anchors:
            break
        k = 0.95 * math.sqrt(max_anchors / n)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        hw, hh = (box[2] - box[0]) / 2 * k, (box[3] - box[1]) / 2 * k
        box, shrunk = (cx - hw, cy - hh, cx + hw, cy + hh), True
    return box, shrunk


@dataclass
class AnchorView:
    boxes: np.ndarray  # drawn anchors, x0 y0 x1 y1 in image pixels
    levels: np.ndarray  # index into LEVELS per drawn anchor
    labels: np.ndarray | None  # per drawn anchor, None without nuclei
    counts: dict = field(default_factory=dict)  # over all anchors in the region, not only drawn
    total: int = 0
    capped: bool = False
    region: tuple[float, float, float, float] = (0, 0, 0, 0)  # the region shown, image px
    shrunk: bool = False  # the region asked for held more than ``limit`` anchors: its centre is shown
    limit: int = 0


def anchors_in_region(*args, **kwargs) -> AnchorView:
    """:func:`iter_anchors_in_region` run to its end."""
    return drain(iter_anchors_in_region(*args, **kwargs))


def iter_anchors_in_region(generator: AnchorGenerator, image_hw: tuple[int, int], factor: float,
                           region: tuple[float, float, float, float], levels: list[int],
                           gt_boxes: np.ndarray | None = None, fg: float = 0.7, bg: float = 0.3,
                           max_drawn: int = 5000, seed: int = 0, max_anchors: int | None = None
                           ) -> Generator[Progress, None, AnchorView]:
    """Anchors whose centre lies in ``region`` (image px, x0 y0 x1 y1) on the chosen levels.

    ``factor`` = image µm/px ÷ model µm/px. Labels are the RPN's: every level, and every
    anchor of the image a nucleus touching the region overlaps (its best anchor may lie
    outside), matched sparsely (:func:`napari_bach.rpn.iter_sparse_match`). Counts are exact,
    drawing is capped at ``max_drawn``, and the work at ``max_anchors`` (default
    :data:`MAX_ANCHORS`): a larger region is
    shrunk about its centre (``AnchorView.shrunk``). Yields progress between steps (a napari
    worker can cancel there)."""
    from .rpn import iter_sparse_match

    h, w = (max(1, round(s * factor)) for s in image_hw)
    yield Progress(0, 3, "anchor grid")
    grid = _Grid.of(generator, h, w)
    max_anchors = max_anchors or MAX_ANCHORS
    box, shrunk = fit_region(grid, tuple(c * factor for c in region), max_anchors)
    reach = grid.reach()
    labels = None
    if gt_boxes is None:
        boxes, lvl, _, _ = grid.part([box] * len(grid.cells))
    else:
        gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4) * factor
        near = _grow(box, reach)  # where the region's anchors reach
        gt = gt[(gt[:, 0] < near[2]) & (gt[:, 2] > near[0]) & (gt[:, 1] < near[3]) & (gt[:, 3] > near[1])]
        domain = [box] * len(grid.cells)  # and every anchor those nuclei overlap, within a bounded margin
        if len(gt):
            lo, hi = gt[:, :2].min(0).values.tolist(), gt[:, 2:].max(0).values.tolist()
            domain = []
            for i, outer in enumerate(grid.margins(box)):
                r = grid.reach(i)
                domain.append((max(outer[0], min(box[0], lo[0] - r)), max(outer[1], min(box[1], lo[1] - r)),
                               min(outer[2], max(box[2], hi[0] + r)), min(outer[3], max(box[3], hi[1] + r))))
        anchors, lvl, shapes, strides = grid.part(domain)
        yield Progress(1, 3, f"labelling {len(anchors):,} anchors against {len(gt)} nuclei")
        cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
        inside = (cx >= box[0]) & (cx < box[2]) & (cy >= box[1]) & (cy < box[3])
        all_labels = torch.full((len(anchors),), NEGATIVE, dtype=torch.int8)  # IoU 0 with every nucleus
        if len(gt):
            matching = iter_sparse_match(Matcher(fg, bg, allow_low_quality_matches=True), gt, anchors, shapes,
                                         strides, [len(c) for c in grid.cells], MATCH_CHUNK)
            matched, _ = yield from relayed(matching, lambda p: Progress(
                1 + p.done / p.total, 3, f"labelling anchors: {p.done} of {p.total} nuclei"))
            all_labels = _labels(matched)
        boxes, lvl, labels = anchors[inside], lvl[inside], all_labels[inside]
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
        positive = labels.numpy() == POSITIVE if labels is not None else np.zeros(len(idx), bool)
        pos, rest = idx[positive], idx[~positive]
        idx = np.sort(np.concatenate([pos[:max_drawn], rng.choice(rest, max(0, max_drawn - len(pos)), replace=False)]))
    yield Progress(3, 3, f"{len(idx)} of {len(boxes)} anchors to draw")
    return AnchorView((boxes[idx] / factor).numpy(), lvl[idx].numpy(),
                      None if labels is None else labels[idx].numpy(), counts, len(boxes), len(idx) < len(boxes),
                      tuple(c / factor for c in box), shrunk, max_anchors)


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
