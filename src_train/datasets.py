"""Datasets: every reader yields :class:`Sample` (RGB, instance labels, µm/px, tissue class).

Instances are kept as one int32 label image rather than N masks: it is compact, it is the
plugin's export format, and boxes/masks are derived from it after augmentation so they can
never drift apart.
"""
from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon
from skimage.measure import label as connected_components
from skimage.transform import rescale

from napari_bach.config import BACH_CLASSES, ModelConfig
from napari_bach.imageio import IMAGE_SUFFIXES, read_image

MONUSEG_MPP = 0.2527
# Organ of each TCGA tissue source site in MoNuSeg 2018's training set (the challenge's own
# organ labels): the code after "TCGA-" names the hospital and study.
MONUSEG_ORGANS = {
    "A7": "breast", "AR": "breast", "E2": "breast",
    "B0": "kidney", "HE": "kidney",
    "18": "liver", "21": "liver", "38": "liver", "49": "liver", "50": "liver",
    "G9": "prostate", "CH": "prostate",
    "DK": "bladder", "G2": "bladder",
    "AY": "colon", "NH": "colon",
    "KB": "stomach", "RD": "stomach",
}


def organ_of(name: str) -> str | None:
    """The organ of a TCGA-named image (``TCGA-A7-A13E-…`` -> breast), None if unknown."""
    parts = name.split("-")
    return MONUSEG_ORGANS.get(parts[1]) if len(parts) > 2 and parts[0] == "TCGA" else None


def organ_split(samples: list["Sample"], organ: str) -> tuple[list["Sample"], list["Sample"]]:
    """Train on every other organ; validate on this organ's exactly outlined images.
    Its images without exact outlines are used for neither: they are unseen slides too."""
    held = [s for s in samples if organ_of(s.name) == organ]
    if not held:
        raise ValueError(f"no {organ} images (TCGA site codes {sorted(k for k, v in MONUSEG_ORGANS.items() if v == organ)})")
    return [s for s in samples if organ_of(s.name) != organ], [s for s in held if s.exact]


@dataclass
class Sample:
    image: np.ndarray  # H×W×3 uint8
    labels: np.ndarray | None  # H×W int32 instance ids, None for tissue-only samples
    mpp: float
    tissue: int = -1  # index into BACH_CLASSES, -1 if unknown
    name: str = ""
    exact: bool = True  # False when instances were split from a binary mask
    weight: float = 1.0  # how often training draws crops from this image, relative to the others
    group: str = ""  # the source it came from: validation reports each group separately


def read_aperio_xml(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    """Rasterise ImageScope/Aperio XML regions (one per nucleus) into instance labels."""
    root = ET.parse(path).getroot()
    mpp = root.get("MicronsPerPixel")
    labels = np.zeros(shape, np.int32)
    next_id = 1
    for region in root.iter("Region"):
        pts = [(float(v.get("Y")), float(v.get("X"))) for v in region.iter("Vertex")]
        if len(pts) < 3:
            continue
        ys, xs = np.array(pts).T
        rr, cc = draw_polygon(ys, xs, shape)
        if rr.size == 0:
            continue
        labels[rr, cc] = next_id
        next_id += 1
    return labels, float(mpp) if mpp else None


def split_binary(mask: np.ndarray, h: float = 2.0) -> np.ndarray:
    """Instances from a binary mask: watershed on the distance transform, seeded at its
    h-maxima, so touching nuclei separate. On the MoNuSeg images that also have polygons,
    plain connected components under-count nuclei by up to 44%, this split by about 10%."""
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    fg = mask > 0
    dist = ndimage.distance_transform_edt(fg)
    markers = connected_components(h_maxima(dist, h))
    return watershed(-dist, markers, mask=fg).astype(np.int32)


def read_mask(path: str | Path) -> tuple[np.ndarray, bool]:
    """Instance labels from a mask image and whether they are exact: integer ids are
    kept (exact), an 8-bit two-valued mask is split into nuclei by :func:`split_binary`
    (not exact); a 16/32-bit map with one nucleus is still an id map."""
    import tifffile
    from PIL import Image

    if Path(path).suffix.lower() in (".tif", ".tiff"):
        a = tifffile.imread(path)
    else:
        with Image.open(path) as im:
            a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., 0]
    if a.dtype in (np.uint8, np.bool_) and np.unique(a).size <= 2:  # 16/32-bit maps are ids
        return split_binary(a), False
    return a.astype(np.int32), True


def load_monuseg(root: str | Path) -> list[Sample]:
    """MoNuSeg layout: images/NAME.tif with annotations/NAME.xml or masks/NAME.png.

    Samples from XML polygons are ``exact``; validation should use only those."""
    root = Path(root)
    samples = []
    for img_path in sorted((root / "images").glob("*.tif")):
        data = read_image(img_path)
        xml = root / "annotations" / f"{img_path.stem}.xml"
        mpp = data.mpp or MONUSEG_MPP
        exact = xml.exists()
        if exact:
            labels, xml_mpp = read_aperio_xml(xml, data.rgb.shape[:2])
            mpp = xml_mpp or mpp
        else:
            labels, exact = read_mask(root / "masks" / f"{img_path.stem}.png")
        samples.append(Sample(data.rgb, labels, mpp, name=img_path.stem, exact=exact))
    if not samples:
        raise FileNotFoundError(f"no images under {root / 'images'}")
    return samples


