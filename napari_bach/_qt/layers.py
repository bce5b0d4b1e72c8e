"""Segmentation results as napari LayerDataTuples (plain data, no napari import).

Result layers carry ``metadata["napari_bach"] = {"role": ..., "source": image name}`` so the
widget can find and replace them on re-run instead of stacking duplicates.
"""
from __future__ import annotations

import numpy as np

from ..detections import Segmentation

ROLE_KEY = "napari_bach"
OUTLINE_PX = 1  # napari Labels contour thickness (screen-independent data pixels)


def box_corners(boxes: np.ndarray) -> list[np.ndarray]:
    """x0 y0 x1 y1 boxes -> napari rectangles (4 corners in row, column order)."""
    return [np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], np.float32) for x0, y0, x1, y1 in boxes]


def result_layers(seg: Segmentation, source: str, placement: dict, features: dict | None = None,
                  metadata: dict | None = None, boxes: bool = True, outlines: bool = True,
                  show_boxes: bool = False) -> list[tuple | None]:
    """Labels of nuclei (with the per-nucleus table) and Shapes of their boxes (None
    without ``boxes``: a slider step updates the labels alone).

    ``placement`` holds the source image's ``scale`` and ``units`` so overlays line up.
    Nuclei are drawn as outlines (napari's label contours, as QuPath and stardist-napari
    users see them) unless ``outlines`` is False; boxes are hidden unless ``show_boxes``."""
    meta = dict(metadata or {})
    table = features if features is not None else {"index": seg.ids, "score": seg.scores}
    labels = (seg.labels, {
        "name": f"{source} nuclei", **placement, "features": table, "opacity": 0.9 if outlines else 0.5,
        "contour": OUTLINE_PX if outlines else 0,
        "metadata": {**meta, ROLE_KEY: {"role": "nuclei", "source": source}},
    }, "labels")
    if not boxes:
        return [labels, None]
    # (corners, type) pairs: assigning bare arrays to an existing layer makes polygons
    rectangles = [(c, "rectangle") for c in box_corners(seg.boxes)]
    box_layer = (rectangles, {
        "name": f"{source} boxes", **placement,
        "features": {"index": seg.ids, "score": seg.scores}, "edge_color": "yellow",
        "face_color": "transparent", "edge_width": 1.0, "visible": show_boxes and len(seg.ids) <= 3000,
        "text": {"string": "{score:.2f}", "size": 8, "color": "yellow", "visible": False},
        "metadata": {ROLE_KEY: {"role": "boxes", "source": source}},
    }, "shapes")
    return [labels, box_layer]


def write_changed_nuclei(layer, labels: np.ndarray) -> int:
    """Write into a Labels layer only the pixels that differ from ``labels``, one nucleus
    at a time, as one undo step. napari redraws the bounding box of what a write changed
    (and recomputes outlines there): one write of nuclei scattered over the image would
    redraw all of it, so each nucleus that appears or disappears is its own small redraw.
    Returns how many nuclei changed."""
    data = np.asarray(layer.data)
    changed = np.flatnonzero(data.ravel() != labels.ravel())
    if not changed.size:
        return 0
    new, old = labels.ravel()[changed], data.ravel()[changed]
    nucleus = np.where(new != 0, new, old)
    order = np.argsort(nucleus, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(nucleus[order])) + 1)
    with layer.block_history():
        for group in groups:
            layer.data_setitem(np.unravel_index(changed[group], data.shape), new[group])
    return len(groups)


def tissue_map_layer(cells: np.ndarray, probs: np.ndarray, classes: tuple[str, ...], source: str,
                     placement: dict) -> tuple:
    """A Shapes layer of a tissue map: each field's cell (N×4 ``y0, x0, y1, x1``) filled with
    its class's colour, the class and its probabilities as features."""
    from ..geojson import CLASS_COLOURS

    names = [classes[i] for i in probs.argmax(1)]
    faces = [(*(c / 255 for c in CLASS_COLOURS.get(n, (128, 128, 128))), 0.3) for n in names]
    rectangles = [(np.array([[y0, x0], [y0, x1], [y1, x1], [y1, x0]], np.float32), "rectangle")
                  for y0, x0, y1, x1 in cells]
    features = {"tissue_class": names, **{f"p_{c}": probs[:, i] for i, c in enumerate(classes)}}
    return (rectangles, {
        "name": f"{source} tissue map", **placement, "features": features, "face_color": faces,
        "edge_color": "white", "edge_width": 0.0, "opacity": 1.0,
        "text": {"string": "{tissue_class}", "size": 10, "color": "white"},
        "metadata": {ROLE_KEY: {"role": "tissue map", "source": source}},
    }, "shapes")
