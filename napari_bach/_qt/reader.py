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
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(IMAGE_SUFFIXES):
        return None
    return read_he_image


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
