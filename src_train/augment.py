"""Joint augmentation of image and instance labels in torch, on CPU workers or a GPU.

Geometry (rotation, flip, scale, crop) is one affine warp (``affine_grid`` +
``grid_sample``) applied to image and labels together; boxes and masks are derived from
the warped labels afterwards, so they stay aligned by construction. Colour: H&E stain
jitter as one 3×3 matrix (plus offset) in optical-density space (Tellez et al. 2018), with
the stains' own colour vectors perturbed (another lab's hematoxylin is not the reference's
blue-purple), then hue/saturation, brightness/contrast, per-channel gain (white balance),
random grayscale and blur with torchvision's tensor functions.
Every random number comes from the ``torch.Generator`` passed in, so a crop is a pure
function of its seed: resuming, or any number of loader workers, gives the same crops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms.v2 import functional as TF

RGB_FROM_HED = torch.tensor(rgb_from_hed, dtype=torch.float32)
HED_FROM_RGB = torch.tensor(hed_from_rgb, dtype=torch.float32)
OD_FLOOR = 1e-6  # as scikit-image's rgb2hed: no log of zero


@dataclass
class AugmentConfig:
    """Defaults are the recipe measured best on unseen tissue: wide zoom, JPEG/blur/sharpen
    for other scanners' optics and files (issue 13), and colour wide enough that the model
    cannot key on hue (issue 26: v9, trained with hue ±0.04 and stain σ 0.1, scored F1 0.17
    on one scanner's maroon-on-lavender patches and 0.68 on their grayscale copies)."""

    crop: int = 384
    scale: tuple[float, float] = (0.6, 1.6)
    rotate: bool = True
    flip: bool = True
    brightness: float = 0.1
    contrast: float = 0.15
    hue: float = 0.15  # hue rotation ± this (a full turn is 1)
    saturation: float = 0.2
    stain_sigma: float = 0.2  # multiplicative jitter per H, E, D channel; additive in OD units
    # Each stain's colour (its optical-density vector over R, G, B: skimage's H is blue-purple
    # [0.65, 0.70, 0.29]) scaled component-wise by 1 ± stain_vector and renormalised: other
    # hematoxylins and eosins, where hue rotation turns every colour alike.
    stain_vector: float = 0.0
    channel_gain: float = 0.0  # each RGB channel × (1 ± this): white balance, tinted glass
    gray_p: float = 0.2  # share of crops turned grayscale (three equal channels)
    # Another scanner's filters and lamp: each RGB channel's optical density scaled by a
    # factor in 1 ± scanner_cast (0: off). Stain jitter varies the dyes; this varies the
    # camera: colour_cast((1.35, 1, 0.7)) (purple), a robustness check, lies just outside 0.3.
    scanner_cast: float = 0.0
    blur_p: float = 0.1
    sharpen_p: float = 0.1
    jpeg_p: float = 0.3  # re-compressed at quality 40–95, as slide exports and CoNSeP are
    # Images whose shorter side is under 3/4 of the crop (CoNSeP's 256² patches: 222 px at
    # 0.3 µm/px) fill a 2×2 mosaic of four of them, each at half the crop, instead of one
    # crop that is ~60% glass (the trunk's cost is per pixel, tissue or glass). Such crops
    # are drawn a quarter as often, so each image still appears as often as its weight says.
    mosaic: bool = False

    def __post_init__(self) -> None:
        # strengths are fractions of the colour they vary (1 or more would invert or erase
        # it); shares are probabilities
        for name, top, top_included in (("stain_sigma", 1, False), ("scanner_cast", 1, False),
                                        ("stain_vector", 1, False), ("channel_gain", 1, False),
                                        ("hue", 0.5, True), ("gray_p", 1, True), ("blur_p", 1, True),
                                        ("sharpen_p", 1, True), ("jpeg_p", 1, True)):
            value = getattr(self, name)
            if not (0 <= value <= top if top_included else 0 <= value < top):
                raise ValueError(f"{name} must be from 0 to {'' if top_included else 'below '}{top}, got {value}")


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def affine_theta(in_hw: tuple[int, int], crop: int, centre: tuple[float, float], scale: float, angle: float,
                 flip: bool) -> torch.Tensor:
    """``affine_grid``'s 2×3 matrix: output crop pixel -> input pixel, both normalised."""
    h, w = in_hw
    cos, sin = math.cos(angle), math.sin(angle)
    sx = -1.0 if flip else 1.0
    # pixel space (x, y, 1): centre the output, flip, scale down, rotate, move to the centre
    m = torch.tensor([[cos * sx / scale, -sin / scale, 0.0], [sin * sx / scale, cos / scale, 0.0], [0, 0, 1]])
    m[:2, 2] = torch.tensor(centre[::-1]) - m[:2, :2] @ torch.tensor([crop / 2, crop / 2])
    # normalised (align_corners=False): p = ((n + 1) * size - 1) / 2
    out_from_norm = torch.tensor([[crop / 2, 0, (crop - 1) / 2], [0, crop / 2, (crop - 1) / 2], [0, 0, 1]])
    norm_from_in = torch.tensor([[2 / w, 0, 1 / w - 1], [0, 2 / h, 1 / h - 1], [0, 0, 1]])
    return (norm_from_in @ m @ out_from_norm)[:2]


def random_geometry(image: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, crop: int,
                    scale: tuple[float, float] = (1.0, 1.0), rotate: bool = False,
                    flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A crop×crop window at a random centre, rotated, scaled and flipped in one warp.

    ``image``: 3×H×W float in [0, 1]; ``labels``: H×W integer ids. Outside the image is
    glass (white) and background."""
    h, w = labels.shape
    s = float(torch.exp(_uniform(gen, math.log(scale[0]), math.log(scale[1]))))
    angle = float(_uniform(gen, 0, 2 * math.pi)) if rotate else 0.0
    half = crop / (2 * s)
    cy = float(_uniform(gen, min(half, h / 2), max(h - half, h / 2)))
    cx = float(_uniform(gen, min(half, w / 2), max(w - half, w / 2)))
    mirrored = bool(flip and torch.rand(1, generator=gen) < 0.5)
    theta = affine_theta((h, w), crop, (cy, cx), s, angle, mirrored).to(image.device)
    grid = F.affine_grid(theta[None], [1, 1, crop, crop], align_corners=False)
    img = F.grid_sample(image[None] - 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + 1.0
    lab = F.grid_sample(labels[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img.clamp_(0, 1), lab[0, 0].round().to(torch.int64)


def stain_matrix(alpha: torch.Tensor, beta: torch.Tensor,
                 vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3×3 map (and offset) in optical density that scales H, E, D by ``alpha``, shifts
    them by ``beta`` and redraws them with the stain ``vectors`` (rows, default the
    reference's): od' = od @ M + b."""
    out = RGB_FROM_HED if vectors is None else vectors
    return HED_FROM_RGB @ torch.diag(alpha) @ out, beta @ out


def perturbed_stain_vectors(gen: torch.Generator, strength: float) -> torch.Tensor:
    """The reference H, E, D optical-density vectors, each component × (1 ± strength),
    each vector renormalised to unit length."""
    vectors = RGB_FROM_HED * _uniform(gen, 1 - strength, 1 + strength, 9).reshape(3, 3)
    return vectors / vectors.norm(dim=1, keepdim=True)


def jitter_colour(image: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Stain, hue/saturation, brightness/contrast, gain and grayscale jitter and blur of a
    3×H×W image in [0, 1]."""
    x = image
    if cfg.stain_sigma > 0 or cfg.scanner_cast > 0 or cfg.stain_vector > 0:
        od = -torch.log(x.clamp(min=OD_FLOOR))
        if cfg.scanner_cast > 0:  # the camera's colour first (as colour_cast), then the dyes'
            od = od * _uniform(gen, 1 - cfg.scanner_cast, 1 + cfg.scanner_cast, 3).to(x.device)[:, None, None]
        if cfg.stain_sigma > 0 or cfg.stain_vector > 0:
            m, b = stain_matrix(_uniform(gen, 1 - cfg.stain_sigma, 1 + cfg.stain_sigma, 3),
                                _uniform(gen, -cfg.stain_sigma, cfg.stain_sigma, 3),
                                perturbed_stain_vectors(gen, cfg.stain_vector) if cfg.stain_vector > 0 else None)
            od = torch.einsum("chw,cd->dhw", od, m.to(x.device)) + b.to(x.device)[:, None, None]
        x = torch.exp(-od.clamp(min=0)).clamp_(0, 1)
    if cfg.hue > 0:
        x = TF.adjust_hue(x, float(_uniform(gen, -cfg.hue, cfg.hue)))
    if cfg.saturation > 0:
        x = TF.adjust_saturation(x, float(_uniform(gen, 1 - cfg.saturation, 1 + cfg.saturation)))
    x = TF.adjust_contrast(x, float(_uniform(gen, 1 - cfg.contrast, 1 + cfg.contrast)))
    x = (x + float(_uniform(gen, -cfg.brightness, cfg.brightness))).clamp_(0, 1)
    if cfg.channel_gain > 0:
        gain = _uniform(gen, 1 - cfg.channel_gain, 1 + cfg.channel_gain, 3).to(x.device)
        x = (x * gain[:, None, None]).clamp_(0, 1)
    if cfg.gray_p and float(torch.rand(1, generator=gen)) < cfg.gray_p:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if cfg.blur_p and float(torch.rand(1, generator=gen)) < cfg.blur_p:
        sigma = float(_uniform(gen, 0.5, 1.2))
        x = TF.gaussian_blur(x, kernel_size=[5, 5], sigma=[sigma, sigma])
    elif cfg.sharpen_p and float(torch.rand(1, generator=gen)) < cfg.sharpen_p:
        x = TF.adjust_sharpness(x, float(_uniform(gen, 1.5, 3.0)))
    if cfg.jpeg_p and float(torch.rand(1, generator=gen)) < cfg.jpeg_p:
        x = jpeg(x, int(_uniform(gen, 40, 95)))
    return x


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Round trip through JPEG at ``quality`` (block artefacts, chroma subsampling)."""
    from torchvision.io import decode_jpeg, encode_jpeg

    u8 = image.mul(255).round_().to(torch.uint8).cpu()
    return decode_jpeg(encode_jpeg(u8, quality=quality)).to(image.device).float().div_(255)


def augment(image: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
            cfg: AugmentConfig) -> tuple[torch.Tensor, torch.Tensor]:
    img, lab = random_geometry(image, labels, gen, cfg.crop, cfg.scale, cfg.rotate, cfg.flip)
    return jitter_colour(img, gen, cfg), lab


def colour_cast(rgb: np.ndarray, od_scale: tuple[float, float, float]) -> np.ndarray:
    """Another scanner's colour, for robustness checks: each RGB channel's optical density
    scaled (``(1.35, 1, 0.7)`` turns H&E purple, ``(0.8, 1, 1.3)`` pink)."""
    od = -np.log(np.clip(rgb / 255.0, 1 / 255, 1)) * np.asarray(od_scale, np.float64)
    return np.round(np.exp(-od) * 255).astype(np.uint8)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """RGB uint8 H×W×3 -> float 3×H×W in [0, 1]."""
    return torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)


# The shipped model's own augmentation (v16's command in docs/model-card.md); fine-tuning
# uses it for corrections from many labs (on one lab's, it taught less: docs/training.md).
SHIPPED_AUGMENT = AugmentConfig(scanner_cast=0.3, stain_vector=0.3, channel_gain=0.1, mosaic=True)
# one lab's own stain and scanner: the geometry as trained, colour only as much as one lab's slides vary
LIGHT_AUGMENT = AugmentConfig(scale=(0.8, 1.25), brightness=0.05, contrast=0.1, hue=0.02, saturation=0.1,
                              stain_sigma=0.05, gray_p=0.0, mosaic=True)
AUGMENTS = {"shipped": SHIPPED_AUGMENT, "light": LIGHT_AUGMENT}
