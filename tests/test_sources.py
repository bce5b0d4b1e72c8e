"""The data list: one way in for every labelled source, held-out groups reported apart,
warm starts and time-scheduled runs. Synthetic folders in each layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from napari_bach.synthetic import synthetic_he
from src_train.__main__ import main
from src_train.sources import Source, load_sources, parse_data_arg, read_data_list


def _monuseg(root, names):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, name in enumerate(names):
        rgb, labels = synthetic_he((96, 96), mpp=0.25, seed=i)
        tifffile.imwrite(root / "images" / f"{name}.tif", rgb)
        Image.fromarray(labels.astype(np.uint16)).save(root / "masks" / f"{name}.png")


def _folder(root, names, suffix=".png"):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, name in enumerate(names):
        rgb, labels = synthetic_he((80, 80), mpp=0.5, seed=10 + i)
        Image.fromarray(rgb).save(root / "images" / f"{name}{suffix}")
        tifffile.imwrite(root / "labels" / f"{name}.tif", labels.astype(np.int32))


@pytest.fixture
def data_list(tmp_path):
    _monuseg(tmp_path / "mon", ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-G9-6336-01Z-00-DX1"])
    _folder(tmp_path / "cpm", ["image01", "image09", "image10"])
    _folder(tmp_path / "con", ["train_1_000", "test_1_000"], ".jpg")
    toml = tmp_path / "data.toml"
    toml.write_text('''
[[source]]
name = "monuseg"
path = "mon"
weight = 6
val = ["organ:breast"]
license = "CC BY-NC-SA 4.0"

[[source]]
name = "cpm15"
path = "cpm"
mpp = 0.25
mpp_by_name = { "image0[1-7]" = 0.5 }
weight = 4
val = ["image10"]

[[source]]
name = "consep"
path = "con"
mpp = 0.26
val = ["test_1_*"]
''')
    return toml


def test_a_data_list_reads_every_layout_with_its_scale_weight_and_held_out_groups(data_list):
    split = load_sources(read_data_list(data_list))
    by_name = {s.name: s for s in split.train}
    assert set(by_name) == {"TCGA-B0-5698-01Z-00-DX1", "TCGA-G9-6336-01Z-00-DX1", "image01", "image09", "train_1_000"}
    assert by_name["image01"].mpp == 0.5 and by_name["image09"].mpp == 0.25  # per-image scale by pattern
    assert by_name["train_1_000"].mpp == 0.26 and by_name["TCGA-B0-5698-01Z-00-DX1"].mpp == pytest.approx(0.2527)
    assert (by_name["image09"].weight, by_name["TCGA-G9-6336-01Z-00-DX1"].weight, by_name["train_1_000"].weight) == (4, 6, 1)
    assert {k: [s.name for s in v] for k, v in split.val.items()} == {
        "monuseg": ["TCGA-A7-A13E-01Z-00-DX1"], "cpm15": ["image10"], "consep": ["test_1_000"]}
    assert all(s.exact and s.labels.max() > 1 for v in split.val.values() for s in v)  # 16/32-bit ids are exact
    assert "monuseg: 2 images ×6, CC BY-NC-SA 4.0, 1 held out" in split.notes


def test_weights_decide_how_often_an_image_is_drawn(data_list):
    from src_train.augment import AugmentConfig
    from src_train.loader import CropStream, crop_seed

    split = load_sources(read_data_list(data_list))
    stream = CropStream(split.train, AugmentConfig(crop=32, jpeg_p=0), seed=1)
    counts = np.zeros(len(stream.images))
    for i in range(400):  # which image crop i comes from: its generator's first draw
        gen = torch.Generator().manual_seed(crop_seed(1, 0, i))
        counts[int(torch.multinomial(stream.weights, 1, generator=gen))] += 1
    weights = np.array([s.weight for s in split.train])
    np.testing.assert_allclose(counts / counts.sum(), weights / weights.sum(), atol=0.06)


def test_data_arguments_and_their_errors(tmp_path, data_list, capsys):
    src = parse_data_arg(f"cpm:{tmp_path / 'cpm'}:0.5:3")[0]
    assert (src.name, src.mpp, src.weight) == ("cpm", 0.5, 3.0)
    assert parse_data_arg(f"cpm:{tmp_path / 'cpm'}")[0].mpp is None
    for bad, message in [("onlyname", "NAME:PATH"), (f"x:{tmp_path}:fast", "must be numbers"),
                         (f"x:{tmp_path / 'cpm'}:0.5:0", "weight must be positive"),
                         (f"x:{tmp_path / 'cpm'}:40", "not a microscope scale")]:
        with pytest.raises(ValueError, match=message):
            parse_data_arg(bad)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        Source("gone", tmp_path / "gone").load()
    with pytest.raises(ValueError, match="has no µm/px"):
        Source("cpm", tmp_path / "cpm").load()  # PNGs carry no scale and none was given
    (tmp_path / "bad.toml").write_text('[[source]]\nname = "x"\npath = "mon"\nspeed = 2\n')
    with pytest.raises(ValueError, match="unknown keys"):
        read_data_list(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="names must differ"):
        load_sources([Source("a", tmp_path / "cpm", 0.5), Source("a", tmp_path / "con", 0.5)])
    capsys.readouterr()
    assert main(["train", "--data", f"x:{tmp_path / 'gone'}:0.5", "--out", str(tmp_path / "run")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "run").exists()  # a message, nothing written


def test_train_on_a_data_list_validates_per_group_then_warm_starts_on_a_time_budget(tmp_path, data_list, capsys):
    common = ["--data", str(data_list), "--crop", "64", "--no-progress", "--threads", "2"]
    assert main(["train", *common, "--out", str(tmp_path / "a"), "--max-steps", "2", "--val-every-steps", "2",
                 "--backbone", "mobilenet_v2", "--mpp", "0.5"]) == 0
    val = json.loads((tmp_path / "a" / "val.jsonl").read_text().splitlines()[-1])
    assert {"monuseg", "cpm15", "consep"} <= set(val) and val["monuseg"]["images"] == 1
    assert val["pq"] == pytest.approx(np.mean([val[g]["pq"] for g in ("monuseg", "cpm15", "consep")]))

    # --init: the checkpoint's architecture (FPN narrowed on request), a new schedule;
    # --max-hours ends the run on time
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "last.pt"),
                 "--max-hours", "0.0005", "--val-every-steps", "1000", "--fpn-channels", "64"]) == 0
    err = capsys.readouterr().err
    assert "warm start from" in err
    from napari_bach.checkpoint import read_checkpoint

    payload = read_checkpoint(tmp_path / "b" / "last.pt")
    assert payload["config"]["backbone"] == "mobilenet_v2" and payload["config"]["mpp"] == 0.5
    assert payload["config"]["fpn_channels"] == 64
    assert "warm-started from last.pt" in payload["info"]["notes"]
    assert main(["train", *common, "--out", str(tmp_path / "b"), "--init", str(tmp_path / "a" / "last.pt"),
                 "--max-hours", "0.001", "--val-every-steps", "1000", "--fpn-channels", "64", "--resume"]) == 0
    resumed = read_checkpoint(tmp_path / "b" / "last.pt")
    assert "warm-started from last.pt" in resumed["info"]["notes"]  # kept on resume
    # warm starts add up (issue 28.12): the first run's 2 steps and hours are behind the second's
    first = read_checkpoint(tmp_path / "a" / "last.pt")["info"]
    assert first["steps"] == 2 and first["hours"] > 0
    assert resumed["info"]["steps"] == 2 + resumed["train_state"]["step"]
    assert resumed["info"]["hours"] == pytest.approx(first["hours"] + resumed["train_state"]["seconds"] / 3600)
    assert 1.8 <= payload["train_state"]["seconds"] < 30  # stopped once 1.8 s of training were spent
    assert (tmp_path / "b" / "best.pt").exists()  # the final weights were validated
    # evaluate on the same held-out groups: each reported apart, with the sweep of group means
    assert main(["evaluate", "--data", str(data_list), "--model", str(tmp_path / "b" / "last.pt"),
                 "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(result["groups"]) == {"monuseg", "cpm15", "consep"} and result["nuclei"]["images"] == 3
    mean_f1 = np.mean([g["score_sweep"][2]["f1"] for g in result["groups"].values()])
    assert result["group_mean_sweep"][2]["f1"] == pytest.approx(mean_f1)
    assert main(["train", *common, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "a" / "last.pt"),
                 "--backbone", "resnet18"]) == 2
    assert "cannot start from it" in capsys.readouterr().err
