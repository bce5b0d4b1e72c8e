"""Cached candidate detections and their instant re-filtering.

The network runs once; score threshold and NMS IoU are applied here to the cached
candidates, which is why the sliders in the widget respond without re-running the model.

Each candidate keeps one label id for good (its index + 1), so a slider step only makes
nuclei appear or disappear (their colours stay), and the user's edits, recorded by id in
:class:`~napari_bach.edit.Edits`, survive every re-filter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    scale_estimate: float | None = None  # µm/px it was segmented at when not its own (napari_bach.scale)
    classes: tuple[str, ...] = BACH_CLASSES  # order of tissue_probs
    _ranked_by_iou: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def segmented_mpp(self) -> float | None:
        """The image's µm/px, else the scale its nuclei were segmented at: what a minimum
        area in µm² is converted at."""
        return self.pixel_size.mpp or self.scale_estimate

    def select(self, score_threshold: float, nms_iou: float) -> np.ndarray:
        """Indices of candidates kept by the threshold and NMS, best score first.

        Greedy NMS keeps or drops a box by the better-scored boxes only, so the boxes it
        keeps above a threshold are those it keeps over all candidates, cut at that score:
        NMS runs once per IoU, and a higher threshold gives a prefix of a lower one's."""
        ranked = self._ranked(nms_iou)
        return ranked[self.scores[ranked] >= score_threshold]

    def _ranked(self, nms_iou: float) -> np.ndarray:
        nms_iou = min(float(nms_iou), self.candidate_nms)
        cache = self._ranked_by_iou
        if nms_iou not in cache:
            if nms_iou < self.candidate_nms and len(self):
                keep = nms(torch.from_numpy(self.boxes).float(), torch.from_numpy(self.scores).float(), nms_iou)
                cache[nms_iou] = keep.numpy()
            else:
                cache[nms_iou] = np.argsort(-self.scores, kind="stable")
        return cache[nms_iou]

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
        over the model's (whatever their size). A slider uses :class:`LiveLabels`, which
        gives the same result for the nuclei that change only."""
        order = self.kept(score_threshold, nms_iou, edits, min_area)
        labels, written = paste_labels(self.image_shape, self.offsets, self.crops, order)
        return self._segmentation(order, labels, written, edits, min_area)

    def kept(self, score_threshold: float, nms_iou: float, edits: Edits | None = None,
             min_area: float = 0.0) -> np.ndarray:
        """The candidates a re-filter pastes, best first: thresholds, NMS, minimum area and
        the user's deletions applied."""
        order = self.select(score_threshold, nms_iou)
        if min_area > 0 and order.size:
            order = order[self.areas[order] >= min_area]
        if edits is not None and edits.removed:
            order = order[~np.isin(order + 1, np.fromiter(edits.removed, np.int64))]
        return order

    def _segmentation(self, order: np.ndarray, labels: np.ndarray, written: np.ndarray,
                      edits: Edits | None, min_area: float) -> Segmentation:
        """``labels`` (``order`` pasted, modified here) without fragments, with the drawn nuclei."""
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


class LiveLabels:
    """Re-filters one :class:`Detections` again and again, as a slider moves.

    Candidates are pasted best-first and each only takes free pixels, so the labels of a
    kept list that extends (or cuts) the previous one are the previous labels with the
    added candidates pasted (or the cut ones erased): a score-slider step costs the
    nuclei that appear or disappear, not the image. Anything else is pasted afresh."""

    def __init__(self, det: Detections) -> None:
        self.det = det
        self._order = np.zeros(0, np.int64)
        self._pasted: np.ndarray | None = None  # labels before fragments are erased and edits pasted
        self._written = np.zeros(0, np.int64)

    def refilter(self, score_threshold: float, nms_iou: float, edits: Edits | None = None,
                 min_area: float = 0.0) -> Segmentation:
        """What :meth:`Detections.refilter` returns for these thresholds."""
        order = self.det.kept(score_threshold, nms_iou, edits, min_area)
        self._paste(order)
        return self.det._segmentation(order, self._pasted.copy(), self._written, edits, min_area)

    def _paste(self, order: np.ndarray) -> None:
        det, old = self.det, self._order
        n = min(len(order), len(old))
        if self._pasted is None or not np.array_equal(order[:n], old[:n]):
            self._pasted, self._written = paste_labels(det.image_shape, det.offsets, det.crops, order)
        elif len(order) < len(old):  # the cut candidates only ever took free pixels
            for k in old[n:]:
                _erase(self._pasted, k + 1, det.offsets[k], det.crops[k].shape)
            self._written = self._written[:n]
        elif len(order) > len(old):
            _, more = paste_labels(det.image_shape, det.offsets, det.crops, order[n:], into=self._pasted)
            self._written = np.concatenate([self._written, more])
        self._order = order
