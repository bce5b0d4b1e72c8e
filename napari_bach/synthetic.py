"""Procedural H&E-like tiles with known nuclei: offline sample data and test fixtures.

Composed in colour-deconvolution space (hematoxylin and eosin optical densities turned
into RGB with scikit-image's H&E stain matrix), so the colours behave like a real stain.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import hed2rgb
from skimage.draw import ellipse


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (n - n.mean()) / (n.std() + 1e-8)


def synthetic_he(shape: tuple[int, int] = (768, 1024), mpp: float = 0.42, seed: int = 0,
                 nuclei_per_mm2: float = 4000.0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 H&E-like image and its int32 nucleus instance labels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    area_mm2 = h * w * (mpp / 1000.0) ** 2
    labels = np.zeros(shape, np.int32)
    hema = np.zeros(shape, np.float64)
    stroma = _smooth_noise(rng, shape, 40 / mpp / 4)
    lumen = _smooth_noise(rng, shape, 25 / mpp / 4) > 1.6
    # Denser nuclei in "epithelial" regions (low stroma field), sparse in stroma.
    n_target = int(nuclei_per_mm2 * area_mm2)
    next_id = 1
    for _ in range(n_target * 4):
        if next_id > n_target:
            break
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        iy, ix = min(int(cy), h - 1), min(int(cx), w - 1)
        if lumen[iy, ix] or rng.random() < 0.5 * (stroma[iy, ix] > 0):
            continue
        a_um = rng.uniform(2.5, 5.5)
        b_um = a_um * rng.uniform(0.6, 1.0)
        rr, cc = ellipse(cy, cx, a_um / mpp, b_um / mpp, shape, rotation=rng.uniform(0, np.pi))
        if rr.size < 4 or (labels[rr, cc] > 0).mean() > 0.1:
            continue
        free = labels[rr, cc] == 0
        rr, cc = rr[free], cc[free]
        labels[rr, cc] = next_id
        hema[rr, cc] = rng.uniform(0.9, 1.4)
        next_id += 1
    chromatin = 1.0 + 0.25 * _smooth_noise(rng, shape, 0.6 / mpp)
    hema = ndimage.gaussian_filter(hema * chromatin, 0.35 / mpp)
    # Collagen: noise smoothed much more along one axis gives wavy fibres.
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape), (0.4 / mpp, 4.0 / mpp))
    fibres = np.clip(fibres / (fibres.std() + 1e-8), 0, None)
    eosin = 0.25 + 0.35 * fibres * (stroma > -0.3) + 0.1 * _smooth_noise(rng, shape, 2.0 / mpp)
    eosin = np.clip(eosin, 0.03, None) * ~ndimage.binary_dilation(lumen, iterations=2)
    hed = np.stack([hema * 0.1, eosin * 0.055, np.zeros(shape)], axis=-1)
    rgb = hed2rgb(hed) + rng.normal(0, 0.015, (*shape, 3))
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), labels
