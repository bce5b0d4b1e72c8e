"""Whole slides read lazily with tiffslide: what is a slide, its levels, µm/px, pixels on
demand and a low-resolution tissue mask. No torch here, so napari's reader stays light."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imageio import is_tissue
from .pixelsize import PixelSize, resolve_mpp

SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".bif")
TIFF_SUFFIXES = (".tif", ".tiff")
PLAIN_TIFF_MAX_PIXELS = 10_000 * 10_000  # a flat TIFF larger than this is opened as a slide


class SlideReadError(ValueError):
    """A slide that cannot be opened; the message names the file and the reason."""


def is_slide(path: str | Path) -> bool:
    """Whole-slide formats, and TIFFs that are pyramids or too large to read whole."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SLIDE_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES or not path.is_file():
        return False
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pixels = int(np.prod(series.shape[:2])) if len(series.shape) >= 2 else 0
            return len(series.levels) > 1 or pixels > PLAIN_TIFF_MAX_PIXELS
    except Exception:  # unreadable: the plain reader reports why
        return False


@dataclass
class Slide:
    """An open slide: level geometry and µm/px, pixels read on demand."""

    path: Path
    handle: object  # tiffslide.TiffSlide
    pixel_size: PixelSize

    @property
    def shape(self) -> tuple[int, int]:
        w, h = self.handle.dimensions
        return h, w

    @property
    def levels(self) -> list[tuple[int, int]]:
        return [(h, w) for w, h in self.handle.level_dimensions]

    @property
    def downsamples(self) -> list[float]:
        return list(self.handle.level_downsamples)

    def read(self, y0: int, x0: int, y1: int, x1: int, level: int = 0) -> np.ndarray:
        """RGB uint8 pixels of level ``level`` (coordinates in that level's pixels)."""
        factor = self.downsamples[level]
        loc = (int(round(x0 * factor)), int(round(y0 * factor)))  # tiffslide wants level-0 location
        rgb = self.handle.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True)
        return np.ascontiguousarray(rgb[..., :3])

    def dask_levels(self) -> list:
        """Every level as a lazy dask array (napari's multiscale image)."""
        import dask.array as da

        group = self.handle.zarr_group
        return [da.from_zarr(group[str(i)])[..., :3] for i in range(len(self.levels))]

    def close(self) -> None:
        self.handle.close()


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open with tiffslide (pure Python on tifffile: no system library to install)."""
    path = Path(path)
    if not path.is_file():
        raise SlideReadError(f"{path}: no such file")
    try:
        import tiffslide

        handle = tiffslide.TiffSlide(path)
    except Exception as exc:
        raise SlideReadError(f"{path.name}: cannot be opened as a slide ({exc.__class__.__name__}: {exc})") from exc
    tags = handle.properties.get("tiffslide.mpp-x")
    pixel_size = resolve_mpp(explicit=mpp, tags=float(tags) if tags else None, path=path)
    return Slide(path, handle, pixel_size)


def overview(slide: Slide, max_pixels: int = 4_000_000) -> tuple[np.ndarray, float]:
    """The whole slide in at most ``max_pixels`` (the coarsest level with at least a
    sixteenth of that, or level 0 read in strides); returns it and its downsample."""
    level = len(slide.levels) - 1
    for k, (h, w) in enumerate(slide.levels):
        if h * w <= max_pixels:
            level = k
            break
    h, w = slide.levels[level]
    if h * w > max_pixels:  # no small level: read level 0 in strides
        step = int(np.ceil(np.sqrt(h * w / max_pixels)))
        rows = [slide.read(y, 0, min(y + 1, h), w)[:, ::step] for y in range(0, h, step)]
        return np.concatenate(rows), float(step)
    return slide.read(0, 0, h, w, level), slide.downsamples[level]


def tissue_mask(slide: Slide, max_pixels: int = 4_000_000) -> tuple[np.ndarray, float]:
    """Non-glass pixels of the slide's :func:`overview` (a few MB whatever the slide);
    returns the mask and its downsample from level 0."""
    from scipy import ndimage

    rgb, factor = overview(slide, max_pixels)
    mask = is_tissue(rgb)
    return ndimage.binary_dilation(ndimage.binary_opening(mask, iterations=1), iterations=2), factor
