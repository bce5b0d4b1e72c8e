"""Headless ``python -m napari_bach segment`` writes the documented files."""
import csv
import subprocess
import sys

import numpy as np
import tifffile
from PIL import Image

from napari_bach.cli import main
from napari_bach.synthetic import synthetic_he


def test_segment_writes_labels_tables_and_summary(tmp_path, tiny_checkpoint):
    folder = tmp_path / "in"
    folder.mkdir()
    rgb, _ = synthetic_he((150, 170), seed=6)
    tifffile.imwrite(folder / "is004.tif", rgb)
    Image.fromarray(rgb[:100, :120]).save(folder / "other.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--score-threshold", "0.05"]) == 1  # broken.png failed: not a silent success
    labels = tifffile.imread(out / "is004_labels.tif")
    assert labels.shape == (150, 170) and labels.dtype == np.int32
    assert tifffile.imread(out / "other_labels.tif").shape == (100, 120)  # the input's own size
    with open(out / "is004_nuclei.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == labels.max() and {"index", "score", "area_um2", "box_x0"} <= set(rows[0])
    with open(out / "summary.csv") as fh:
        summary = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert summary["is004.tif"]["nuclei"] == str(labels.max())
    assert summary["is004.tif"]["tissue_class"] == "not trained" and summary["is004.tif"]["mpp"] == "0.42"
    assert "broken.png" in summary["broken.png"]["error"]


def test_segment_with_a_foreign_checkpoint_exits_with_a_message(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"nope")
    proc = subprocess.run([sys.executable, "-m", "napari_bach", "segment", str(tmp_path), "--out", str(tmp_path / "o"),
                           "--model", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a PyTorch checkpoint" in proc.stderr and "Traceback" not in proc.stderr
