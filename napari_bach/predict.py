"""Tiled prediction of whole images at the model's µm/px.

``iter_predict`` is a generator: it yields a :class:`Progress` after every tile and
returns the :class:`Detections`. A napari ``thread_worker`` can therefore report progress
and cancel between tiles (``worker.quit()``) with no extra plumbing; ``predict`` runs it
to completion for the command line, training validation and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np
import torch
import torch.nn.functional as F

from .detections import Detections
from .model import BachMaskRCNN
from .paste import mask_crops
from .tiling import tile_grid

BACKGROUND_LEVEL = 220  # pixels brighter than this in every channel count as glass
MIN_TISSUE_PIXELS = 16  # a tile with fewer non-glass pixels holds no nucleus


@dataclass
class Progress:
    done: int
    total: int
    message: str = ""


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def _to_model_scale(rgb: np.ndarray, factor: float) -> torch.Tensor:
    """RGB uint8 H×W×3 -> float 3×H'×W' in [0, 1] at the model's µm/px."""
    t = torch.tensor(rgb).permute(2, 0, 1).float().div_(255.0)  # a copy: inputs may be read-only
    if abs(factor - 1.0) > 0.02:
        h, w = rgb.shape[:2]
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=factor < 1)[0]
    return t


def tissue_pixels(tile: torch.Tensor) -> int:
    """Non-glass pixels: glass-only tiles are skipped, and tiles vote on the tissue class
    in proportion to how much tissue they hold."""
    return int((tile.amin(dim=0) < BACKGROUND_LEVEL / 255.0).sum())


def iter_predict(rgb: np.ndarray, model: BachMaskRCNN, image_mpp: float | None = None,
                 tissue_trained: bool = True) -> Generator[Progress, None, Detections]:
    """Segment a whole RGB image tile by tile; yields progress, returns all candidates."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    cfg = model.config
    mpp = image_mpp or cfg.mpp
    factor = mpp / cfg.mpp
    device = next(model.parameters()).device
    image = _to_model_scale(rgb, factor)
    h, w = image.shape[-2:]
    # An image smaller than a tile is padded with glass (white) to the full tile: the
    # network's own zero padding looks like tissue to it and yields slivers at the edge.
    # Detections centred in the padding are dropped below, as any outside a tile's core.
    ph, pw = max(0, cfg.tile_size - h), max(0, cfg.tile_size - w)
    if ph or pw:
        image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=1.0)
    tiles = tile_grid(h + ph, w + pw, cfg.tile_size, cfg.tile_overlap)
    model.eval()
    channels_last = device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.transform.channels_last = channels_last
    parts, tissue_logits, weights = [], [], []
    orig_shape = rgb.shape[:2]
    yield Progress(0, len(tiles), f"{len(tiles)} tiles at {cfg.mpp:g} µm/px")
    for k, tile in enumerate(tiles):
        crop = image[:, tile.y0 : tile.y1, tile.x0 : tile.x1]
        tissue = tissue_pixels(crop)
        if tissue >= MIN_TISSUE_PIXELS:
            with torch.inference_mode():
                out = model([crop.to(device)])[0]
            boxes = out["boxes"].cpu() + torch.tensor([tile.x0, tile.y0, tile.x0, tile.y0], dtype=torch.float32)
            centres = (boxes[:, :2] + boxes[:, 2:]) / 2
            own = torch.tensor([tile.owns(cy, cx) and cy < h and cx < w for cx, cy in centres.tolist()],
                               dtype=torch.bool)
            boxes = boxes[own] / factor  # back to the input image's pixels
            offsets, crops = mask_crops(out["masks"].cpu()[own], boxes, orig_shape)
            boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([orig_shape[1], orig_shape[0]] * 2))
            parts.append(Detections(orig_shape, boxes.numpy(), out["scores"].cpu()[own].numpy(), offsets, crops))
            tissue_logits.append(out["tissue_logits"].cpu())
            weights.append(float(tissue))
        yield Progress(k + 1, len(tiles), f"tile {k + 1}/{len(tiles)}")
    probs = None
    if tissue_trained and tissue_logits:
        wt = torch.tensor(weights)[:, None]
        probs = ((torch.stack(tissue_logits).softmax(-1) * wt).sum(0) / wt.sum()).numpy()
    return Detections.concatenate(parts, orig_shape, tissue_probs=probs, candidate_nms=cfg.candidate_nms,
                                  meta={"image_mpp": mpp, "model_mpp": cfg.mpp, "tiles": len(tiles),
                                        "classes": cfg.tissue_classes})


def predict(rgb: np.ndarray, model: BachMaskRCNN, image_mpp: float | None = None, tissue_trained: bool = True,
            progress: Callable[[Progress], None] | None = None) -> Detections:
    """Run :func:`iter_predict` to the end, reporting progress to an optional callback."""
    gen = iter_predict(rgb, model, image_mpp, tissue_trained)
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(step)
