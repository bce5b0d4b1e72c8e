"""The scale of an image whose µm/px is unknown, estimated from the size of its nuclei.

The model sees nuclei at the sizes it was trained on only when an image is rescaled by
its true µm/px. Untagged TIFF, PNG and JPEG crops (20× and 40× exports, most public
nucleus sets) carry none; run as if at the model's own scale, a 20× crop loses much of
its accuracy (README). As cellpose estimates a cell diameter, a quick pass over the
image's most tissue-rich window measures its median nucleus, and a second at the scale
the first gave measures it again (nuclei that look small are missed more, which biases
the first median up); the image is segmented at the µm/px where that median matches the
model's own (``config.nucleus_diameter_um``, measured by ``src_train evaluate`` on
validation images at their true µm/px). The estimate sets the segmentation scale only:
sizes stay in pixels, since it is not a measurement of the scanner.

A model fine-tuned on a lab whose nuclei are smaller than the reference (``config.lab_mpp``)
makes the same passes on images of known µm/px too: an image whose nuclei are smaller, as
the lab's, is segmented where they have the reference size (zoomed at most 2×), and other
tissue, with larger nuclei, keeps its own scale; sizes stay in µm.
"""
from __future__ import annotations

import numpy as np

from .imageio import is_tissue
from .pixelsize import PixelSize

WINDOW = 768  # image pixels per side sampled (the whole image when smaller): ~4 tiles
MIN_NUCLEI = 25  # fewer nuclei in the window: no estimate, the model's own scale is used
MPP_LIMITS = (0.1, 1.5)  # an estimate outside this µm/px range is not trusted
ZOOM_LIMITS = (0.5, 2.0)  # a lab's nuclei at most this far from the reference size (their ratio)
# passes measuring an image's nuclei, each at the scale the one before gave: at the
# image's own scale (or the model's, when unknown) small nuclei are missed more than large
# ones, which biases the first median up. A lab model (CoNSeP's held-out patches, starting
# weights): F1 0.666 with one pass, 0.681 with two, 0.682 zoomed by their labels' own size.
# Unknown µm/px (the held-out groups as if untagged, F1 / AJI, one pass -> two): MoNuSeg
# breast 0.796 / 0.576 -> 0.794 / 0.580, CoNSeP 0.649 / 0.476 -> 0.651 / 0.469, CPM-15
# 0.840 / 0.678 -> 0.850 / 0.690; as 20× scans 0.801 / 0.577 -> 0.806 / 0.583, 0.573 /
# 0.403 -> 0.576 / 0.408, 0.803 / 0.653 -> 0.806 / 0.654; ~0.4 s more per 1000² image
# (1.0 -> 1.4 s on 2 cores; a slide's estimate is made once)
PASSES = 2