def load_mask_folder(images: str | Path, masks: str | Path, mpp: float) -> list[Sample]:
    """Pairs ``images/X.*`` with ``masks/X.*`` (instance or binary masks)."""
    masks = Path(masks)
    samples = []
    for img_path in sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        candidates = [m for m in masks.glob(f"{img_path.stem}.*") if m.suffix.lower() in IMAGE_SUFFIXES]
        if not candidates:
            continue
        data = read_image(img_path)
        labels, exact = read_mask(candidates[0])
        samples.append(Sample(data.rgb, labels, data.mpp or mpp, name=img_path.stem, exact=exact))
    return samples


def load_bach(root: str | Path) -> list[Sample]:
    """BACH part A layout: ``Normal/ Benign/ InSitu/ Invasive/`` folders of TIFFs."""
    root = Path(root)
    samples = []
    for cls in BACH_CLASSES:
        for path in sorted((root / cls).glob("*.tif*")):
            data = read_image(path)
            samples.append(Sample(data.rgb, None, data.mpp or 0.42, BACH_CLASSES.index(cls), path.stem))
    if not samples:
        raise FileNotFoundError(f"no BACH images in {root} (expected Normal/ Benign/ InSitu/ Invasive/)")
    return samples


def stratified_split(samples: list[Sample], val_fraction: float = 0.2, seed: int = 0,
                     folds: int | None = None, fold: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Seeded split, stratified by tissue class; whole images only, never split.

    With ``folds`` the images of each class are dealt into k folds and ``fold`` is held out.
    """
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        by_class[s.tissue].append(s)
    rng = random.Random(seed)
    train, val = [], []
    for cls in sorted(by_class):
        group = sorted(by_class[cls], key=lambda s: s.name)
        rng.shuffle(group)
        if folds:
            held = set(range(fold, len(group), folds))
        else:
            n_val = max(1, round(len(group) * val_fraction)) if len(group) > 1 else 0
            held = set(range(n_val))
        for i, s in enumerate(group):
            (val if i in held else train).append(s)
    return train, val


def rescale_sample(sample: Sample, mpp: float) -> Sample:
    """Resample to the model's µm/px (image bilinear, labels nearest)."""
    factor = sample.mpp / mpp
    if abs(factor - 1.0) < 1e-3:
        return sample
    image = rescale(sample.image, factor, order=1, channel_axis=-1, anti_aliasing=factor < 1, preserve_range=True)
    labels = None
    if sample.labels is not None:
        labels = rescale(sample.labels, factor, order=0, anti_aliasing=False, preserve_range=True).astype(np.int32)
    return replace(sample, image=image.round().astype(np.uint8), labels=labels, mpp=mpp)


def normalise_stains(samples: list[Sample], config: ModelConfig) -> tuple[ModelConfig, list[Sample]]:
    """Training images mapped onto the model's reference stain, as inference maps its
    inputs (``config.stain_norm``); the reference is the median of the training images'
    stains unless ``config`` has one already (a warm start keeps its model's)."""
    from napari_bach.stain import estimate_stain, median_stain, normalise_rgb

    if config.stain_norm == "none" or not samples:
        return config, samples
    stains = [estimate_stain(s.image) for s in samples]
    target = config.stain_target or median_stain(stains)
    normalised = [replace(s, image=normalise_rgb(s.image, stain, target)) for s, stain in zip(samples, stains)]
    return replace(config, stain_target=target), normalised


def instances_from_labels(labels: np.ndarray, min_area: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (x0, y0, x1, y1; x1/y1 exclusive), binary masks and ids of each instance."""
    from scipy import ndimage

    ids = np.unique(labels)
    ids = ids[ids > 0]
    boxes, masks, kept = [], [], []
    slices = ndimage.find_objects(labels) if ids.size else []
    for i in ids:
        sl = slices[i - 1]
        if sl is None:
            continue
        m = labels[sl] == i
        if m.sum() < min_area:
            continue
        y, x = sl
        boxes.append((x.start, y.start, x.stop, y.stop))
        full = np.zeros(labels.shape, np.uint8)
        full[sl][m] = 1
        masks.append(full)
        kept.append(i)
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0, *labels.shape), np.uint8), np.zeros(0, np.int64)
    return np.array(boxes, np.float32), np.stack(masks), np.array(kept, np.int64)


def load_exported(root: str | Path) -> list[Sample]:
    """Samples exported by the plugin (see :mod:`napari_bach.export`)."""
    from napari_bach.export import read_sample, list_samples

    samples = []
    for folder in list_samples(root):
        s = read_sample(folder)
        tissue = BACH_CLASSES.index(s["tissue_class"]) if s.get("tissue_class") in BACH_CLASSES else -1
        samples.append(Sample(s["image"], s["labels"], s["mpp"], tissue, Path(folder).name))
    return samples
