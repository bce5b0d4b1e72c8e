"""Headless ``python -m napari_bach segment`` writes the documented files."""
import csv
import subprocess
import sys

import numpy as np
import pytest
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
    assert main(["segment", str(folder), "--out", str(out), "--model", str(tiny_checkpoint), "--tissue-model", "none",
                 "--score-threshold", "0.05"]) == 1  # broken.png failed: not a silent success
    labels = tifffile.imread(out / "is004_labels.tif")
    assert labels.shape == (150, 170) and labels.dtype == np.int32
    assert tifffile.imread(out / "other_labels.tif").shape == (100, 120)  # the input's own size
    with open(out / "is004_nuclei.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == labels.max() and {"index", "score", "area_um2", "box_x0"} <= set(rows[0])
    # QuPath detections for single images too (issue 14.12): one closed polygon per nucleus
    import json

    features = json.loads((out / "is004_nuclei.geojson").read_text())["features"]
    assert len(features) == len(rows) and all(f["properties"]["objectType"] == "detection" for f in features)
    geometry = features[0]["geometry"]  # an untrained model's mask may come in pieces: a MultiPolygon
    ring = geometry["coordinates"][0] if geometry["type"] == "Polygon" else geometry["coordinates"][0][0]
    assert ring[0] == ring[-1] and len(ring) >= 4
    # the mask lies in its box, give or take torchvision's paste (box grown by one 28×28 mask
    # cell, then cut to whole pixels) and the outline's half pixel
    box = [float(rows[0][k]) for k in ("box_x0", "box_y0", "box_x1", "box_y1")]
    assert box[0] - 2.5 <= min(p[0] for p in ring) and max(p[0] for p in ring) <= box[2] + 2.5
    assert box[1] - 2.5 <= min(p[1] for p in ring) and max(p[1] for p in ring) <= box[3] + 2.5
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


def _png(path, shape=(90, 110), seed=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(synthetic_he(shape, seed=seed)[0]).save(path)
    return path


def test_same_names_in_different_folders_mirror_the_input_tree(tmp_path, tiny_checkpoint):
    """a/tile_0.png and b/tile_0.png used to write one tile_0_labels.tif between them."""
    _png(tmp_path / "in" / "a" / "tile_0.png", seed=1)
    _png(tmp_path / "in" / "b" / "tile_0.png", (70, 80), seed=2)
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--mpp", "0.5"]) == 0
    assert tifffile.imread(out / "a" / "tile_0_labels.tif").shape == (90, 110)
    assert tifffile.imread(out / "b" / "tile_0_labels.tif").shape == (70, 80)
    assert (out / "a" / "tile_0_nuclei.csv").is_file() and (out / "b" / "tile_0_nuclei.csv").is_file()


def test_inputs_that_would_overwrite_each_other_are_refused_before_any_work(tmp_path, tiny_checkpoint, capsys):
    _png(tmp_path / "in" / "b" / "tile_0.png")
    Image.open(tmp_path / "in" / "b" / "tile_0.png").save(tmp_path / "in" / "b" / "tile_0.jpg")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "same output files" in err and "tile_0.png" in err and "tile_0.jpg" in err
    assert not out.exists()  # nothing written


def test_exit_code_and_count_when_inputs_fail(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    args = ["--out", str(tmp_path / "out"), "--model", str(tiny_checkpoint)]
    assert main(["segment", str(tmp_path / "broken.png"), str(tmp_path / "missing.tif"), *args]) == 1
    assert "0 of 2 images segmented, 2 failed" in capsys.readouterr().err
    good = _png(tmp_path / "good.png")
    assert main(["segment", str(good), *args]) == 0
    assert "1 of 1 images segmented, 0 failed" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--mpp", "0"], "µm/px must be between"),  # 0 used to mean "not given"
    (["--mpp", "-1"], "µm/px must be between"),  # gave 0 nuclei with exit 0
    (["--score-threshold", "2"], "score threshold must be between 0 and 1"),
    (["--nms-iou", "0"], "NMS IoU must be above 0"),
    (["--device", "gpu"], "this machine has: cpu"),
    (["--device", "cuda"], "not available here"),
])
def test_impossible_arguments_are_argparse_errors(tmp_path, extra, message, capsys):
    """In the process (the entry point itself is run by the next test): argparse exits 2."""
    if "cuda" in extra and "cuda" in __import__("napari_bach.predict", fromlist=["x"]).available_devices():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(tmp_path), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_and_view_of_a_missing_image_are_messages(tmp_path):
    (tmp_path / "taken").write_text("x")
    # a wrong argument exits 2; an image that cannot be read (missing too) exits 1, as README says (issue 28.20)
    for argv, message, code in ((["segment", str(tmp_path), "--out", str(tmp_path / "taken")], "not a folder", 2),
                                (["view", str(tmp_path / "missing.png")], "no such file", 1)):
        proc = subprocess.run([sys.executable, "-m", "napari_bach", *argv], capture_output=True, text=True)
        assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr


def test_help_is_plain_text_with_every_option_explained():
    from napari_bach.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["segment"].format_help()
    assert "``" not in text and "`" not in build_parser().format_help()
    for option in ("--out", "--model", "--mpp", "--score-threshold", "--nms-iou", "--device"):
        line = text[text.index(option):].split("\n--")[0]
        assert len(line.split()) > 3, option  # an explanation, not the bare flag
    assert "default: cpu" in text


def test_pixel_size_per_image_tags_first_and_labels_carry_it(tmp_path, tiny_checkpoint, capsys):
    """Mixed folder: a tagged TIFF keeps its own µm/px, --mpp fills in for the untagged
    PNG, a grayscale conversion is said, and label TIFFs open at scale in QuPath/Fiji."""
    from napari_bach.pixelsize import file_mpp

    folder = tmp_path / "in"
    rgb = synthetic_he((80, 90), seed=3)[0]
    folder.mkdir()
    tifffile.imwrite(folder / "tagged.tif", rgb, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    out = tmp_path / "out"
    assert main(["segment", str(folder), "--out", str(out), "--model", str(tiny_checkpoint), "--mpp", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "grayscale image converted to RGB" in err
    with open(out / "summary.csv") as fh:
        rows = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert (rows["tagged.tif"]["mpp"], rows["tagged.tif"]["mpp_source"]) == ("0.25", "file tags")
    assert (rows["gray.png"]["mpp"], rows["gray.png"]["mpp_source"]) == ("0.5", "given for untagged files")
    assert file_mpp(out / "tagged_labels.tif") == pytest.approx(0.25)
    assert file_mpp(out / "gray_labels.tif") == pytest.approx(0.5)


def test_unknown_pixel_size_is_said_and_sizes_stay_in_pixels(tmp_path, tiny_checkpoint, capsys):
    png = _png(tmp_path / "plain.png")
    out = tmp_path / "out"
    assert main(["segment", str(png), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--score-threshold", "0.05"]) == 0
    assert "µm/px unknown" in capsys.readouterr().err
    with open(out / "summary.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["mpp"] == "" and row["mpp_source"] == "unknown"
    with open(out / "plain_nuclei.csv") as fh:
        nuclei = list(csv.DictReader(fh))
    assert nuclei and all(r["area_um2"] == "nan" and float(r["area_px"]) > 0 for r in nuclei)


def test_view_of_a_corrupt_image_fails_and_view_without_a_display_says_so(tmp_path):
    """Issue 14.3 and 14.10: a scripted `view --screenshot` of a broken file exited 0 with
    an empty viewer; without a display Qt aborted (exit 134)."""
    import os

    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    proc = subprocess.run([sys.executable, "-m", "napari_bach", "view", str(tmp_path / "corrupt.png"), "--screenshot",
                           str(tmp_path / "out.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "corrupt.png" in proc.stderr and not (tmp_path / "out.png").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    proc = subprocess.run([sys.executable, "-m", "napari_bach", "view"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "xvfb-run" in proc.stderr and "Traceback" not in proc.stderr


def test_a_used_out_is_refused_and_the_summary_keeps_earlier_images(tmp_path, tiny_checkpoint, capsys):
    """Issue 28.5: a re-run silently overwrote the results, and another image's run
    replaced summary.csv while the first image's files stayed."""
    _png(tmp_path / "a.png", seed=1)
    _png(tmp_path / "b.png", seed=2)
    run = ["--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint), "--tissue-model", "none"]
    assert main(["segment", str(tmp_path / "a.png"), *run]) == 0
    before = (tmp_path / "o" / "a_labels.tif").read_bytes()
    assert main(["segment", str(tmp_path / "a.png"), *run, "--score-threshold", "0.9"]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "o" / "a_labels.tif").read_bytes() == before
    assert main(["segment", str(tmp_path / "b.png"), *run]) == 0
    with open(tmp_path / "o" / "summary.csv") as fh:
        assert sorted(r["image"].rsplit("/", 1)[-1] for r in csv.DictReader(fh)) == ["a.png", "b.png"]
    assert main(["segment", str(tmp_path / "a.png"), *run, "--overwrite"]) == 0


def test_a_full_disk_fails_that_image_only_and_leaves_no_half_file(tmp_path, tiny_checkpoint, monkeypatch):
    """Issue 28.7: a traceback, a truncated GeoJSON under its final name, no summary."""
    import napari_bach.geojson as geojson

    _png(tmp_path / "in" / "a.png", seed=1)
    _png(tmp_path / "in" / "b.png", seed=2)
    real = geojson.write_geojson

    def full_for_a(path, *args):
        if "a_nuclei" in str(path) or str(path).startswith(str(tmp_path / "o" / ".a_nuclei")):
            path.write_text('{"type": "FeatureCollection", "feat')  # half written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(path, *args)
    monkeypatch.setattr(geojson, "write_geojson", full_for_a)
    code = main(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint),
                 "--tissue-model", "none"])
    assert code == 1
    left = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert "a_nuclei.geojson" not in left and not [n for n in left if n.startswith(".")]  # no half file, no temp
    assert {"b_labels.tif", "b_nuclei.csv", "b_nuclei.geojson", "summary.csv"} <= set(left)
    with open(tmp_path / "o" / "summary.csv") as fh:
        rows = {r["image"].rsplit("/", 1)[-1]: r for r in csv.DictReader(fh)}
    assert "No space left" in rows["a.png"]["error"] and rows["b.png"]["error"] == ""


def test_a_read_only_out_is_a_message_and_exit_2(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """Issue 28.8: a raw OSError traceback, exit 1. (Root writes into read-only folders, so
    the folder's refusal is simulated where the probe file is made.)"""
    import napari_bach.cli as cli

    _png(tmp_path / "a.png")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(cli.tempfile, "TemporaryFile", refuse)
    assert main(["segment", str(tmp_path / "a.png"), "--out", str(tmp_path / "ro"), "--model", str(tiny_checkpoint),
                 "--tissue-model", "none"]) == 2
    assert "cannot write into" in capsys.readouterr().err and not (tmp_path / "ro" / "summary.csv").exists()
