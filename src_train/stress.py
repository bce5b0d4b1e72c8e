"""The stain-stress group: held-out images re-rendered as other labs and scanners colour them.

Each transform is fixed (no randomness), so every checkpoint is scored on the very same
pixels. They span what broke v9 on an unseen scanner (maroon-brown hematoxylin on a
lavender background: F1 0.17 where grayscale copies scored 0.68) and what else labs do:
hue turned both ways, grayscale, washed-out colour, the purple and pink scanner casts,
and heavy JPEG. None of them is the training augmentation's own draw: the maroon palette
replaces the hematoxylin vector outright, beyond the vectors training perturbs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.transforms.v2 import functional as TF

from .augment import colour_cast, jpeg, to_tensor
from .datasets import Sample

# Optical density (R, G, B) of a maroon-brown hematoxylin: absorbs green and blue, little red
MAROON_H = np.array([0.36, 0.72, 0.60]) / np.linalg.norm([0.36, 0.72, 0.60])
LAVENDER = np.array([232, 222, 244]) / 255.0  # the glass of that scanner


def _tensor_op(op: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    def apply(rgb: np.ndarray) -> np.ndarray:
        return op(to_tensor(rgb)).clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return apply


def maroon_lavender(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin redrawn maroon-brown, eosin kept, on lavender glass."""
    od = -np.log(np.clip(rgb / 255.0, 1 / 255, 1))
    hed = od.reshape(-1, 3) @ hed_from_rgb
    vectors = rgb_from_hed.copy()
    vectors[0] = MAROON_H
    out = np.exp(-np.clip(hed @ vectors, 0, None)).reshape(rgb.shape) * LAVENDER
    return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


STRESS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hue+0.08": _tensor_op(lambda x: TF.adjust_hue(x, 0.08)),
    "hue-0.08": _tensor_op(lambda x: TF.adjust_hue(x, -0.08)),
    "grayscale": _tensor_op(lambda x: TF.rgb_to_grayscale(x, num_output_channels=3)),
    "desaturated": _tensor_op(lambda x: TF.adjust_saturation(x, 0.4)),
    "purple": lambda rgb: colour_cast(rgb, (1.35, 1.0, 0.7)),
    "pink": lambda rgb: colour_cast(rgb, (0.8, 1.0, 1.3)),
    "maroon-lavender": maroon_lavender,
    "jpeg-q20": _tensor_op(lambda x: jpeg(x, 20)),
}


def stressed(samples: list[Sample], name: str) -> list[Sample]:
    """``samples`` re-rendered by one of :data:`STRESS`; labels, µm/px and groups unchanged."""
    return [replace(s, image=STRESS[name](s.image)) for s in samples]


def stress_summary(per_transform: dict[str, dict]) -> dict:
    """The mean over transforms of each transform's group mean (F1, AJI, PQ, Dice)."""
    return {k: float(np.mean([m[k] for m in per_transform.values()])) for k in ("f1", "aji", "pq", "dice")}
