"""Cached candidate detections and their instant re-filtering.

The network runs once; score threshold and NMS IoU are applied here to the cached
candidates, which is why the sliders in the widget respond without re-running the model.

Each candidate keeps one label id for good (its index + 1), so a slider step only makes
nuclei appear or disappear (their colours stay), and the user's edits, recorded by id in
:class:`~napari_bach.edit.Edits`, survive every re-filter.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from torchvision.ops import nms

from .config import BACH_CLASSES
from .paste import paste_labels
from .pixelsize import PixelSize

if TYPE_CHECKING:
    from .edit import Edits


@dataclass
class Segmentation:
    """What the user sees: instance labels and, per nucleus, its box and score."""

    labels: np.ndarray  # H×W int32, 0 = background
    ids: np.ndarray  # label id of each row
    boxes: np.ndarray  # K×4 x0 y0 x1 y1 (image pixels)
    scores: np.ndarray  # K (NaN for nuclei drawn by hand)
    pixel_size: PixelSize = PixelSize(None)

    def consecutive(self) -> "Segmentation":
        """The same nuclei numbered 1..K in row order, for files other tools read."""
        lut = np.zeros(int(self.labels.max(initial=0)) + 1, np.int32)
        new_ids = np.arange(1, len(self.ids) + 1, dtype=np.int64)
        lut[self.ids] = new_ids
        return Segmentation(lut[self.labels], new_ids, self.boxes, self.scores, self.pixel_size)


@dataclass
class Detections:
    """All candidates above the model's candidate floor, with box-local mask crops."""

    image_shape: tuple[int, int]
    boxes: np.ndarray  # N×4 x0 y0 x1 y1 in image pixels
    scores: np.ndarray  # N
    offsets: np.ndarray  # N×2 (y0, x0) of each crop
    crops: list[np.ndarray]  # N boolean crops
    tissue_probs: np.ndarray | None = None  # per class, None when the head is untrained
    candidate_nms: float = 1.0  # NMS already applied to the candidates
    score_floor: float = 0.0  # candidates below this score were never computed
    pixel_size: PixelSize = PixelSize(None)  # of the image the candidates are in
    classes: tuple[str, ...] = BACH_CLASSES  # order of tissue_probs

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, score_threshold: float, nms_iou: float) -> np.ndarray:
        """Indices of candidates kept by the threshold and NMS, best score first."""
        idx = np.flatnonzero(self.scores >= score_threshold)
        if idx.size == 0:
            return idx
        if nms_iou < self.candidate_nms:
            keep = nms(torch.from_numpy(self.boxes[idx]).float(), torch.from_numpy(self.scores[idx]).float(), nms_iou)
            return idx[keep.numpy()]
        return idx[np.argsort(-self.scores[idx], kind="stable")]

    @cached_property
    def areas(self) -> np.ndarray:
        """Mask area of each candidate in pixels (before overlaps are resolved)."""
        return np.array([int(c.sum()) for c in self.crops], np.int64)

    def refilter(self, score_threshold: float, nms_iou: float, edits: Edits | None = None,
                 min_area: float = 0.0) -> Segmentation:
        """Labels and boxes for new thresholds, without running the network.

        ``min_area`` (pixels): smaller candidates, and what is left visible of a larger
        one that others cover, are fragments, not nuclei. With ``edits``, nuclei the user
        deleted or redrew stay as the user left them, and hand-drawn nuclei are pasted
        over the model's (whatever their size)."""
        order = self.select(score_threshold, nms_iou)
        if min_area > 0 and order.size:
            order = order[self.areas[order] >= min_area]
        if edits is not None and edits.removed:
            order = order[~np.isin(order + 1, np.fromiter(edits.removed, np.int64))]
        labels, written = paste_labels(self.image_shape, self.offsets, self.crops, order)
        ids, boxes, scores = order + 1, self.boxes[order], self.scores[order]
        visible = written >= max(1.0, min_area)  # drop empty, covered and fragment-sized remains
        if min_area > 0:
            for k in order[(written > 0) & ~visible]:
                _erase(labels, k + 1, self.offsets[k], self.crops[k].shape)
        if edits is not None and edits.drawn:  # hand-drawn nuclei may cover model ones
            ids, boxes, scores = edits.paste_onto(labels, ids, boxes, scores)
            visible = (np.bincount(labels.ravel(), minlength=int(ids.max(initial=0)) + 1) > 0)[ids]
        return Segmentation(labels, ids[visible], boxes[visible], scores[visible], self.pixel_size)

    @classmethod
    def concatenate(cls, parts: list["Detections"], image_shape: tuple[int, int], **kw) -> "Detections":
        boxes = np.concatenate([p.boxes for p in parts]) if parts else np.zeros((0, 4), np.float32)
        scores = np.concatenate([p.scores for p in parts]) if parts else np.zeros(0, np.float32)
        offsets = np.concatenate([p.offsets for p in parts]) if parts else np.zeros((0, 2), np.int64)
        crops = [c for p in parts for c in p.crops]
        return cls(image_shape, boxes.astype(np.float32), scores.astype(np.float32), offsets, crops, **kw)


def _erase(labels: np.ndarray, label: int, offset: np.ndarray, shape: tuple[int, int]) -> None:
    """Clear ``label``'s pixels within its crop's window (a fragment left by overlaps)."""
    y0, x0 = max(0, int(offset[0])), max(0, int(offset[1]))
    window = labels[y0:int(offset[0]) + shape[0], x0:int(offset[1]) + shape[1]]
    window[window == label] = 0
