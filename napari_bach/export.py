"""The training-label export format, read back by ``src_train`` (Qt-free).

A dataset folder holds ``manifest.json`` and one folder per sample::

    DATASET/manifest.json
    DATASET/<sample>/image.png         lossless RGB
    DATASET/<sample>/labels.tif        int32 instance labels, 0 = background
    DATASET/<sample>/annotations.json  COCO (bbox, area, uncompressed RLE per nucleus)
    DATASET/<sample>/meta.json         µm/px, tissue class, source, model, thresholds, who/when

A sample is written to a temporary folder and renamed into place, so a failure leaves
nothing partial; an existing sample is never overwritten silently.
"""
from __future__ import annotations

import getpass
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .atomic import atomic_folder, atomic_write

FORMAT = "napari-bach-dataset"
VERSION = 1


class SampleExistsError(FileExistsError):
    """The dataset already has a sample of that name (choose to version or rename it)."""


def validate_labels(labels: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.shape != tuple(image_shape[:2]):
        raise ValueError(f"labels shape {labels.shape} does not match the image {tuple(image_shape[:2])}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels contain negative ids")
    if labels.size and labels.max() > np.iinfo(np.int32).max:
        raise ValueError("label ids exceed int32")
    return labels.astype(np.int32)


def check_sample_name(name: str) -> str:
    """A sample is one folder inside the dataset: a name that is a path (``a/b``,
    ``../x``) or hidden (``.x``, our temporary folders) would write elsewhere."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\:\0"):
        raise ValueError(f"{name!r} is not a sample name: use one folder name, without / \\ : or a leading dot")
    return name


def write_labels_tiff(path: str | Path, labels: np.ndarray, mpp: float | None) -> Path:
    """int32 instance labels, zlib-compressed, with µm/px in the resolution tags so QuPath
    and Fiji open them at scale."""
    import tifffile

    from .pixelsize import tiff_resolution

    tifffile.imwrite(path, np.asarray(labels, np.int32), compression="zlib", **tiff_resolution(mpp))
    return Path(path)


def rle_in_box(crop: np.ndarray, y0: int, x0: int, shape: tuple[int, int]) -> list[int]:
    """COCO uncompressed RLE (column-major, starting with background) of a mask that lies
    inside the box at (y0, x0), computed from the crop only."""
    height = shape[0]
    cols, rows = np.nonzero(crop.T)
    linear = (x0 + cols) * height + (y0 + rows)
    if linear.size == 0:
        return [shape[0] * shape[1]]
    breaks = np.flatnonzero(np.diff(linear) != 1)
    starts = np.concatenate([[linear[0]], linear[breaks + 1]])
    ends = np.concatenate([linear[breaks] + 1, [linear[-1] + 1]])
    counts = np.empty(2 * len(starts), np.int64)
    counts[0::2] = starts - np.concatenate([[0], ends[:-1]])
    counts[1::2] = ends - starts
    tail = shape[0] * shape[1] - ends[-1]
    return counts.tolist() + ([int(tail)] if tail else [])


def coco_annotations(labels: np.ndarray, mpp: float | None, tissue_class: str | None, file_name: str) -> dict:
    from scipy import ndimage

    h, w = labels.shape
    anns = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl] == i
        y, x = sl
        anns.append({"id": len(anns) + 1, "image_id": 1, "category_id": 1, "label": i, "iscrowd": 0,
                     "bbox": [x.start, y.start, x.stop - x.start, y.stop - y.start], "area": int(crop.sum()),
                     "segmentation": {"size": [h, w], "counts": rle_in_box(crop, y.start, x.start, (h, w))}})
    return {"images": [{"id": 1, "file_name": file_name, "width": w, "height": h, "mpp": mpp,
                        "tissue_class": tissue_class}],
            "categories": [{"id": 1, "name": "nucleus"}], "annotations": anns}


def _manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{root} holds a manifest.json of another tool")
        return data
    return {"format": FORMAT, "version": VERSION, "samples": []}


def _write_json_atomic(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def export_sample(root: str | Path, name: str, rgb: np.ndarray, labels: np.ndarray, mpp: float | None,
                  tissue_class: str | None = None, meta: dict | None = None, on_exists: str = "error") -> Path:
    """Add one sample to the dataset at ``root``; returns its folder.

    ``on_exists``: ``"error"`` raises :class:`SampleExistsError`, ``"version"`` writes
    ``name_v2``, ``name_v3``…, ``"replace"`` replaces it (an explicit user choice).
    """
    from PIL import Image

    root = Path(root)
    check_sample_name(name)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be RGB uint8, got {rgb.shape} {rgb.dtype}")
    labels = validate_labels(labels, rgb.shape)
    if not labels.any():  # a sample that teaches "no nuclei here" is almost always a mistake
        raise ValueError("the labels hold no nuclei: nothing to train on (segment or paint nuclei first)")
    root.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(root)
    target = root / name
    if target.exists():
        if on_exists == "version":
            k = 2
            while (root / f"{name}_v{k}").exists():
                k += 1
            target = root / f"{name}_v{k}"
        elif on_exists != "replace":
            raise SampleExistsError(f"{target} exists: choose to version it or replace it")
    tmp = atomic_folder(root, target.name)
    try:
        Image.fromarray(rgb).save(tmp / "image.png")
        write_labels_tiff(tmp / "labels.tif", labels, mpp)
        coco = coco_annotations(labels, mpp, tissue_class, "image.png")
        (tmp / "annotations.json").write_text(json.dumps(coco))
        info = {"format": FORMAT, "version": VERSION, "mpp": mpp, "tissue_class": tissue_class,
                "nuclei": len(coco["annotations"]), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "user": getpass.getuser(), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=1))
        if target.exists():  # "replace", chosen by the user
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["samples"] = [s for s in manifest["samples"] if s["folder"] != target.name]
    manifest["samples"].append({"folder": target.name, "nuclei": info["nuclei"], "mpp": mpp,
                                "tissue_class": tissue_class, "created": info["created"]})
    _write_json_atomic(root / "manifest.json", manifest)
    return target


def list_samples(root: str | Path) -> list[Path]:
    root = Path(root)
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"{root} is not a napari-bach dataset (no manifest.json)")
    return [root / s["folder"] for s in _manifest(root)["samples"]]


def read_sample(folder: str | Path) -> dict:
    """Image, labels and metadata of one exported sample."""
    import tifffile
    from PIL import Image

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    with Image.open(folder / "image.png") as im:
        rgb = np.asarray(im.convert("RGB"))
    return {"image": rgb, "labels": tifffile.imread(folder / "labels.tif").astype(np.int32), "mpp": meta.get("mpp"),
            "tissue_class": meta.get("tissue_class"), "meta": meta}
