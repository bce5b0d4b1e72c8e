"""Tiled prediction of whole images at the model's µm/px.

:func:`run_tiled` is the one tile loop: it owns image→model geometry (rescale to the
model's µm/px, glass padding, overlapping tiles) and model→image geometry (tile offset,
core ownership, scale back), as torchvision's ``GeneralizedRCNNTransform`` owns resize
and ``postprocess``. Prediction and the RPN inspector both run on it.

``iter_predict`` is a generator: it yields a :class:`Progress` after every tile and
returns the :class:`Detections`. A napari ``thread_worker`` can therefore report progress
and cancel between tiles (``worker.quit()``); :func:`drain` runs any such generator to
its end for the command line, training validation and tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from .detections import Detections
from .imageio import BACKGROUND_LEVEL
from .model import BachMaskRCNN, for_inference
from .paste import mask_crops
from .pixelsize import ESTIMATED, PixelSize
from .stain import Stain, estimate_stain, normalise_stain
from .tiling import Region, Tile, centre_in, tile_grid

MIN_TISSUE_PIXELS = 16  # a tile with fewer non-glass pixels holds no nucleus
NO_RESAMPLING = 0.02  # an image within 2% of the model's µm/px is not resampled (no blur for nothing)

T = TypeVar("T")


@dataclass
class Progress:
    done: int
    total: int
    message: str = ""


def drain(gen: Generator[Progress, None, T], progress: Callable[[Progress], None] | None = None) -> T:
    """Run a progress generator to its end, reporting each step; returns its value."""
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(step)


def relayed(gen: Generator[Progress, None, T], relabel: Callable[[Progress], Progress]
            ) -> Generator[Progress, None, T]:
    """Run a progress generator as part of another: each step re-labelled (a slide's block,
    a scale estimate before the image); returns its value."""
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            return stop.value
        yield relabel(step)


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def as_pixel_size(pixel_size: PixelSize | float | None) -> PixelSize:
    """Training and tests pass plain numbers; the plugin passes a resolved :class:`PixelSize`."""
    if isinstance(pixel_size, PixelSize):
        return pixel_size
    return PixelSize(float(pixel_size), "given") if pixel_size else PixelSize(None)


def tissue_pixels(tile: torch.Tensor) -> int:
    """Non-glass pixels: glass-only tiles are skipped, and tiles vote on the tissue class
    in proportion to how much tissue they hold."""
    return int((tile.amin(dim=0) < BACKGROUND_LEVEL / 255.0).sum())


@dataclass
class TileGeometry:
    """Where tiles lie at the model's scale and how their boxes map back to the image."""

    factor: float  # model pixels per image pixel
    image_shape: tuple[int, int]  # input image, its own pixels
    scaled_shape: tuple[int, int]  # at the model's µm/px, before glass padding
    tiles: list[Tile]

    def owned_region(self, tile: Tile) -> Region:
        """The part of ``tile`` it owns, in its own pixels (``y0, x0, y1, x1``): its core,
        less any glass padding beyond the image."""
        y0, x0, y1, x1 = tile.core
        h, w = self.scaled_shape
        return y0 - tile.y0, x0 - tile.x0, min(y1, h) - tile.y0, min(x1, w) - tile.x0

    def to_image(self, boxes: torch.Tensor, tile: Tile) -> tuple[torch.Tensor, torch.Tensor]:
        """Tile-local model-pixel boxes -> image-pixel boxes, and which of them this tile owns
        (centre in its :meth:`owned_region`): a border object is kept once."""
        boxes = boxes.float().cpu()
        own = centre_in(boxes, self.owned_region(tile))
        boxes = boxes + torch.tensor([tile.x0, tile.y0, tile.x0, tile.y0], dtype=torch.float32)
        return boxes / self.factor, own


def _scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return max(1, round(shape[0] * factor)), max(1, round(shape[1] * factor))


def _to_model_scale(rgb: np.ndarray, factor: float) -> torch.Tensor:
    """RGB uint8 H×W×3 -> float 3×H'×W' in [0, 1] at the model's µm/px."""
    t = torch.tensor(rgb).permute(2, 0, 1).float().div_(255.0)  # a copy: inputs may be read-only
    size = _scaled_shape(rgb.shape[:2], factor)
    if size != rgb.shape[:2]:
        t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=factor < 1)[0]
    return t


def plan_tiles(image_shape: tuple[int, int], config, pixel_size: PixelSize | float | None) -> TileGeometry:
    """Where the tiles of an image lie at the model's scale. An image smaller than a tile
    is padded with glass (white) to the full tile: the network's own zero padding looks
    like tissue to it and yields slivers at the edge; detections centred in the padding
    are not owned by any tile (:meth:`TileGeometry.to_image`)."""
    factor = (as_pixel_size(pixel_size).mpp or config.mpp) / config.mpp
    if abs(factor - 1.0) <= NO_RESAMPLING:  # used as it is, and boxes map back by the same 1.0
        factor = 1.0
    h, w = _scaled_shape(tuple(image_shape), factor)
    ph, pw = max(0, config.tile_size - h), max(0, config.tile_size - w)
    return TileGeometry(factor, tuple(image_shape), (h, w),
                        tile_grid(h + ph, w + pw, config.tile_size, config.tile_overlap, balanced=True))


