"""Is this image coloured like the images the models were validated on?

A model scored F1 0.17 on one scanner's maroon-on-lavender breast patches and 0.68 on the
same patches in grayscale: colour far from the training images' can break a model without
anything looking wrong. So every image's H&E stain vectors (Macenko, :mod:`napari_bach.stain`)
are compared with those of the training images; an image whose hematoxylin or eosin points
further from theirs than 99% of them did is flagged, and the status line, the CLI log and
``summary.csv`` say its result may be unreliable and why.

The reference was measured on the training images (MoNuSeg, CPM-15, every 20th CoNSeP
patch, every 8th BACH image: 125 with enough stain) by ``python -m src_train colours``:
the median vectors, and the 99th percentile of the angles to them, rounded up.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# optical-density unit vectors over (R, G, B)
REFERENCE_H = (0.597, 0.723, 0.348)
REFERENCE_E = (0.283, 0.851, 0.443)
MAX_H_ANGLE = 18.0  # degrees; the training images' 99th percentile is 17.4
MAX_E_ANGLE = 25.0  # degrees; 23.7


def angle(vector, reference) -> float:
    """Degrees between two optical-density directions."""
    v, r = np.asarray(vector, float), np.asarray(reference, float)
    return float(np.degrees(np.arccos(np.clip(v @ r / (np.linalg.norm(v) * np.linalg.norm(r)), -1, 1))))


@dataclass(frozen=True)
class ColourCheck:
    """``warning`` is empty when the colours are within the validated range (or there is too
    little stained tissue to tell); otherwise one sentence for people."""

    h_angle: float | None
    e_angle: float | None
    warning: str = ""

    @property
    def ok(self) -> bool:
        return not self.warning

    @property
    def hematoxylin_off(self) -> bool:
        """Nuclei's own stain is unfamiliar (what broke v9), not only the eosin."""
        return self.h_angle is not None and self.h_angle > MAX_H_ANGLE


def check_colours(rgb: np.ndarray) -> ColourCheck:
    """The image's stain vectors against the training images' (:data:`REFERENCE_H`, ``_E``)."""
    from .stain import estimate_stain

    stain = estimate_stain(rgb)
    if stain is None:
        return ColourCheck(None, None)
    h, e = angle(stain[0:3], REFERENCE_H), angle(stain[3:6], REFERENCE_E)
    off = []
    if h > MAX_H_ANGLE:
        off.append(f"hematoxylin {h:.0f}° from the training images' (they stay within {MAX_H_ANGLE:.0f}°)")
    if e > MAX_E_ANGLE:
        off.append(f"eosin {e:.0f}° from the training images' (within {MAX_E_ANGLE:.0f}°)")
    warning = ""
    if off:
        warning = ("colours unlike the images the model was validated on: " + "; ".join(off)
                   + ". The result may be unreliable: check the outlines")
    return ColourCheck(h, e, warning)


def model_input(rgb: np.ndarray, colours: ColourCheck, gray_pass: bool = True) -> tuple[np.ndarray, bool]:
    """The pixels the nucleus model segments, and whether they are a grayscale copy: with
    ``gray_pass``, an image whose hematoxylin is out of range is segmented in grayscale
    (ITU-R 601 luma in three channels, as training's random grayscale). v16 on the held-out
    images recoloured maroon-on-lavender (all 24 flagged by hematoxylin): F1 0.656 as they
    are, 0.689 as grayscale; on familiar colours a grayscale pass costs ~0.05 F1 (pink cast
    0.745 → 0.694), and on the two images a +0.08 hue turn flags by their eosin alone it
    cost the group 0.026, so it is applied to unfamiliar hematoxylin only."""
    if not gray_pass or not colours.hematoxylin_off:
        return rgb, False
    luma = np.round(rgb[..., :3] @ np.array([0.2989, 0.587, 0.114])).clip(0, 255).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=-1), True
