"""The one owner of µm/px: where an image's pixel size comes from, and saying so.

Every entry point (reader, widgets, command line, export, report) asks
:func:`resolve_mpp`, and a segmentation result carries the answer, so sizes, densities and
exported training data all use the same number. An unknown pixel size stays unknown
(``mpp is None``): measurements are then in pixels and the user is told, never a guess.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BACH_MPP = 0.42  # the BACH challenge's stated scan resolution
MPP_RANGE = (0.01, 100.0)  # plausible µm/px; outside is a typo or a screen dpi

EXPLICIT, FILE_TAGS, BACH_NAME, FALLBACK, UNKNOWN = "given", "file tags", "BACH file name", "given for untagged files", "unknown"
ESTIMATED = "estimated from nucleus size"  # a working scale only (napari_bach.scale), never an image's own


@dataclass(frozen=True)
class PixelSize:
    """µm per pixel (None when unknown) and where that number came from."""

    mpp: float | None
    source: str = UNKNOWN

    @property
    def known(self) -> bool:
        return self.mpp is not None

    def describe(self) -> str:
        return f"{self.mpp:.4g} µm/px ({self.source})" if self.known else "µm/px unknown"

    def metadata(self) -> dict:
        """For layer metadata, CSVs and exported samples."""
        return {"mpp": self.mpp, "mpp_source": self.source}


def check_mpp(value: float) -> float:
    """A usable µm/px or a ValueError that says why."""
    value = float(value)
    if not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
        raise ValueError(f"µm/px must be between {MPP_RANGE[0]} and {MPP_RANGE[1]}, got {value:g}")
    return value


def resolve_mpp(explicit: float | None = None, tags: float | None = None, path: str | Path | None = None,
                fallback: float | None = None) -> PixelSize:
    """Explicit value > the file's own tags > BACH naming > a caller's fallback > unknown."""
    from .imageio import bach_class_from_path

    if explicit:
        return PixelSize(check_mpp(explicit), EXPLICIT)
    if tags:
        return PixelSize(float(tags), FILE_TAGS)
    if path is not None and bach_class_from_path(path) is not None:
        return PixelSize(BACH_MPP, BACH_NAME)
    if fallback:
        return PixelSize(check_mpp(fallback), FALLBACK)
    return PixelSize(None, UNKNOWN)


def tiff_tag_mpp(tif) -> float | None:
    """µm/px of an open ``tifffile.TiffFile``: Aperio ``MPP=`` or resolution tags in cm/inch."""
    page = tif.pages[0]
    found = re.search(r"MPP\s*=\s*([0-9.]+)", page.description or "")
    if found:
        return float(found.group(1))
    tags = page.tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
    if not num or not den:
        return None
    microns = {2: 25400.0, 3: 10000.0}.get(int(unit))
    if microns is None:
        return None
    mpp = microns / (num / den)
    # 72/96/300 dpi defaults are screen/print settings, not a microscope's pixel size.
    return mpp if 0.05 <= mpp <= 5.0 else None


def file_mpp(path: str | Path) -> float | None:
    """The µm/px a file's tags record (TIFF only), reading tags, not pixels."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff") or not path.is_file():
        return None
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tiff_tag_mpp(tif)
    except Exception:  # an unreadable file has no usable tags; the reader reports why
        return None


def tiff_resolution(mpp: float | None) -> dict:
    """``tifffile.imwrite`` keywords that record µm/px (pixels per cm), read by QuPath and Fiji."""
    if not mpp:
        return {}
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
