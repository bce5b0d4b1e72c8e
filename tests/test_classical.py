"""The classical baseline (hematoxylin, Otsu, watershed): lengths in µm, parameters chosen
on training images only, scored like a model. Synthetic images."""
from __future__ import annotations

import json

import numpy as np
import tifffile
from PIL import Image

from napari_bach.synthetic import synthetic_he
from src_train.__main__ import main
from src_train.classical import GRID, classical_nuclei
from src_train.metrics import nucleus_metrics


def test_the_baseline_finds_synthetic_nuclei_at_any_scan_scale():
    counts = []
    for mpp in (0.25, 0.5):  # the same tissue (its layout is drawn in µm) scanned at 40× and 20×
        rgb, truth = synthetic_he((int(128 / mpp),) * 2, mpp=mpp, seed=3)
        labels = classical_nuclei(rgb, mpp)
        assert labels.dtype == np.int32
        assert nucleus_metrics(truth, labels)["f1"] > 0.9
        counts.append(len(np.unique(labels)) - 1)
    assert abs(counts[0] - counts[1]) <= 0.05 * max(counts)
    assert classical_nuclei(np.full((64, 64, 3), 255, np.uint8), 0.5).max() == 0  # glass: nothing, no error


def test_baseline_command_tunes_on_training_images_and_scores_the_held_out(tmp_path, capsys):
    (tmp_path / "syn" / "images").mkdir(parents=True)
    (tmp_path / "syn" / "labels").mkdir()
    for i in range(5):
        rgb, labels = synthetic_he((160, 160), mpp=0.5, seed=20 + i)
        Image.fromarray(rgb).save(tmp_path / "syn" / "images" / f"img{i}.png")
        tifffile.imwrite(tmp_path / "syn" / "labels" / f"img{i}.tif", labels.astype(np.int32))
    data = ["--data", f"syn:{tmp_path / 'syn'}:0.5"]
    assert main(["baseline", *data, "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    held = {m["image"] for m in result["nuclei_per_image"]}
    tuned = result["tuned_on"]
    assert held and len(tuned) == len(GRID["smooth_um"]) * len(GRID["min_distance_um"])
    assert tuned[0]["images"] == 5 - len(held)  # chosen on the training images, none of the held-out ones
    best = max(tuned, key=lambda r: r["pq"])
    assert (result["params"]["smooth_um"], result["params"]["min_distance_um"]) == (best["smooth_um"], best["min_distance_um"])
    assert result["nuclei"]["f1"] > 0.9
    capsys.readouterr()
    assert main(["baseline", *data, "--val-organ", "breast"]) == 2  # no breast image here
    assert "error: no breast images" in capsys.readouterr().err
