"""QuPath GeoJSON: one detection per nucleus, a closed polygon in image pixels.

QuPath reads it with File › Import objects (or by dropping the file on the image):
``objectType: detection``, the nucleus score and every measurement. Slides write it
block by block (:mod:`napari_bach.slide`); single images at once (:func:`write_geojson`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .detections import Segmentation
from .measure import COLUMNS


def polygons(labels: np.ndarray, ids: np.ndarray, offset: tuple[int, int]) -> list[list[list[float]]]:
    """One closed outer ring per nucleus (x, y in level-0 pixels), from its mask's contour."""
    from scipy import ndimage
    from skimage.measure import find_contours

    rings = []
    slices = ndimage.find_objects(labels)
    for i in ids:
        sl = slices[i - 1]
        mask = np.pad(labels[sl] == i, 1)
        contour = _corners(max(find_contours(mask.astype(np.uint8), 0.5), key=len))
        ys = contour[:, 0] - 1 + sl[0].start + offset[0]
        xs = contour[:, 1] - 1 + sl[1].start + offset[1]
        ring = np.stack([xs, ys], axis=1).round(2).tolist()
        if ring[0] != ring[-1]:
            ring.append(ring[0])
        rings.append(ring)
    return rings


def _corners(contour: np.ndarray) -> np.ndarray:
    """The contour's corners only: points on a straight run (marching squares puts one on
    every pixel edge) say nothing. Exact, unlike Douglas-Peucker, and vectorised: the
    Python-loop simplification cost more than segmenting on slides."""
    d = np.diff(contour, axis=0)  # closed: last point == first
    turn = np.abs(d[:, 0] * np.roll(d, 1, axis=0)[:, 1] - d[:, 1] * np.roll(d, 1, axis=0)[:, 0]) > 1e-9
    keep = np.append(turn, False)
    if keep.sum() < 3:
        return contour
    corners = contour[keep]
    return np.vstack([corners, corners[:1]])


def geojson_features(rings: list, table: dict, ids, model_name: str) -> list[dict]:
    """QuPath detections: a polygon, ``objectType: detection``, measurements and score;
    ``ids`` are the nuclei's label ids, in the order of ``rings`` and ``table``'s rows."""
    features = []
    keys = [c for c in COLUMNS if c not in ("index", "box_x0", "box_y0", "box_x1", "box_y1")]
    for k, (ring, label) in enumerate(zip(rings, ids)):
        label = int(label)
        measurements = {c: float(table[c][k]) for c in keys if np.isfinite(table[c][k])}
        features.append({"type": "Feature", "id": f"nucleus-{label}",
                         "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "detection", "name": f"nucleus {label}",
                                        "classification": {"name": "Nucleus", "color": [0, 200, 0]},
                                        "measurements": measurements, "label": label,
                                        "model": model_name}})
    return features


def write_geojson(path: str | Path, seg: Segmentation, table: dict, model_name: str = "") -> Path:
    """A FeatureCollection of the nuclei of one image (``seg`` numbered as ``table``)."""
    path = Path(path)
    rings = polygons(seg.labels, seg.ids, (0, 0)) if len(seg.ids) else []
    features = geojson_features(rings, table, seg.ids, model_name)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path
