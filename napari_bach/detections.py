"""Cached candidate detections and their instant re-filtering.

The network runs once; score threshold and NMS IoU are applied here to the cached
candidates, which is why the sliders in the widget respond without re-running the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.ops import nms

from .paste import paste_labels


@dataclass
class Segmentation:
    """What the user sees: instance labels and, per nucleus, its box and score."""

    labels: np.ndarray  # H×W int32, 0 = background
    ids: np.ndarray  # label id of each row
    boxes: np.ndarray  # K×4 x0 y0 x1 y1 (image pixels)
    scores: np.ndarray  # K


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
    meta: dict = field(default_factory=dict)

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

    def refilter(self, score_threshold: float, nms_iou: float) -> Segmentation:
        """Labels and boxes for new thresholds, without running the network."""
        order = self.select(score_threshold, nms_iou)
        labels = paste_labels(self.image_shape, self.offsets, self.crops, order)
        present = np.zeros(len(order) + 1, bool)
        present[np.unique(labels)] = True
        visible = present[1:]  # drop candidates whose mask was empty or fully covered
        order = order[visible]
        if not visible.all():  # renumber so ids stay consecutive
            lut = np.zeros(len(visible) + 1, np.int32)
            lut[1:][visible] = np.arange(1, len(order) + 1)
            labels = lut[labels]
        ids = np.arange(1, len(order) + 1)
        return Segmentation(labels, ids, self.boxes[order], self.scores[order])

    @classmethod
    def concatenate(cls, parts: list["Detections"], image_shape: tuple[int, int], **kw) -> "Detections":
        boxes = np.concatenate([p.boxes for p in parts]) if parts else np.zeros((0, 4), np.float32)
        scores = np.concatenate([p.scores for p in parts]) if parts else np.zeros(0, np.float32)
        offsets = np.concatenate([p.offsets for p in parts]) if parts else np.zeros((0, 2), np.int64)
        crops = [c for p in parts for c in p.crops]
        return cls(image_shape, boxes.astype(np.float32), scores.astype(np.float32), offsets, crops, **kw)
