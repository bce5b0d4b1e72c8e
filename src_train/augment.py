"""Joint augmentation of image and instance labels, then normalisation-ready crops.

Geometry (rotation, flip, scale) is one affine warp applied to image and labels together;
boxes and masks are derived from the warped labels afterwards, so they stay aligned by
construction. Colour: brightness/contrast, hue/saturation and H&E stain jitter in colour
deconvolution space (Tellez et al. 2018), which is what varies between labs and scanners.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.color import hed2rgb, hsv2rgb, rgb2hed, rgb2hsv
from skimage.transform import AffineTransform, warp


@dataclass
class AugmentConfig:
    crop: int = 384
    scale: tuple[float, float] = (0.8, 1.25)
    rotate: bool = True
    flip: bool = True
    brightness: float = 0.1
    contrast: float = 0.15
    hue: float = 0.04
    saturation: float = 0.2
    stain_sigma: float = 0.05  # multiplicative/additive jitter per H, E, D channel
    blur_p: float = 0.1


def random_geometry(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                    crop: int, scale: tuple[float, float] = (1.0, 1.0), rotate: bool = False,
                    flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A crop×crop window at a random centre, rotated, scaled and flipped in one warp."""
    h, w = labels.shape
    s = float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
    angle = rng.uniform(0, 2 * np.pi) if rotate else 0.0
    half_in = crop / (2 * s)
    cy = rng.uniform(min(half_in, h / 2), max(h - half_in, h / 2))
    cx = rng.uniform(min(half_in, w / 2), max(w - half_in, w / 2))
    sx = -1.0 if flip and rng.random() < 0.5 else 1.0
    # output (x, y) -> input (x, y): centre the output, flip, scale down, rotate, move to (cx, cy)
    tf = (AffineTransform(translation=(-crop / 2, -crop / 2))
          + AffineTransform(scale=(sx / s, 1.0 / s))
          + AffineTransform(rotation=angle)
          + AffineTransform(translation=(cx, cy)))
    img = warp(image, tf, output_shape=(crop, crop), order=1, mode="constant", cval=1.0, preserve_range=False)
    lab = warp(labels, tf, output_shape=(crop, crop), order=0, mode="constant", cval=0, preserve_range=True)
    return (img * 255).round().astype(np.uint8), lab.astype(np.int32)


def jitter_colour(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Stain, hue/saturation and brightness/contrast jitter on an RGB uint8 image."""
    x = image.astype(np.float64) / 255.0
    if cfg.stain_sigma > 0:
        hed = rgb2hed(x)
        alpha = rng.uniform(1 - cfg.stain_sigma, 1 + cfg.stain_sigma, 3)
        beta = rng.uniform(-cfg.stain_sigma, cfg.stain_sigma, 3) * 0.1
        x = np.clip(hed2rgb(hed * alpha + beta), 0, 1)
    if cfg.hue > 0 or cfg.saturation > 0:
        hsv = rgb2hsv(x)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-cfg.hue, cfg.hue)) % 1.0
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation), 0, 1)
        x = hsv2rgb(hsv)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + mean
    x = x + rng.uniform(-cfg.brightness, cfg.brightness)
    if cfg.blur_p and rng.random() < cfg.blur_p:
        from scipy.ndimage import gaussian_filter

        x = gaussian_filter(x, sigma=(rng.uniform(0.5, 1.2),) * 2 + (0,))
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    img, lab = random_geometry(image, labels, rng, cfg.crop, cfg.scale, cfg.rotate, cfg.flip)
    return jitter_colour(img, rng, cfg), lab
