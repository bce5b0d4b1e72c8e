"""The classical baseline the model has to beat: hematoxylin, Otsu's threshold, watershed.

Colour deconvolution (scikit-image's Ruifrok–Johnston H&E-DAB matrix) gives the
hematoxylin density, smoothed and thresholded by Otsu into nucleus foreground; touching
nuclei are split by a watershed of the distance transform from its local maxima. Every
length is in µm, so each image runs at its own µm/px. Its parameters are chosen on
training images (:func:`tune`), never on the held-out images it is reported on, and it is
scored by the same metrics, pooled the same way, as a model (``python -m src_train
baseline``), so the model card can say by how much the network beats it.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import watershed

from napari_bach.edit import remove_small

from .datasets import Sample
from .evaluate import group_mean
from .metrics import nucleus_metrics, pooled_nucleus_metrics


@dataclass(frozen=True)
class ClassicalParams:
    smooth_um: float = 0.5  # Gaussian σ of the hematoxylin density before Otsu
    min_distance_um: float = 3.0  # two nuclei's centres are at least this far apart
    min_area_um2: float = 3.0  # smaller objects are dropped (the shipped model's minimum)
    max_hole_um2: float = 10.0  # pale nucleus centres up to this size are filled


# The grid :func:`tune` searches: smoothing and nucleus spacing decide most of the result.
GRID = {"smooth_um": (0.25, 0.5, 1.0), "min_distance_um": (2.0, 3.0, 4.0, 5.0)}


def classical_nuclei(rgb: np.ndarray, mpp: float, params: ClassicalParams = ClassicalParams()) -> np.ndarray:
    """Int32 nucleus instance labels of an RGB H&E image at ``mpp`` µm/px."""
    return nuclei_from_hematoxylin(hematoxylin(rgb), mpp, params)


def hematoxylin(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin density by colour deconvolution: the part every parameter set shares."""
    return rgb2hed(rgb[..., :3])[..., 0]


def nuclei_from_hematoxylin(hema: np.ndarray, mpp: float, params: ClassicalParams) -> np.ndarray:
    """Smooth, threshold (Otsu), fill pale centres, split touching nuclei (watershed)."""
    hema = gaussian(hema, params.smooth_um / mpp)
    if np.ptp(hema) <= 0:  # a blank image: no threshold, no nuclei
        return np.zeros(hema.shape, np.int32)
    min_px = max(1, int(round(params.min_area_um2 / mpp**2)))
    holes, _ = ndi.label(hema <= threshold_otsu(hema))
    remove_small(holes, int(round(params.max_hole_um2 / mpp**2)))  # the background stays one big region
    regions, _ = ndi.label(holes == 0)
    remove_small(regions, min_px)
    foreground = regions > 0
    distance = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=max(1, int(round(params.min_distance_um / mpp))),
                           labels=regions, exclude_border=False)
    markers = np.zeros(distance.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=foreground).astype(np.int32)
    remove_small(labels, min_px)
    return labels


def score(samples: list[Sample], params: ClassicalParams, hema: list[np.ndarray] | None = None) -> list[dict]:
    """Per-image nucleus metrics of the baseline, as :func:`~.evaluate.sweep_nuclei` gives a
    model's (``hema``: the images' hematoxylin, when already computed)."""
    hema = hema or [hematoxylin(s.image) for s in samples]
    return [nucleus_metrics(s.labels, nuclei_from_hematoxylin(h, s.mpp, params)) for s, h in zip(samples, hema)]


def tune(samples: list[Sample], per_group: int = 4) -> tuple[ClassicalParams, list[dict]]:
    """The parameters of :data:`GRID` with the best mean PQ over groups on up to
    ``per_group`` exactly outlined images of each training group (evenly spaced, so the
    choice is repeatable); returns them and the whole sweep."""
    chosen: list[Sample] = []
    for group in sorted({s.group for s in samples}):
        exact = [s for s in samples if s.group == group and s.exact and s.labels is not None]
        step = max(1, len(exact) // per_group)
        chosen += exact[::step][:per_group]
    if not chosen:
        raise ValueError("no exactly outlined training images to choose the baseline's parameters on")
    hema = [hematoxylin(s.image) for s in chosen]
    groups = [s.group for s in chosen]
    sweep = []
    for values in itertools.product(*GRID.values()):
        params = ClassicalParams(**dict(zip(GRID, values)))
        sweep.append({**asdict(params), **group_mean(score(chosen, params, hema), groups), "images": len(chosen)})
    best = max(sweep, key=lambda r: r["pq"])
    return ClassicalParams(**{k: best[k] for k in asdict(ClassicalParams())}), sweep


def evaluate_classical(held_out: list[Sample], params: ClassicalParams) -> dict:
    """The baseline on held-out images, in ``evaluate``'s layout (pooled, per image, per group)."""
    per_image = score(held_out, params)
    result = {"model": "classical baseline (hematoxylin, Otsu, watershed)", "params": asdict(params),
              "nuclei": pooled_nucleus_metrics(per_image),
              "nuclei_per_image": [{"image": s.name, **m} for s, m in zip(held_out, per_image)]}
    groups = [s.group for s in held_out]
    if len(set(groups)) > 1:
        result["groups"] = {g: {"images": groups.count(g),
                                "nuclei": pooled_nucleus_metrics([m for m, h in zip(per_image, groups) if h == g])}
                            for g in sorted(set(groups))}
        result["group_mean"] = group_mean(per_image, groups)
    return result
