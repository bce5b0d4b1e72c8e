"""Correction helpers for nucleus labels (Qt-free): what a pathologist does by hand.

Every helper works in place on the label image the user edits and returns what changed,
and :func:`segmentation_from_labels` rebuilds boxes and scores from the edited labels so
the box layer and the per-nucleus table follow the edits.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from .detections import Segmentation


def next_free_label(labels: np.ndarray) -> int:
    """The id to paint a new nucleus with."""
    return int(labels.max()) + 1 if labels.size else 1


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


def segmentation_from_labels(labels: np.ndarray, scores: dict[int, float] | None = None) -> Segmentation:
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
                        np.array([scores.get(int(i), np.nan) for i in ids], np.float32))
