"""Correction helpers for nucleus labels (Qt-free): what a pathologist does by hand.

Every helper works in place on the label image the user edits and returns what changed,
and :func:`segmentation_from_labels` rebuilds boxes and scores from the edited labels so
the box layer and the per-nucleus table follow the edits. :class:`Edits` remembers those
edits so that re-filtering the model's candidates (the score and NMS sliders) keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from .detections import Segmentation
from .pixelsize import PixelSize


def next_free_label(labels: np.ndarray, floor: int = 1) -> int:
    """The id to paint a new nucleus with: above every id in use and at least ``floor``
    (a result's first id not reserved for one of the model's candidates)."""
    return max(int(labels.max(initial=0)) + 1, floor)


def delete_label(labels: np.ndarray, label: int) -> int:
    """Erase one nucleus; returns how many pixels it had."""
    if label <= 0:
        raise ValueError("choose a nucleus (label > 0) to delete")
    mask = labels == label
    labels[mask] = 0
    return int(mask.sum())


def remove_small(labels: np.ndarray, min_area_px: int) -> list[int]:
    """Erase nuclei smaller than ``min_area_px`` pixels; returns their ids."""
    areas = np.bincount(labels.ravel())
    small = np.flatnonzero((areas < min_area_px) & (areas > 0))
    small = small[small > 0]
    if small.size:
        labels[np.isin(labels, small)] = 0
    return small.tolist()


def relabel_consecutive(labels: np.ndarray) -> dict[int, int]:
    """Renumber ids to 1..N in place; returns old -> new."""
    new, forward, _ = relabel_sequential(labels)
    labels[...] = new
    return {int(o): int(n) for o, n in zip(forward.in_values, forward.out_values) if o > 0}


def segmentation_from_labels(labels: np.ndarray, scores: dict[int, float] | None = None,
                             pixel_size: PixelSize = PixelSize(None)) -> Segmentation:
    """Boxes and scores of the nuclei now in ``labels``; hand-painted ones get NaN scores."""
    scores = scores or {}
    ids, boxes = [], []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        ids.append(i)
        boxes.append((sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    ids = np.array(ids, np.int64)
    return Segmentation(labels, ids, np.array(boxes, np.float32).reshape(-1, 4),
                        np.array([scores.get(int(i), np.nan) for i in ids], np.float32), pixel_size)


@dataclass
class Edits:
    """The user's hand edits of a result, by label id, merged into every re-filter.

    ``removed``: ids of model candidates the user deleted or redrew (never pasted again);
    ``drawn``: id -> (y0, x0, mask crop, score) of nuclei as the user left them: painted
    from scratch (score NaN) or model nuclei the user changed (their score kept)."""

    first_free: int  # ids below this belong to model candidates
    removed: set[int] = field(default_factory=set)
    drawn: dict[int, tuple[int, int, np.ndarray, float]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.removed or self.drawn)

    def absorb(self, shown: np.ndarray, current: np.ndarray, scores: np.ndarray) -> int:
        """Record what differs between the labels last shown and the user's ``current``
        ones; ``scores`` are the candidates' (index = id - 1). Returns how many nuclei changed."""
        changed = shown != current
        if not changed.any():
            return 0
        ids = np.union1d(shown[changed], current[changed])
        ids = ids[ids > 0]
        was_shown = np.bincount(shown.ravel(), minlength=int(ids.max()) + 1) > 0
        ys, xs = np.nonzero(np.isin(current, ids))  # every pixel of the changed nuclei, not only new ones
        owner = current[ys, xs]
        for i in ids.tolist():
            score = self.drawn.pop(i, (0, 0, None, np.nan))[3]
            if i < self.first_free:
                self.removed.add(i)
                if was_shown[i]:  # a model nucleus the user redrew keeps its score
                    score = float(scores[i - 1])
            sel = owner == i
            if not sel.any():
                continue  # deleted
            y, x = ys[sel], xs[sel]
            crop = np.zeros((y.max() - y.min() + 1, x.max() - x.min() + 1), bool)
            crop[y - y.min(), x - x.min()] = True
            self.drawn[i] = (int(y.min()), int(x.min()), crop, score)
        return len(ids)

    def carried_to(self, old_boxes: np.ndarray, new_boxes: np.ndarray, first_free: int, iou: float = 0.5) -> "Edits":
        """These edits for a new run's candidates: drawn nuclei as drawn, and every new
        candidate that overlaps a nucleus the user deleted (box IoU > ``iou``) deleted again."""
        import torch
        from torchvision.ops import box_iou

        carried = Edits(first_free)
        for y0, x0, crop, score in self.drawn.values():
            carried.drawn[first_free + len(carried.drawn)] = (y0, x0, crop, score)
        deleted = np.array(sorted(self.removed - set(self.drawn)), np.int64)
        if deleted.size and len(new_boxes):
            overlap = box_iou(torch.as_tensor(new_boxes, dtype=torch.float32),
                              torch.as_tensor(old_boxes[deleted - 1], dtype=torch.float32))
            carried.removed = set((np.flatnonzero((overlap > iou).any(1).numpy()) + 1).tolist())
        return carried

    def paste_onto(self, labels: np.ndarray, ids: np.ndarray, boxes: np.ndarray, scores: np.ndarray):
        """Paste drawn nuclei over the model's (the user wins contested pixels); returns
        ids, boxes and scores with the drawn nuclei appended."""
        extra_ids, extra_boxes, extra_scores = [], [], []
        for i, (y0, x0, crop, score) in self.drawn.items():
            labels[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop] = i
            extra_ids.append(i)
            extra_boxes.append((x0, y0, x0 + crop.shape[1], y0 + crop.shape[0]))
            extra_scores.append(score)
        return (np.concatenate([ids, np.array(extra_ids, np.int64)]),
                np.concatenate([boxes, np.array(extra_boxes, np.float32).reshape(-1, 4)]),
                np.concatenate([scores, np.array(extra_scores, np.float32)]))
