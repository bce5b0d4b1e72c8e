"""Per-nucleus measurements in physical units, the table pathologists export."""
from __future__ import annotations

import numpy as np
from skimage.color import rgb2hed
from skimage.measure import regionprops_table

from .detections import Segmentation

COLUMNS = ("index", "score", "area_um2", "perimeter_um", "eccentricity", "mean_hematoxylin",
           "centroid_y", "centroid_x", "box_x0", "box_y0", "box_x1", "box_y1")


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density from colour deconvolution (Ruifrok & Johnston)."""
    return rgb2hed(rgb)[..., 0].astype(np.float32)


def measure_nuclei(seg: Segmentation, hema: np.ndarray, mpp: float | None) -> dict[str, np.ndarray]:
    """One row per nucleus of ``seg`` (same order as ``seg.ids``); µm units when mpp is
    known, pixels otherwise (then areas are px² and lengths px)."""
    unit = mpp or 1.0
    if len(seg.ids) == 0:
        return {c: np.zeros(0) for c in COLUMNS}
    props = regionprops_table(seg.labels, intensity_image=hema,
                              properties=("label", "area", "perimeter", "eccentricity", "intensity_mean", "centroid"))
    row = {int(l): i for i, l in enumerate(props["label"])}
    take = np.array([row[int(i)] for i in seg.ids])
    return {
        "index": seg.ids.astype(np.int64),
        "score": seg.scores.astype(np.float32),
        "area_um2": props["area"][take] * unit**2,
        "perimeter_um": props["perimeter"][take] * unit,
        "eccentricity": props["eccentricity"][take],
        "mean_hematoxylin": props["intensity_mean"][take],
        "centroid_y": props["centroid-0"][take],
        "centroid_x": props["centroid-1"][take],
        "box_x0": seg.boxes[:, 0], "box_y0": seg.boxes[:, 1], "box_x1": seg.boxes[:, 2], "box_y1": seg.boxes[:, 3],
    }
