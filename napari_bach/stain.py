"""Macenko stain normalisation, a model setting (``ModelConfig.stain_norm``).

A model trained with it sees every image mapped onto one reference H&E appearance: the
stain vectors and concentration scale of the image (estimated by torchstain's Macenko
method on the whole image or slide, once) are replaced by the reference's, stored in the
checkpoint (``ModelConfig.stain_target``). Training normalises each training image the same
way before augmentation, so inference and training see the same thing.

A stain is 8 numbers: the hematoxylin and eosin optical-density vectors (RGB, 3 each)
and their 99th-percentile concentrations (Macenko et al., ISBI 2009).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

Stain = tuple[float, ...]
IO = 240.0  # transmitted light intensity of the Macenko formulation (torchstain's default)
MIN_STAINED_PIXELS = 2000  # fewer pixels above the optical-density floor: too little tissue to estimate from


def estimate_stain(rgb: np.ndarray, max_pixels: int = 1_000_000) -> Stain | None:
    """The H&E stain of an RGB uint8 image (a regular subsample of at most ``max_pixels``),
    or None when it holds too little stained tissue to say (glass, a blank tile)."""
    from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

    step = max(1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / max_pixels))))
    pixels = np.ascontiguousarray(rgb[::step, ::step, :3]).reshape(-1, 3)
    od = -np.log((pixels.astype(np.float64) + 1) / IO)
    if int((~np.any(od < 0.15, axis=1)).sum()) < MIN_STAINED_PIXELS:  # torchstain's transparency floor
        return None
    fit = NumpyMacenkoNormalizer()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            fit.fit(pixels.reshape(-1, 1, 3))
    except (np.linalg.LinAlgError, ValueError, IndexError):
        return None
    he, max_c = np.asarray(fit.HERef, np.float64), np.asarray(fit.maxCRef, np.float64)
    if not (np.all(np.isfinite(he)) and np.all(np.isfinite(max_c)) and np.all(max_c > 0)):
        return None
    return tuple(float(v) for v in (*he[:, 0], *he[:, 1], *max_c))


def median_stain(stains: list[Stain | None]) -> Stain:
    """One reference from many images' stains (the element-wise median, vectors renormalised)."""
    known = np.array([s for s in stains if s is not None], np.float64)
    if not len(known):
        raise ValueError("no image had enough stained tissue to estimate a reference stain")
    med = np.median(known, axis=0)
    h, e = med[0:3] / np.linalg.norm(med[0:3]), med[3:6] / np.linalg.norm(med[3:6])
    return tuple(float(v) for v in (*h, *e, *med[6:8]))


def _matrices(stain: Stain) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor(stain, dtype=torch.float32)
    return torch.stack([s[0:3], s[3:6]], dim=1), s[6:8]  # 3×2 stain vectors, 2 concentration scales


def normalise_stain(image: torch.Tensor, source: Stain, target: Stain) -> torch.Tensor:
    """A 3×H×W image in [0, 1] whose stain is ``source``, re-rendered with ``target``'s:
    concentrations unmixed with the source vectors, rescaled to the target's 99th
    percentiles, mixed with the target vectors. Glass stays white."""
    he_s, max_s = _matrices(source)
    he_t, max_t = _matrices(target)
    he_s, max_s, he_t, max_t = (t.to(image.device) for t in (he_s, max_s, he_t, max_t))
    od = -torch.log((image.float() * 255 + 1) / IO)  # 3×H×W
    conc = torch.einsum("sc,chw->shw", torch.linalg.pinv(he_s), od) * (max_t / max_s)[:, None, None]
    out = IO * torch.exp(-torch.einsum("cs,shw->chw", he_t, conc))
    return out.clamp_(0, 255).div_(255)


def normalise_rgb(rgb: np.ndarray, source: Stain | None, target: Stain) -> np.ndarray:
    """:func:`normalise_stain` for an H×W×3 uint8 array (training images); unchanged when
    ``source`` is None (too little tissue to estimate)."""
    if source is None:
        return rgb
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255)
    return normalise_stain(t, source, target).mul_(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
