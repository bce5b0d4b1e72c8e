"""npe2 writer: an image layer and a labels layer become one training sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..export import export_sample
from ..imageio import to_rgb_uint8


def write_training_sample(path: str, layer_data: list[tuple]) -> list[str]:
    """``path`` is the dataset folder; the sample is named after the image layer and is
    versioned (``_v2``…) rather than overwritten when it exists."""
    images = [(d, m) for d, m, t in layer_data if t == "image"]
    labels = [(d, m) for d, m, t in layer_data if t == "labels"]
    if len(images) != 1 or len(labels) != 1:
        raise ValueError("select exactly one image layer and one labels layer to export a training sample")
    (img, img_meta), (lab, lab_meta) = images[0], labels[0]
    meta = img_meta.get("metadata") or {}
    result = lab_meta.get("metadata") or {}
    mpp = result["mpp"] if "mpp_source" in result else meta.get("mpp")  # the result's own µm/px first
    probs = result.get("tissue_probs")
    tissue = max(probs, key=probs.get) if probs else meta.get("tissue_class")
    folder = export_sample(path, img_meta.get("name", "image"), to_rgb_uint8(np.asarray(img)), np.asarray(lab),
                           mpp, tissue, {"source": meta.get("path"), "writer": "napari-bach npe2 writer"},
                           on_exists="version")
    return [str(Path(folder))]
