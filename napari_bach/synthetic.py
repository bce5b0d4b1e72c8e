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
                 nuclei_per_mm2: float = 4000.0, nucleus_um: tuple[float, float] = (2.5, 5.5),
                 roundness: tuple[float, float] = (0.6, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 H&E-like image and its int32 nucleus instance labels; density, semi-axis
    range (µm) and roundness (minor/major) of the nuclei are parameters."""
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
        a_um = rng.uniform(*nucleus_um)
        b_um = a_um * rng.uniform(*roundness)
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


# BACH-like classes differ in nuclear density, size and pleomorphism (for tests of the
# tissue head; no claim about real BACH images).
TISSUE_LIKE = {
    "Normal": dict(nuclei_per_mm2=1500, nucleus_um=(2.5, 3.5), roundness=(0.8, 1.0)),
    "Benign": dict(nuclei_per_mm2=4000, nucleus_um=(2.5, 3.5), roundness=(0.8, 1.0)),
    "InSitu": dict(nuclei_per_mm2=7000, nucleus_um=(3.5, 5.0), roundness=(0.7, 1.0)),
    "Invasive": dict(nuclei_per_mm2=6000, nucleus_um=(4.0, 8.0), roundness=(0.4, 1.0)),
}


def write_synthetic_slide(path, shape: tuple[int, int], mpp: float = 0.25, seed: int = 0, tile: int = 512,
                          patch: int = 1024, tissue_fraction: float = 0.6,
                          patches: list[np.ndarray] | None = None) -> None:
    """A pyramidal tiled TIFF (SubIFD levels, JPEG tiles, µm/px in the resolution tags)
    that looks like a slide: H&E-like tissue in an ellipse, glass around it. Written tile
    by tile from a few patches (synthetic ones, or ``patches``: real tissue, square, at
    ``mpp``), so a 20000² slide needs no 20000² array."""
    import tifffile

    h, w = shape
    if patches is None:
        patches = [synthetic_he((patch, patch), mpp=mpp, seed=seed + k)[0] for k in range(4)]
    patch = min(min(p.shape[:2]) for p in patches)
    glass = np.full((tile, tile, 3), 242, np.uint8)
    n_levels = max(1, int(np.floor(np.log2(max(h, w) / tile))) + 1)

    def pixel(y0: int, x0: int, size: int, step: int) -> np.ndarray:
        """level-0 pixels of a size×size block (at stride ``step``), tissue inside the ellipse."""
        ys, xs = np.mgrid[y0 : y0 + size * step : step, x0 : x0 + size * step : step]
        inside = ((ys - h / 2) / (h / 2)) ** 2 + ((xs - w / 2) / (w / 2)) ** 2 < tissue_fraction
        which = ((ys // patch) * 7 + (xs // patch) * 3) % len(patches)
        out = np.empty((size, size, 3), np.uint8)
        out[:] = glass[0, 0]
        for k, p in enumerate(patches):
            sel = inside & (which == k)
            out[sel] = p[ys[sel] % patch, xs[sel] % patch]
        return out

    def tiles(level: int):
        step = 2**level
        lh, lw = -(-h // step), -(-w // step)
        for ty in range(0, lh, tile):
            for tx in range(0, lw, tile):
                yield pixel(ty * step, tx * step, tile, step)

    opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 90},
                resolutionunit="CENTIMETER", dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(n_levels):
            step = 2**level
            lshape = (-(-h // step), -(-w // step), 3)
            extra = {"subifds": n_levels - 1} if level == 0 else {"subfiletype": 1}
            tif.write(tiles(level), shape=lshape, resolution=(1e4 / (mpp * step),) * 2, **extra, **opts)
