"""The colour reference of :mod:`napari_bach.colour`, measured on training images."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_bach.colour import angle
from napari_bach.imageio import IMAGE_SUFFIXES, ImageReadError, read_image
from napari_bach.stain import estimate_stain


def image_files(spec: str) -> list[Path]:
    """``FOLDER[:EVERY]``: the folder's images (recursively, in name order), every EVERY-th."""
    folder, _, every = spec.partition(":")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:: int(every or 1)]


def colour_reference(files: list[Path], percentile: float = 99.0) -> dict:
    """Median H and E optical-density vectors of the images and the ``percentile`` of each
    image's angle to them (images with too little stain to estimate are left out)."""
    stains = []
    for path in files:
        try:
            stain = estimate_stain(read_image(path).rgb)
        except ImageReadError:
            continue
        if stain is not None:
            stains.append(stain)
    if not stains:
        raise ValueError("no image had enough stained tissue to measure")
    s = np.array(stains)
    h, e = np.median(s[:, 0:3], 0), np.median(s[:, 3:6], 0)
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    h_angles = [angle(v, h) for v in s[:, 0:3]]
    e_angles = [angle(v, e) for v in s[:, 3:6]]
    return {"images": len(stains), "reference_h": h.round(3).tolist(), "reference_e": e.round(3).tolist(),
            f"h_angle_p{percentile:g}": float(np.percentile(h_angles, percentile)),
            f"e_angle_p{percentile:g}": float(np.percentile(e_angles, percentile))}