def tissue_window(rgb: np.ndarray, size: int = WINDOW) -> tuple[slice, slice]:
    """The ``size``² window (on a grid of quarter steps) holding the most tissue."""
    h, w = rgb.shape[:2]
    if h <= size and w <= size:
        return slice(0, h), slice(0, w)
    step = max(1, size // 4)
    tissue = is_tissue(rgb[::8, ::8]).astype(np.int64)
    total = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, where = -1, (0, 0)
    for y in list(range(0, max(1, h - size), step)) + [max(0, h - size)]:
        for x in list(range(0, max(1, w - size), step)) + [max(0, w - size)]:
            y0, x0, y1, x1 = y // 8, x // 8, min(h, y + size) // 8, min(w, x + size) // 8
            count = total[y1, x1] - total[y0, x1] - total[y1, x0] + total[y0, x0]
            if count > best:
                best, where = count, (y, x)
    return slice(where[0], where[0] + size), slice(where[1], where[1] + size)


def median_diameter(labels: np.ndarray | list[np.ndarray], mpp: list[float] | None = None) -> tuple[float, int]:
    """Median equivalent diameter of the labelled objects, and how many there are: in px
    of one label image, or in µm over several with their µm/px (every object pooled)."""
    images = [labels] if isinstance(labels, np.ndarray) else list(labels)
    scales = mpp if mpp is not None else [1.0] * len(images)
    areas = np.concatenate([np.bincount(im.ravel())[1:] * m ** 2 for im, m in zip(images, scales)])
    areas = areas[areas > 0]
    if not len(areas):
        return 0.0, 0
    return float(np.sqrt(4 * np.median(areas) / np.pi)), len(areas)


def needs_estimate(pixel_size, config) -> bool:
    """Whether an image is segmented at a scale its nuclei say: its µm/px is unknown, or
    the model is a lab's (``config.lab_mpp``); only for models with a reference size."""
    return config.nucleus_diameter_um > 0 and (not pixel_size.known or config.lab_mpp > 0)


def lab_bounds(mpp: float, config) -> tuple[float, float]:
    """The µm/px a lab model segments an image of ``mpp`` between: its own, and a zoom of
    at most ``ZOOM_LIMITS`` on the lab's side (smaller nuclei, when ``config.lab_mpp`` is
    below ``config.mpp``: enlarged; larger: reduced)."""
    return (mpp, mpp / ZOOM_LIMITS[0]) if config.lab_mpp < config.mpp else (mpp / ZOOM_LIMITS[1], mpp)


def iter_estimate_mpp(rgb: np.ndarray, model, pixel_size=None):
    """Generator (progress, as :func:`~napari_bach.predict.iter_predict`) returning the µm/px
    at which ``rgb``'s nuclei have the model's median diameter, or None when the model has
    no reference size, the window holds too few nuclei, or the answer is implausible. With
    ``pixel_size`` known (a lab model's pass, :func:`needs_estimate`), the pass runs at it
    and the answer is bounded by :func:`lab_bounds`; either way it is measured again at
    the scale it gave (``PASSES``)."""
    from .predict import Progress, relayed

    cfg = model.config
    pixel_size = pixel_size if pixel_size is not None else PixelSize(None)
    if not needs_estimate(pixel_size, cfg):
        return None
    ys, xs = tissue_window(rgb)
    window = np.ascontiguousarray(rgb[ys, xs])
    why = "fitting the lab's scale" if pixel_size.known else "µm/px unknown, estimating the scale"
    mpp = None
    for i in range(PASSES):
        label = f"{why} ({i + 1} of {PASSES})" if PASSES > 1 else why
        found = yield from relayed(_median_mpp(window, model, pixel_size, mpp),
                                   lambda step: Progress(step.done, step.total, f"{label}: {step.message}"))
        if found is None:  # too few nuclei: the last estimate stands
            break
        if pixel_size.known:
            low, high = lab_bounds(pixel_size.mpp, cfg)
            mpp = min(max(found, low), high)
        elif MPP_LIMITS[0] <= found <= MPP_LIMITS[1]:
            mpp = found
        else:  # implausible: the last plausible estimate stands (none: the model's own scale)
            break
    return mpp


def _median_mpp(window: np.ndarray, model, pixel_size: PixelSize, working: float | None):
    """One pass over ``window`` (at ``working`` µm/px, else at its own or the model's):
    the µm/px at which its median nucleus has the reference size, None with too few."""
    from .predict import iter_predict

    cfg = model.config
    run = iter_predict(window, model, pixel_size, tissue_trained=False, score_floor=cfg.default_score_threshold,
                       estimate_scale=working if working else False)
    det = yield from run
    diameter, n = median_diameter(det.refilter(cfg.default_score_threshold, cfg.default_nms_iou).labels)
    return cfg.nucleus_diameter_um / diameter if n >= MIN_NUCLEI else None


def scale_note(pixel_size: PixelSize, scale_estimate: float | None, model_mpp: float) -> str:
    """What the user is told about the scale an image was segmented at
    (``Detections.scale_estimate``): always when its µm/px is unknown; for a lab model's
    image segmented at another scale than its own, that scale; else ""."""
    if not pixel_size.known:
        if scale_estimate:
            return f"µm/px unknown: segmented at {scale_estimate:.3g} µm/px, estimated from the size of its nuclei"
        return f"µm/px unknown: ran as if at the model's {model_mpp:g} µm/px"
    mpp = pixel_size.mpp
    if not scale_estimate or abs(scale_estimate - mpp) < 1e-3 * mpp:
        return ""
    return (f"segmented at {scale_estimate:.3g} µm/px (its own {mpp:.3g}): its nuclei are "
            f"{'smaller' if scale_estimate > mpp else 'larger'} than the model's, as in the lab's corrections")


def iter_estimate_slide_mpp(slide, model):
    """:func:`iter_estimate_mpp` for a slide (of unknown µm/px, or for a lab model): on the
    level-0 window under the most tissue-rich part of its overview, so one estimate serves
    all its blocks."""
    from .slideio import overview

    rgb, factor = overview(slide)
    ys, xs = tissue_window(rgb, max(8, int(round(WINDOW / factor))))
    h, w = slide.shape
    y0 = min(int(ys.start * factor), max(0, h - WINDOW))
    x0 = min(int(xs.start * factor), max(0, w - WINDOW))
    return (yield from iter_estimate_mpp(slide.read(y0, x0, min(h, y0 + WINDOW), min(w, x0 + WINDOW)), model,
                                         slide.pixel_size))
