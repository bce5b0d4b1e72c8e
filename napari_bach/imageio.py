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
from .pixelsize import PixelSize, resolve_mpp, tiff_tag_mpp

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
BACKGROUND_LEVEL = 220  # pixels brighter than this in every channel count as glass
_BACH_PREFIX = {"n": "Normal", "b": "Benign", "is": "InSitu", "iv": "Invasive"}
_BACH_NAME = re.compile(r"^(iv|is|n|b)\d+$", re.IGNORECASE)


class ImageReadError(ValueError):
    """An image that cannot be read; the message names the file and the reason."""


@dataclass
class ImageData:
    rgb: np.ndarray
    pixel_size: PixelSize = PixelSize(None)
    tissue_class: str | None = None
    notices: list[str] = field(default_factory=list)
    path: str | None = None

    @property
    def mpp(self) -> float | None:
        return self.pixel_size.mpp


GLASS_SATURATION = 0.06  # (max − min) / max under this: colourless, as glass is
GLASS_MARGIN = 15  # tissue is this much darker than the glass's own brightness


def glass_level(rgb: np.ndarray) -> float:
    """The brightness (of a pixel's darkest channel) from which a pixel is glass: 15 under
    the image's own glass, found as its colourless bright pixels (at least 2% of them),
    and never above ``BACKGROUND_LEVEL``. Slide crops whose glass is (217, 213, 212) get
    about 198, where the fixed 220 counted their glass as tissue; images without glass keep 220."""
    step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 250_000)))  # at most ~250k pixels looked at
    px = rgb[::step, ::step].reshape(-1, 3).astype(np.float32)
    hi, lo = px.max(1), px.min(1)
    glass = ((hi - lo) < GLASS_SATURATION * np.maximum(hi, 1)) & (lo > 170)
    if glass.mean() < 0.02:
        return float(BACKGROUND_LEVEL)
    return float(min(BACKGROUND_LEVEL, np.median(lo[glass]) - GLASS_MARGIN))


def is_tissue(rgb: np.ndarray) -> np.ndarray:
    """Pixels of an H×W×3 uint8 image that are not glass: the one glass rule of numpy code
    (darkest channel under the image's :func:`glass_level`)."""
    return rgb.min(axis=-1) < glass_level(rgb)


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
        # Scale by the bit depth the data uses (12-bit cameras write 16-bit files), not the type's.
        bits = max(8, int(np.ceil(np.log2(max(int(a.max()), 1) + 1))))
        top = 2**bits - 1
        notes.append(f"{a.dtype} image with {bits}-bit data (max {int(a.max())}) scaled to 8 bits by {top}")
        a = np.clip(a.astype(np.float32) * (255.0 / top), 0, 255).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        notes.append(f"{a.dtype} image scaled to 8 bits")
        scale = 255.0 if np.nanmax(a) <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
    else:
        raise ImageReadError(f"unsupported pixel type {a.dtype}")
    if a.shape[-1] == 4 and (a[..., 3] == 255).all():
        a = a[..., :3]  # opaque: nothing to composite
    if a.shape[-1] == 4:
        notes.append("alpha channel composited on white")
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1.0 - alpha)).round().astype(np.uint8)
    return np.ascontiguousarray(a)


def read_image(path: str | Path) -> ImageData:
    """Read an image file as RGB uint8. Raises :class:`ImageReadError` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path.name}: unsupported file type (use {', '.join(IMAGE_SUFFIXES)})")
    tags = None
    notices: list[str] = []
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                raw = tif.pages[0].asarray()
                tags = tiff_tag_mpp(tif)
                if len(tif.pages) > 1:
                    notices.append(f"multi-page TIFF: read page 1 of {len(tif.pages)} "
                                   f"({raw.shape[1]}×{raw.shape[0]} px, the first and full-resolution page)")
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                if im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "P", "PA"):
                    # CMYK's K would otherwise be read as alpha; Pillow knows each mode's maths.
                    notices.append(f"{im.mode} image converted to RGB")
                    im = im.convert("RGBA" if im.mode in ("P", "PA") else "RGB")
                raw = np.asarray(im)
    except ImageReadError:
        raise
    except Exception as exc:  # every decoder has its own exception types
        raise ImageReadError(f"{path.name}: cannot be read as an image ({exc.__class__.__name__}: {exc})") from exc
    try:
        rgb = to_rgb_uint8(raw, notices)
    except ImageReadError as exc:
        raise ImageReadError(f"{path.name}: {exc}") from exc
    return ImageData(rgb=rgb, pixel_size=resolve_mpp(tags=tags, path=path), tissue_class=bach_class_from_path(path),
                     notices=notices, path=str(path))
