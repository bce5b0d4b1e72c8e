"""Read H&E images into RGB uint8 with their pixel size and, for BACH files, their class.

Shared by the napari reader, the command line and the training datasets, so every entry
point converts grayscale/RGBA/16-bit input and reads µm/px the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import BACH_CLASSES

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
BACH_MPP = 0.42
_BACH_PREFIX = {"n": "Normal", "b": "Benign", "is": "InSitu", "iv": "Invasive"}
_BACH_NAME = re.compile(r"^(iv|is|n|b)\d+$", re.IGNORECASE)


class ImageReadError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


@dataclass
class ImageData:
    rgb: np.ndarray
    mpp: float | None = None
    tissue_class: str | None = None
    notices: list[str] = field(default_factory=list)
    path: str | None = None


def bach_class_from_path(path: str | Path) -> str | None:
    """BACH class from a file name like ``is012.tif`` or a ``Normal/``-style parent folder."""
    path = Path(path)
    match = _BACH_NAME.match(path.stem)
    if match:
        return _BACH_PREFIX[match.group(1).lower()]
    by_folder = {c.lower(): c for c in BACH_CLASSES}
    return by_folder.get(path.parent.name.lower())


def to_rgb_uint8(array: np.ndarray, notices: list[str] | None = None) -> np.ndarray:
    """Convert grayscale, RGBA, 16-bit or float arrays to RGB uint8, noting each change."""
    notes = notices if notices is not None else []
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[-1] not in (3, 4):
        a = np.moveaxis(a, 0, -1)  # channel-first TIFF
    if a.ndim == 2:
        notes.append("grayscale image converted to RGB")
        a = np.stack([a] * 3, axis=-1)
    elif a.ndim == 3 and a.shape[-1] == 2:  # grey + alpha
        notes.append("grayscale+alpha image converted to RGB")
        a = np.stack([a[..., 0]] * 3 + [a[..., 1]], axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ImageReadError(f"expected a 2-D RGB image, got an array of shape {array.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.integer):
        notes.append(f"{a.dtype} image scaled to 8 bits")
        top = 65535 if a.max() > 255 else 255
        a = np.clip(a.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        notes.append(f"{a.dtype} image scaled to 8 bits")
        scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
    else:
        raise ImageReadError(f"unsupported pixel type {a.dtype}")
    if a.shape[-1] == 4:
        notes.append("alpha channel composited on white")
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def _tiff_mpp(tif) -> float | None:
    page = tif.pages[0]
    desc = page.description or ""
    found = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if found:
        return float(found.group(1))
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
    if not num or not den:
        return None
    per_unit = num / den
    microns = {2: 25400.0, 3: 10000.0}.get(int(unit))
    if microns is None:
        return None
    mpp = microns / per_unit
    # 72/96/300 dpi defaults are screen/print settings, not a microscope's pixel size.
    return mpp if 0.05 <= mpp <= 5.0 else None


def read_image(path: str | Path) -> ImageData:
    """Read an image file as RGB uint8. Raises :class:`ImageReadError` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path.name}: unsupported file type (use {', '.join(IMAGE_SUFFIXES)})")
    mpp = None
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                raw = tif.pages[0].asarray()
                mpp = _tiff_mpp(tif)
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                raw = np.asarray(im)
    except ImageReadError:
        raise
    except Exception as exc:  # every decoder has its own exception types
        raise ImageReadError(f"{path.name}: cannot be read as an image ({exc.__class__.__name__}: {exc})") from exc
    notices: list[str] = []
    try:
        rgb = to_rgb_uint8(raw, notices)
    except ImageReadError as exc:
        raise ImageReadError(f"{path.name}: {exc}") from exc
    tissue = bach_class_from_path(path)
    if mpp is None and tissue is not None:
        mpp = BACH_MPP
    return ImageData(rgb=rgb, mpp=mpp, tissue_class=tissue, notices=notices, path=str(path))
