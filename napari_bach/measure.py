"""Per-nucleus measurements in physical units, the table pathologists export."""
from __future__ import annotations

import numpy as np
from skimage.color import rgb2hed

from .detections import Segmentation

COLUMNS = ("index", "score", "area_um2", "perimeter_um", "area_px", "perimeter_px", "eccentricity",
           "mean_hematoxylin", "centroid_y", "centroid_x", "box_x0", "box_y0", "box_x1", "box_y1")


BAND_ROWS = 128  # rows per pass: temporaries stay small whatever the image size


def hematoxylin(rgb: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Hematoxylin optical density from colour deconvolution (Ruifrok & Johnston), float32,
    computed band by band (skimage works in float64: 24 bytes a pixel at once otherwise).
    With ``where`` (a mask, e.g. ``labels > 0``) only those pixels are computed, zero
    elsewhere: a table of fixed nuclei needs no more, and glass and stroma are most of a slide."""
    out = np.zeros(rgb.shape[:2], np.float32)
    for y in range(0, rgb.shape[0], BAND_ROWS):
        band = rgb[y : y + BAND_ROWS]
        if where is None:
            out[y : y + BAND_ROWS] = rgb2hed(band)[..., 0]
        elif (inside := where[y : y + BAND_ROWS]).any():
            out[y : y + BAND_ROWS][inside] = rgb2hed(band[inside][:, None])[:, 0, 0]
    return out


# scikit-image's perimeter (4-neighbourhood): each border pixel is weighted by the pattern of
# border pixels of the same nucleus around it (centre 1, edge neighbours 2, corners 10).
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_EDGES = ((-1, 0), (1, 0), (0, -1), (0, 1))
_CORNERS = ((-1, -1), (-1, 1), (1, -1), (1, 1))


def _perimeters(labels: np.ndarray, n: int) -> np.ndarray:
    """Perimeter of every label id, the numbers ``skimage.measure.regionprops`` gives, in
    one vectorised pass per band instead of a Python loop over nuclei."""
    out = np.zeros(n)
    h = labels.shape[0]
    for y in range(0, h, BAND_ROWS):
        lo, hi = max(y - 2, 0), min(y + BAND_ROWS + 2, h)  # two halo rows: border of a neighbour row
        band = np.pad(labels[lo:hi], 2)  # zeros outside the image, as skimage's crops have
        inner = band[1:-1, 1:-1]
        interior = inner > 0
        for dy, dx in _EDGES:
            interior &= band[1 + dy : band.shape[0] - 1 + dy, 1 + dx : band.shape[1] - 1 + dx] == inner
        border = np.where(interior, 0, inner)  # label id on border pixels, 0 elsewhere
        core = border[1:-1, 1:-1]
        code = (core > 0).astype(np.int64)
        for weight, offsets in ((2, _EDGES), (10, _CORNERS)):
            for dy, dx in offsets:
                code += weight * (border[1 + dy : border.shape[0] - 1 + dy, 1 + dx : border.shape[1] - 1 + dx] == core)
        rows = slice(y - lo, y - lo + min(BAND_ROWS, h - y))  # only this band's own rows count
        ids, codes = core[rows].ravel(), code[rows].ravel()
        keep = ids > 0
        out += np.bincount(ids[keep], _PERIMETER_WEIGHTS[codes[keep]], minlength=n)
    return out


def _moments(labels: np.ndarray, ids: np.ndarray, hema: np.ndarray) -> dict[str, np.ndarray]:
    """Area, centroid, mean intensity and eccentricity of every id from sums gathered with
    ``np.bincount`` band by band (fast, and memory does not grow with the image)."""
    n = int(ids.max()) + 1
    sums = np.zeros((7, n))
    width = labels.shape[1]
    for y in range(0, labels.shape[0], BAND_ROWS):
        band = labels[y : y + BAND_ROWS].ravel()
        fg = np.flatnonzero(band)
        if fg.size == 0:
            continue
        lab = band[fg]
        rows, cols = np.divmod(fg, width)
        rows = rows + y
        h = hema[y : y + BAND_ROWS].ravel()[fg]
        for k, weights in enumerate((None, rows, cols, rows * rows, cols * cols, rows * cols, h)):
            sums[k] += np.bincount(lab, weights, minlength=n)
    area, sy, sx, syy, sxx, sxy, sh = sums[:, ids]
    safe = np.maximum(area, 1)
    cy, cx = sy / safe, sx / safe
    vy, vx, cov = syy / safe - cy**2, sxx / safe - cx**2, sxy / safe - cy * cx
    half_diff = np.sqrt(((vy - vx) / 2) ** 2 + cov**2)
    big, small = (vy + vx) / 2 + half_diff, (vy + vx) / 2 - half_diff
    ecc = np.sqrt(np.clip(1 - np.divide(small, big, out=np.ones_like(big), where=big > 1e-12), 0, 1))
    return {"area": area, "centroid_y": cy, "centroid_x": cx, "eccentricity": ecc, "intensity_mean": sh / safe}


def measure_nuclei(seg: Segmentation, hema: np.ndarray) -> dict[str, np.ndarray]:
    """One row per nucleus of ``seg`` (same order as ``seg.ids``): sizes in pixels, and in
    µm at the result's own µm/px (NaN when that is unknown, never a guess)."""
    unit = seg.pixel_size.mpp or np.nan
    if len(seg.ids) == 0:
        return {c: np.zeros(0) for c in COLUMNS}
    m = _moments(seg.labels, seg.ids, hema)
    perimeter = _perimeters(seg.labels, int(seg.ids.max()) + 1)
    return {
        "index": seg.ids.astype(np.int64),
        "score": seg.scores.astype(np.float32),
        "area_um2": m["area"] * unit**2,
        "perimeter_um": perimeter[seg.ids] * unit,
        "area_px": m["area"],
        "perimeter_px": perimeter[seg.ids],
        "eccentricity": m["eccentricity"],
        "mean_hematoxylin": m["intensity_mean"],
        "centroid_y": m["centroid_y"],
        "centroid_x": m["centroid_x"],
        "box_x0": seg.boxes[:, 0], "box_y0": seg.boxes[:, 1], "box_x1": seg.boxes[:, 2], "box_y1": seg.boxes[:, 3],
    }
