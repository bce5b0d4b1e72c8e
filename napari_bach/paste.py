"""Box-local mask paste: each 28×28 mask is resized into its own box only.

Same arithmetic as torchvision's ``paste_masks_in_image`` (1-pixel padding, expanded box,
bilinear resize, > threshold), but the result is a small crop per nucleus instead of one
full-size float mask per nucleus (~12 MB each on a BACH image).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def mask_crops(masks: torch.Tensor, boxes: torch.Tensor, image_shape: tuple[int, int],
               threshold: float = 0.5) -> tuple[np.ndarray, list[np.ndarray]]:
    """Binary crops (probability > ``threshold``, ``ModelConfig.mask_threshold``) of N
    mask probabilities (N×M×M) for boxes (N×4, x0 y0 x1 y1).

    Returns the (y0, x0) offset of each crop in the image and the crops themselves
    (clipped to the image; possibly empty).
    """
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0, 2), np.int64), []
    m = masks.shape[-1]
    padded = F.pad(masks.reshape(n, 1, m, m).float(), (1, 1, 1, 1))
    scale = (m + 2) / m
    centre = (boxes[:, :2] + boxes[:, 2:]) * 0.5
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    ext = torch.cat([centre - half, centre + half], dim=1).to(torch.int64).tolist()
    im_h, im_w = image_shape
    offsets = np.zeros((n, 2), np.int64)
    crops = []
    for i, (bx0, by0, bx1, by1) in enumerate(ext):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        resized = F.interpolate(padded[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, x1 = max(bx0, 0), min(bx1 + 1, im_w)
        y0, y1 = max(by0, 0), min(by1 + 1, im_h)
        if x1 <= x0 or y1 <= y0:
            crops.append(np.zeros((0, 0), bool))
            offsets[i] = (max(min(by0, im_h), 0), max(min(bx0, im_w), 0))
            continue
        crop = resized[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0] > threshold
        crops.append(crop.numpy())
        offsets[i] = (y0, x0)
    return offsets, crops


def paste_labels(shape: tuple[int, int], offsets: np.ndarray, crops: list[np.ndarray],
                 order: np.ndarray, into: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Paste crops in ``order`` into one int32 label image (a new one, or ``into``), crop
    ``i`` as label ``i + 1``; labelled pixels are kept (pass crops best-first). Also
    returns how many pixels each pasted crop got (0: empty or fully covered)."""
    labels = np.zeros(shape, np.int32) if into is None else into
    written = np.zeros(len(order), np.int64)
    for k, i in enumerate(order):
        crop = crops[i]
        if crop.size == 0:
            continue
        y0, x0 = offsets[i]
        region = labels[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
        free = crop & (region == 0)
        region[free] = i + 1
        written[k] = np.count_nonzero(free)
    return labels, written