def stain_normaliser(rgb: np.ndarray, config, stain: Stain | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's ``stain_norm`` does to each tile of ``rgb``: nothing, or a map from
    the image's stain (``stain`` or estimated from ``rgb``) to the model's reference. An image
    with too little tissue to estimate from is left as it is."""
    if config.stain_norm == "none":
        return lambda tile: tile
    if not config.stain_target:
        raise ValueError("this model normalises stains but holds no reference stain (stain_target): "
                         "it was not saved by src_train")
    source = stain or estimate_stain(rgb)
    if source is None:
        return lambda tile: tile
    return lambda tile: normalise_stain(tile, source, config.stain_target)


def default_batch_size(device: torch.device) -> int:
    """Tiles per forward pass: one on CPU (no gain, more memory), several on a GPU."""
    return 1 if device.type == "cpu" else 8


def run_tiled(rgb: np.ndarray, model: BachMaskRCNN, pixel_size: PixelSize | float | None,
              step: Callable[[list[torch.Tensor], list[Region]], list[T]], batch_size: int | None = None,
              stain: Stain | None = None) -> Generator[Progress, None, tuple[TileGeometry, list]]:
    """Call ``step(tiles, regions)`` (a batch of tiles on the device of ``model``, an
    inference copy from :func:`~napari_bach.model.for_inference`, and the region each tile
    owns, :meth:`TileGeometry.owned_region`; inference mode, bf16 autocast on CUDA) on every
    tile that holds tissue; yields progress per batch, returns the geometry and
    ``(tile, output, tissue px)`` per tile.

    An unknown pixel size runs the image as if it were at the model's own µm/px. A model
    with stain normalisation maps every tile from the image's stain (``stain``, e.g. a
    slide's, estimated once; None: estimated from ``rgb``) onto its reference stain."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    cfg = model.config
    normalise = stain_normaliser(rgb, cfg, stain)
    geometry = plan_tiles(rgb.shape[:2], cfg, pixel_size)
    device = next(model.parameters()).device
    image = _to_model_scale(rgb, geometry.factor)
    h, w = image.shape[-2:]
    ph, pw = max(0, cfg.tile_size - h), max(0, cfg.tile_size - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=1.0)
    model.eval()
    channels_last = device.type == "cpu"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.transform.channels_last = channels_last
    batch_size = batch_size or default_batch_size(device)
    outputs, batch = [], []
    total = len(geometry.tiles)

    def run(batch: list) -> None:
        crops = [normalise(crop.to(device, non_blocking=True)) for _, crop, _ in batch]
        regions = [geometry.owned_region(tile) for tile, _, _ in batch]
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            results = step(crops, regions)
        outputs.extend((tile, out, tissue) for (tile, _, tissue), out in zip(batch, results))

    yield Progress(0, total, f"{total} tiles at {cfg.mpp:g} µm/px")
    for k, tile in enumerate(geometry.tiles):
        crop = image[:, tile.y0 : tile.y1, tile.x0 : tile.x1]
        tissue = tissue_pixels(crop)
        if tissue >= MIN_TISSUE_PIXELS:
            batch.append((tile, crop, tissue))
        if len(batch) == batch_size or (k == total - 1 and batch):
            run(batch)
            batch = []
        yield Progress(k + 1, total, f"tile {k + 1}/{total}")
    return geometry, outputs


FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both


def _unflip(out: dict, dims: tuple[int, ...], h: int, w: int) -> dict:
    """A flipped tile's detections in the unflipped tile's coordinates."""
    boxes = out["boxes"].clone()
    if -1 in dims:
        boxes[:, [0, 2]] = w - out["boxes"][:, [2, 0]]
    if -2 in dims:
        boxes[:, [1, 3]] = h - out["boxes"][:, [3, 1]]
    return {**out, "boxes": boxes, "masks": out["masks"].flip(dims) if dims else out["masks"]}


def flip_tta(model: BachMaskRCNN, score_floor: float | None = None
             ) -> Callable[[list[torch.Tensor], list[Region]], list[dict]]:
    """Test-time augmentation: each tile also runs flipped three ways; the candidates of the
    four views are pooled and duplicates removed by the model's own candidate NMS (the
    best-scoring view of each nucleus is kept); tissue logits are averaged. Masks are
    computed for every view's candidates: which of them a tile owns is decided after the
    views are pooled."""
    from torchvision.ops import nms

    cfg = model.config

    def step(crops: list[torch.Tensor], regions: list[Region]) -> list[dict]:
        outs = model([c.flip(dims) if dims else c for c in crops for dims in FLIPS], score_floor=score_floor)
        merged = []
        for i, crop in enumerate(crops):
            h, w = crop.shape[-2:]
            views = [_unflip(outs[i * len(FLIPS) + k], dims, h, w) for k, dims in enumerate(FLIPS)]
            boxes = torch.cat([v["boxes"] for v in views]).float()
            scores = torch.cat([v["scores"] for v in views]).float()
            keep = nms(boxes, scores, cfg.candidate_nms)[: cfg.max_candidates_per_tile]
            merged.append({"boxes": boxes[keep], "scores": scores[keep],
                           "masks": torch.cat([v["masks"] for v in views])[keep],
                           "tissue_logits": torch.stack([v["tissue_logits"].float() for v in views]).mean(0)})
        return merged

    return step


def iter_predict(rgb: np.ndarray, model: BachMaskRCNN, pixel_size: PixelSize | float | None = None,
                 tissue_trained: bool = True, batch_size: int | None = None, tta: bool = False,
                 score_floor: float | None = None, stain: Stain | None = None, estimate_scale: bool | float = True
                 ) -> Generator[Progress, None, Detections]:
    """Segment a whole RGB image tile by tile; yields progress, returns all candidates.
    ``tta``: flip test-time augmentation (4 network passes per tile, see :func:`flip_tta`).
    ``score_floor``: candidates from this score up only (masks for nothing below it): for
    runs whose threshold is known in advance; refiltering at that threshold or above
    gives the same nuclei as from the full candidate cache. ``stain``: the image's stain
    when known (a slide's), for models with stain normalisation (:func:`run_tiled`).
    ``estimate_scale``: an image of unknown µm/px, or any image for a lab model, is
    segmented at the scale its nuclei say (:mod:`napari_bach.scale`;
    ``Detections.scale_estimate``), for models that know their nuclei's size; otherwise, or
    when that fails, at its own µm/px or as if at the model's. A number is an estimate made
    elsewhere (a slide's, once for all its blocks)."""
    from .scale import iter_estimate_mpp, needs_estimate

    model = for_inference(model)
    cfg = model.config
    pixel_size = as_pixel_size(pixel_size)
    working = pixel_size  # the µm/px the tiles are cut at; an estimate never becomes the image's own
    estimate = None
    if needs_estimate(pixel_size, cfg) and estimate_scale is not False:
        estimate = (yield from iter_estimate_mpp(rgb, model, pixel_size)) if estimate_scale is True \
            else float(estimate_scale)
    if estimate:
        working = PixelSize(estimate, ESTIMATED)
    if tta:
        step = flip_tta(model, score_floor)
    else:  # masks only for what each tile owns
        def step(crops: list[torch.Tensor], regions: list[Region]) -> list[dict]:
            return model(crops, score_floor=score_floor, regions=regions)
    geometry, outputs = yield from run_tiled(rgb, model, working, step, batch_size, stain)
    orig_shape = geometry.image_shape
    limit = torch.tensor([orig_shape[1], orig_shape[0]] * 2, dtype=torch.float32)
    parts, tissue_logits, weights = [], [], []
    for tile, out, tissue in outputs:
        boxes, own = geometry.to_image(out["boxes"], tile)
        boxes = boxes[own]
        offsets, crops = mask_crops(out["masks"].float().cpu()[own], boxes, orig_shape, cfg.mask_threshold)
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        parts.append(Detections(orig_shape, boxes.numpy(), out["scores"].float().cpu()[own].numpy(), offsets, crops))
        tissue_logits.append(out["tissue_logits"].float().cpu())
        weights.append(float(tissue))
    probs = None
    if tissue_trained and tissue_logits:
        wt = torch.tensor(weights)[:, None]
        probs = ((torch.stack(tissue_logits).softmax(-1) * wt).sum(0) / wt.sum()).numpy()
    floor = cfg.candidate_score if score_floor is None else max(score_floor, cfg.candidate_score)
    return Detections.concatenate(parts, orig_shape, tissue_probs=probs, candidate_nms=cfg.candidate_nms,
                                  score_floor=floor, pixel_size=pixel_size, scale_estimate=estimate,
                                  classes=cfg.tissue_classes)


def predict(rgb: np.ndarray, model: BachMaskRCNN, pixel_size: PixelSize | float | None = None,
            tissue_trained: bool = True, progress: Callable[[Progress], None] | None = None,
            batch_size: int | None = None, tta: bool = False, score_floor: float | None = None) -> Detections:
    """Run :func:`iter_predict` to the end, reporting progress to an optional callback."""
    return drain(iter_predict(rgb, model, pixel_size, tissue_trained, batch_size, tta, score_floor), progress)
