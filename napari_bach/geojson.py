"""QuPath GeoJSON: one detection per nucleus, a closed polygon in image pixels; tissue
maps as annotations, one rectangle per field with its class and probabilities.

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


def polygons(labels: np.ndarray, ids: np.ndarray, offset: tuple[int, int]) -> list[list[list[list[float]]]]:
    """Closed outer rings per nucleus (x, y in level-0 pixels), one per connected piece of
    its mask: a label painted in scattered strokes is every piece (a MultiPolygon), not the
    largest one alone.

    The labels are padded once (a nucleus at the edge still gets a closed contour) and the
    corner filter runs once over all contours: per-nucleus numpy calls cost more than the
    contours themselves on slides."""
    from scipy import ndimage
    from skimage.measure import find_contours

    if len(ids) == 0:
        return []
    padded = np.pad(labels, 1)
    slices = ndimage.find_objects(labels)
    contours, owner = [], []
    for k, i in enumerate(ids):
        ys, xs = slices[i - 1]  # in ``padded`` this window has a one-pixel ring around it
        mask = (padded[ys.start : ys.stop + 2, xs.start : xs.stop + 2] == i).view(np.uint8)
        pieces, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for piece in range(1, n + 1):
            part = mask if n == 1 else (pieces == piece).view(np.uint8)
            contour = max(find_contours(part, 0.5), key=len)
            contours.append(contour + (ys.start - 1 + offset[0], xs.start - 1 + offset[1]))
            owner.append(k)
    rings: list[list] = [[] for _ in ids]
    for k, ring in zip(owner, _corners(contours)):
        rings[k].append(np.round(ring[:, ::-1], 2).tolist())
    return rings


def _corners(contours: list[np.ndarray]) -> list[np.ndarray]:
    """Each closed contour's corners only: points on a straight run (marching squares puts
    one on every pixel edge) say nothing. Exact, unlike Douglas-Peucker, and vectorised
    over all contours at once; a contour with under three corners is kept whole."""
    n = np.array([len(c) for c in contours])  # closed: each one's last point == its first
    points = np.concatenate(contours)
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    step = np.diff(points, axis=0, append=points[:1])  # step[j]: point j -> j + 1 (its own contour)
    prev = np.arange(len(points)) - 1
    prev[first] = first + n - 2  # the step into a contour's first point is its last step
    cross = step[:, 0] * step[prev, 1] - step[:, 1] * step[prev, 0]
    keep = np.abs(cross) > 1e-9
    keep[first + n - 1] = False  # the closing copy of the first point
    rings = []
    for c, k in zip(contours, np.split(keep, first[1:])):
        corners = c[k]
        rings.append(np.vstack([corners, corners[:1]]) if len(corners) >= 3 else c)
    return rings


def geojson_features(rings: list, table: dict, ids, model_name: str) -> list[dict]:
    """QuPath detections: a polygon (a MultiPolygon for a nucleus in pieces), ``objectType:
    detection``, measurements and score; ``ids`` are the nuclei's label ids, in the order of
    ``rings`` (each nucleus's list of rings) and ``table``'s rows."""
    features = []
    keys = [c for c in COLUMNS if c not in ("index", "box_x0", "box_y0", "box_x1", "box_y1")]
    for k, (ring, label) in enumerate(zip(rings, ids)):
        label = int(label)
        measurements = {c: float(table[c][k]) for c in keys if np.isfinite(table[c][k])}
        geometry = ({"type": "Polygon", "coordinates": [ring[0]]} if len(ring) == 1
                    else {"type": "MultiPolygon", "coordinates": [[r] for r in ring]})
        features.append({"type": "Feature", "id": f"nucleus-{label}", "geometry": geometry,
                         "properties": {"objectType": "detection", "name": f"nucleus {label}",
                                        "classification": {"name": "Nucleus", "color": [0, 200, 0]},
                                        "measurements": measurements, "label": label,
                                        "model": model_name}})
    return features


def write_geojson(path: str | Path, seg: Segmentation, table: dict, model_name: str = "") -> Path:
    """A FeatureCollection of the nuclei of one image (``seg`` numbered as ``table``)."""
    path = Path(path)
    rings = polygons(seg.labels, seg.ids, (0, 0))
    features = geojson_features(rings, table, seg.ids, model_name)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


# QuPath's colours for the four BACH classes (RGB), also the napari tissue-map layer's
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {"Normal": (60, 170, 60), "Benign": (70, 130, 220),
                                                  "InSitu": (240, 170, 30), "Invasive": (215, 40, 40)}


def tissue_features(windows: np.ndarray, probs: np.ndarray, classes: tuple[str, ...],
                    offset: tuple[int, int] = (0, 0)) -> list[dict]:
    """QuPath annotations (``objectType: annotation``): each field's rectangle (``windows``
    N×4 ``y0, x0, y1, x1``), classified as its most likely class, probabilities as
    measurements. Fields overlap by half: QuPath draws them as they are."""
    features = []
    for k, ((y0, x0, y1, x1), p) in enumerate(zip(windows + np.tile(offset, 2), probs)):
        name = classes[int(np.argmax(p))]
        ring = [[float(x0), float(y0)], [float(x1), float(y0)], [float(x1), float(y1)], [float(x0), float(y1)],
                [float(x0), float(y0)]]
        features.append({"type": "Feature", "id": f"field-{k}",
                         "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": {"objectType": "annotation", "name": f"field {k}: {name}",
                                        "classification": {"name": name, "color": list(CLASS_COLOURS.get(name, (128, 128, 128)))},
                                        "measurements": {f"p_{c}": round(float(v), 4) for c, v in zip(classes, p)}}})
    return features


def write_tissue_geojson(path: str | Path, windows: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> Path:
    """A FeatureCollection of a tissue map's fields (QuPath: File › Import objects)."""
    path = Path(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": tissue_features(windows, probs, classes)}))
    return path
