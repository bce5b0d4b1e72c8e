"""npe2 reader: H&E images as RGB layers scaled in µm, BACH class in metadata."""
from __future__ import annotations

from pathlib import Path

from ..imageio import IMAGE_SUFFIXES, ImageReadError, read_image


def image_layer_kwargs(name: str, mpp: float | None, metadata: dict) -> dict:
    """Layer kwargs shared by the reader and the sample: µm scale when the pixel size is known."""
    kwargs = {"name": name, "rgb": True, "metadata": metadata}
    if mpp:
        kwargs.update(scale=(mpp, mpp), units=("um", "um"))
    return kwargs


def napari_get_reader(path):
    from ..slideio import SLIDE_SUFFIXES, is_slide

    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if is_slide(path):
        return read_slide
    if not str(path).lower().endswith(IMAGE_SUFFIXES + SLIDE_SUFFIXES):
        return None
    return read_he_image


def read_slide(path) -> list[tuple]:
    """A whole slide as a lazy multiscale layer (dask arrays over tiffslide's zarr store),
    scaled in µm; nothing is read until napari shows it."""
    from napari.utils.notifications import show_error, show_info

    from ..slideio import SlideReadError, open_slide

    path = path[0] if isinstance(path, list) else path
    try:
        slide = open_slide(path)
    except SlideReadError as exc:
        show_error(f"napari-bach: {exc}")
        return [(None,)]
    h, w = slide.shape
    if not slide.pixel_size.known:
        show_info(f"{Path(path).name}: µm/px unknown (no MPP or resolution tags): set it in Segment slide")
    meta = {**slide.pixel_size.metadata(), "tissue_class": None, "path": str(path), "slide": True,
            "notices": [f"whole slide {w}×{h} px, {len(slide.levels)} levels"]}
    return [(slide.dask_levels(), {**image_layer_kwargs(Path(path).name.split(".")[0], slide.pixel_size.mpp, meta),
                                   "multiscale": True}, "image")]


def read_he_image(path) -> list[tuple]:
    """Read one image; a bad file becomes an error notification, not a traceback."""
    from napari.utils.notifications import show_error, show_info

    path = path[0] if isinstance(path, list) else path
    try:
        data = read_image(path)
    except ImageReadError as exc:
        show_error(f"napari-bach: {exc}")
        return [(None,)]  # napari's "nothing to add" sentinel
    for note in data.notices:
        show_info(f"{Path(path).name}: {note}")
    for note in ([] if data.pixel_size.known else ["µm/px unknown (no resolution tags, not a BACH name): "
                                                   "set it in Segment nuclei to measure in µm"]):
        show_info(f"{Path(path).name}: {note}")
    meta = {**data.pixel_size.metadata(), "tissue_class": data.tissue_class, "path": str(path),
            "notices": data.notices}
    return [(data.rgb, image_layer_kwargs(Path(path).stem, data.mpp, meta), "image")]
