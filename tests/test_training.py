"""src_train on tiny synthetic data: readers, augmentation, steps, resume, metrics."""
from dataclasses import replace
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import tiny_config
from napari_bach.model import build_model
from napari_bach.synthetic import synthetic_he
from src_train.augment import AugmentConfig, augment
from src_train.datasets import (Sample, instances_from_labels, load_bach, load_monuseg, read_aperio_xml, read_mask,
                                rescale_sample, stratified_split)
from src_train.metrics import nucleus_metrics, roc_auc, tissue_metrics
from src_train.train import Trainer, TrainConfig

XML = """<Annotations MicronsPerPixel="0.252700"><Annotation><Regions>
<Region Id="1"><Vertices><Vertex X="2" Y="3"/><Vertex X="10" Y="3"/><Vertex X="10" Y="9"/><Vertex X="2" Y="9"/></Vertices></Region>
<Region Id="2"><Vertices><Vertex X="20" Y="20"/><Vertex X="28" Y="20"/><Vertex X="24" Y="28"/></Vertices></Region>
</Regions></Annotation></Annotations>"""


def test_aperio_xml_polygons_become_instances(tmp_path):
    (tmp_path / "a.xml").write_text(XML)
    labels, mpp = read_aperio_xml(tmp_path / "a.xml", (32, 32))
    assert mpp == pytest.approx(0.2527) and labels.max() == 2
    assert (labels[4:9, 3:10] == 1).all() and labels[24, 24] == 2 and labels[0, 0] == 0


def test_monuseg_layout_prefers_polygons_and_splits_binary_masks(tmp_path):
    for d in ("images", "annotations", "masks"):
        (tmp_path / d).mkdir()
    img = np.full((32, 32, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "images/A.tif", img)
    tifffile.imwrite(tmp_path / "images/B.tif", img)
    (tmp_path / "annotations/A.xml").write_text(XML)
    yy, xx = np.mgrid[:32, :32]
    two_touching = ((yy - 16) ** 2 + (xx - 9) ** 2 < 36) | ((yy - 16) ** 2 + (xx - 20) ** 2 < 36)
    Image.fromarray((two_touching * 255).astype(np.uint8)).save(tmp_path / "masks/B.png")
    a, b = load_monuseg(tmp_path)
    assert (a.name, a.exact, a.labels.max(), a.mpp) == ("A", True, 2, pytest.approx(0.2527))
    assert b.exact is False and b.labels.max() == 2  # the touching discs are split
    assert set(np.unique(b.labels[16, 4:15])) == {1} or set(np.unique(b.labels[16, 4:15])) == {2}


def test_instance_mask_ids_are_kept(tmp_path):
    m = np.zeros((10, 10), np.uint16)
    m[1:3, 1:3], m[5:8, 5:8], m[0, 9] = 3, 7, 9
    Image.fromarray(m).save(tmp_path / "m.png")
    labels, exact = read_mask(tmp_path / "m.png")
    assert set(np.unique(labels)) == {0, 3, 7, 9} and exact


def test_bach_folders_and_stratified_seeded_split(tmp_path):
    for cls, prefix in (("Normal", "n"), ("Benign", "b"), ("InSitu", "is"), ("Invasive", "iv")):
        (tmp_path / cls).mkdir()
        for i in range(5):
            tifffile.imwrite(tmp_path / cls / f"{prefix}{i:03d}.tif", np.full((8, 8, 3), i, np.uint8))
    samples = load_bach(tmp_path)
    assert len(samples) == 20 and {s.tissue for s in samples} == {0, 1, 2, 3}
    assert all(s.labels is None and s.mpp == 0.42 for s in samples)
    train, val = stratified_split(samples, 0.2, seed=1)
    assert sorted(s.tissue for s in val) == [0, 1, 2, 3] and len(train) == 16
    assert not {s.name for s in train} & {s.name for s in val}
    assert [s.name for s in stratified_split(samples, 0.2, seed=1)[1]] == [s.name for s in val]
    folds = [stratified_split(samples, folds=5, fold=k, seed=1)[1] for k in range(5)]
    names = [s.name for f in folds for s in f]
    assert len(names) == 20 and len(set(names)) == 20  # every image held out exactly once


def test_rescale_keeps_instances():
    rgb, labels = synthetic_he((200, 200), mpp=0.25, seed=0)
    s = rescale_sample(Sample(rgb, labels, 0.25), 0.5)
    assert s.image.shape == (100, 100, 3) and s.labels.shape == (100, 100) and s.mpp == 0.5
    assert len(np.unique(s.labels)) > 0.8 * len(np.unique(labels))


def test_augmentation_keeps_image_masks_and_boxes_aligned():
    from src_train.augment import to_tensor

    rgb, labels = synthetic_he((300, 300), mpp=0.4, seed=2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        # geometry is under test: colour as mild as v9's recipe, so "dark" still means hematoxylin
        cfg = AugmentConfig(crop=160, scale=(0.8, 1.25), hue=0.04, stain_sigma=0.1, gray_p=0.0)
        img, lab = augment(to_tensor(rgb), torch.from_numpy(labels), gen, cfg)
        img = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        lab = lab.numpy().astype(np.int32)
        dark = img.astype(int).sum(-1) < 450  # hematoxylin-dark pixels
        inside = dark[lab > 0].mean()
        outside = dark[lab == 0].mean()
        shifted = dark[np.roll(lab, 5, axis=1) > 0].mean()  # a 5-pixel misalignment, for contrast
        assert inside > 0.6 and outside < 0.02 and shifted < inside - 0.2, (inside, outside, shifted)
        boxes, masks, ids = instances_from_labels(lab)
        for (x0, y0, x1, y1), m in zip(boxes.astype(int), masks):
            ys, xs = np.nonzero(m)
            assert (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1) == (y0, x0, y1, x1)


def _synthetic_samples(n, size=192, seed=0):
    return [Sample(*synthetic_he((size, size), mpp=0.4, seed=seed + i), mpp=0.4, name=f"s{i}") for i in range(n)]


def _trainer(tmp_path, **kw):
    cfg = TrainConfig(out=str(tmp_path), max_steps=kw.pop("max_steps", 40), warmup_steps=5, checkpoint_every=1000,
                      val_every=1000, seed=3, **kw)
    cfg.augment = AugmentConfig(crop=128)
    return Trainer(tiny_config(), cfg, _synthetic_samples(3), [])


def test_a_few_training_steps_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    t = _trainer(tmp_path)
    losses = [t.train_step()["loss"] for _ in range(25)]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])


def test_channels_last_training_as_on_a_gpu_gives_the_same_losses(tmp_path):
    """The GPU's memory layout (channels-last weights, the transform's batches), on the CPU:
    a CPU twin of the CUDA path, which CI cannot run."""
    losses = []
    for layout in ("plain", "channels_last"):
        torch.manual_seed(0)  # the same initial weights and samplers
        t = _trainer(tmp_path / layout, max_steps=4)
        if layout == "channels_last":
            t.model.to(memory_format=torch.channels_last)
            t.model.transform.channels_last = True
        losses.append([t.train_step()["loss"] for _ in range(2)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)


def test_resume_continues_the_same_run(tmp_path):
    t = _trainer(tmp_path / "a", max_steps=6)
    for _ in range(3):
        t.train_step()
    t.save("last.pt")
    expected = [t.train_step()["loss"] for _ in range(3)]
    resumed = _trainer(tmp_path / "b", max_steps=6)
    resumed.resume(tmp_path / "a" / "last.pt")
    assert resumed.step == 3
    got = [resumed.train_step()["loss"] for _ in range(3)]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert resumed.step == 6


def test_ship_writes_a_small_fp16_model_with_measured_metrics(tmp_path):
    from napari_bach.checkpoint import load_checkpoint, read_checkpoint
    from src_train.__main__ import main
    t = _trainer(tmp_path / "run", max_steps=2)
    t.train_step()
    t.save("last.pt")
    (tmp_path / "metrics.json").write_text(json.dumps({"nuclei": {"f1": 0.5, "aji": 0.3, "pq": 0.4}}))
    (tmp_path / "log.csv").write_text("step,seconds\n1,1800\n2,1800\n")
    out = tmp_path / "default.pt"
    assert main(["ship", str(tmp_path / "run" / "last.pt"), "--out", str(out), "--metrics", str(tmp_path / "metrics.json"),
                 "--metrics-command", "python -m src_train evaluate ...", "--log", str(tmp_path / "log.csv"),
                 "--score-threshold", "0.4", "--config", "max_candidates_per_tile=300",
                 "--config", "candidate_score=0.1", "--config", "mask_threshold=0.6"]) == 0
    payload = read_checkpoint(out)
    assert "train_state" not in payload
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    assert out.stat().st_size < 0.6 * (tmp_path / "run" / "last.pt").stat().st_size
    model, info = load_checkpoint(out)
    assert model.config.default_score_threshold == 0.4
    assert model.config.max_candidates_per_tile == model.roi_heads.detections_per_img == 300
    assert model.config.candidate_score == model.roi_heads.score_thresh == 0.1
    assert model.config.mask_threshold == 0.6
    with pytest.raises(SystemExit) as refused:  # architecture: needs retraining, an argparse error
        main(["ship", str(tmp_path / "run" / "last.pt"), "--out", str(out), "--config", "fpn_channels=64"])
    assert refused.value.code == 2
    for bad in ("roi_sampling_ratio=0", "nucleus_diameter_um=-1", "tile_overlap=300", "mask_threshold=1"):  # the config's own checks
        assert main(["ship", str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / "bad.pt"), "--config", bad]) == 2
    assert not (tmp_path / "bad.pt").exists()
    assert info.metrics["validation"]["aji"] == 0.3 and info.nuclei_trained and not info.tissue_trained
    assert "1 steps in 0.5 h" in info.notes


def test_resume_starts_fresh_then_evaluate_reports_metrics(tmp_path, capsys):
    from src_train.__main__ import main
    root = tmp_path / "mon"
    for d in ("images", "annotations"):
        (root / d).mkdir(parents=True)
    for i in range(3):
        img, lab = synthetic_he((96, 96), mpp=0.25, seed=i)
        tifffile.imwrite(root / "images" / f"t{i}.tif", img)
        (root / "annotations" / f"t{i}.xml").write_text(XML)
    args = ["train", "--monuseg", str(root), "--val-fraction", "0.34", "--out", str(tmp_path / "run"), "--max-steps", "1",
            "--crop", "64", "--val-every", "100", "--no-progress", "--resume"]
    assert main(args) == 0
    assert "starting a new run" in capsys.readouterr().err

    # the evaluate command on the same held-out split: metrics, a threshold sweep, plots
    out = tmp_path / "eval"
    assert main(["evaluate", "--monuseg", str(root), "--val-fraction", "0.34", "--model", str(tmp_path / "run" / "last.pt"),
                 "--out", str(out), "--log", str(tmp_path / "run" / "log.csv"), "--score-threshold", "0.3"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["score_threshold"] == 0.3 and result["nuclei"]["images"] == 1
    assert {"f1", "aji", "pq", "dice"} <= set(result["nuclei"])
    assert [r["score_threshold"] for r in result["score_sweep"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert result["score_sweep"][2]["f1"] == result["nuclei"]["f1"]
    assert len(result["nms_sweep"]) == 7 * 4  # score thresholds × NMS IoUs, the network run once
    assert [r["f1"] for r in result["nms_sweep"] if r["nms_iou"] == 0.5][2] == pytest.approx(result["nuclei"]["f1"])
    assert (out / "curves.png").stat().st_size > 0
    # and under another inference setting, recorded with the metrics
    assert main(["evaluate", "--monuseg", str(root), "--val-fraction", "0.34", "--model", str(tmp_path / "run" / "last.pt"),
                 "--out", str(out), "--config", "roi_sampling_ratio=1", "--config", "mpp=0.3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["settings"] == {"roi_sampling_ratio": 1, "mpp": 0.3}
    # and on the same images as another scanner might colour them
    assert main(["evaluate", "--monuseg", str(root), "--val-fraction", "0.34", "--model", str(tmp_path / "run" / "last.pt"),
                 "--out", str(out), "--colour-cast", "1.35,1,0.7"]) == 0
    assert json.loads((out / "metrics.json").read_text())["colour_cast"] == [1.35, 1.0, 0.7]
    # as an untagged 20× file: half the size, µm/px hidden (no reference size: the model's scale)
    assert main(["evaluate", "--monuseg", str(root), "--val-fraction", "0.34", "--model", str(tmp_path / "run" / "last.pt"),
                 "--out", str(out), "--zoom", "0.5", "--hide-mpp"]) == 0
    hidden = json.loads((out / "metrics.json").read_text())
    assert hidden["zoom"] == 0.5 and hidden["mpp_hidden"] and "nucleus_diameter_um" not in hidden
    assert "nucleus_diameter_um" in result  # measured with the µm/px known
    with pytest.raises(SystemExit):
        main(["evaluate", "--monuseg", str(root), "--model", "x.pt", "--colour-cast", "1,2"])


def test_nucleus_metrics_match_hand_computation():
    gt = np.zeros((10, 10), int)
    pred = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1          # 16 px
    gt[6:10, 6:10] = 2        # 16 px, missed
    pred[0:4, 1:5] = 5        # 16 px, overlaps gt 1 by 12: IoU 12/20 = 0.6
    pred[6:8, 0:2] = 9        # 4 px, false positive
    m = nucleus_metrics(gt, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["pq"] == pytest.approx(0.6 / (1 + 0.5 + 0.5))
    # AJI: C = 12; U = 20 (pair) + 16 (missed gt 2) + 4 (unused pred 9) = 40
    assert m["aji"] == pytest.approx(12 / 40)
    assert m["dice"] == pytest.approx(2 * 12 / (32 + 20))
    perfect = nucleus_metrics(gt, gt * 3)
    assert perfect["f1"] == perfect["aji"] == perfect["pq"] == perfect["dice"] == 1.0


def test_tissue_metrics_match_hand_computation():
    classes = ("Normal", "Benign", "InSitu", "Invasive")
    truth = np.array([0, 0, 1, 2, 3, 3])
    probs = np.eye(4)[[0, 1, 1, 2, 3, 0]] * 0.7 + 0.075
    m = tissue_metrics(truth, probs, classes)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]
    assert m["per_class"]["Benign"]["precision"] == 0.5 and m["per_class"]["Benign"]["recall"] == 1.0
    assert m["per_class"]["Invasive"]["f1"] == pytest.approx(2 / 3)
    assert roc_auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.4, 0.4])) == pytest.approx((3 + 0.5) / 4)  # pairs: 0.9>0.1, 0.9>0.4, 0.4>0.1, 0.4=0.4


def test_crops_are_a_pure_function_of_their_index_whatever_the_workers():
    """What makes --resume exact and DDP ranks distinct, with any number of loader workers."""
    from src_train.loader import CropStream, make_loader

    stream = CropStream(_synthetic_samples(2, size=128), AugmentConfig(crop=64), seed=7)
    here = next(iter(make_loader(stream, 4, start=10)))
    pooled = next(iter(make_loader(stream, 4, start=10, workers=2)))
    for a, b in zip(here[0], pooled[0]):
        torch.testing.assert_close(a, b)
    later = next(iter(make_loader(stream, 2, start=12)))
    torch.testing.assert_close(later[0][0], here[0][2])  # crop 12 is crop 12
    other_rank = CropStream(_synthetic_samples(2, size=128), AugmentConfig(crop=64), seed=7, rank=1)
    assert not torch.equal(other_rank[10][0], stream[10][0])


def test_small_images_fill_a_mosaic_of_four_with_their_nuclei_apart():
    """CoNSeP-sized patches would leave most of a crop as glass: four fill it instead."""
    from src_train.loader import CropStream

    small = _synthetic_samples(3, size=90)
    big = _synthetic_samples(1, size=192, seed=5)
    cfg = AugmentConfig(crop=128, mosaic=True, scale=(1.0, 1.0), rotate=False, hue=0.04, stain_sigma=0.1, gray_p=0.0)
    mixed = CropStream(small + big, cfg, seed=1)
    assert mixed.small.tolist() == [True, True, True, False]
    assert mixed.weights.tolist() == [0.25, 0.25, 0.25, 1.0]  # a mosaic shows four: drawn a quarter as often
    stream = CropStream(small, cfg, seed=1)
    glass = lambda img: float((img.min(0).values > 0.92).float().mean())  # noqa: E731
    plain = CropStream(small, replace(cfg, mosaic=False), seed=1)
    mosaics = 0
    for i in range(12):
        img, target = stream[i]
        assert img.shape == (3, 128, 128)
        torch.testing.assert_close(img, stream[i][0])  # still a pure function of the index
        masks = target["masks"].bool()
        assert len(target["boxes"]) == len(masks) > 0
        # every nucleus lies in one quadrant: ids of the four images were kept apart
        quadrants = torch.stack([masks[:, :64, :64].flatten(1).any(1), masks[:, :64, 64:].flatten(1).any(1),
                                 masks[:, 64:, :64].flatten(1).any(1), masks[:, 64:, 64:].flatten(1).any(1)], 1)
        assert (quadrants.sum(1) == 1).all()
        if glass(img) < 0.5 * glass(plain[i][0]):
            mosaics += 1
    assert mosaics >= 6  # a 90 px patch in a 128 crop is half glass; four fill it


def test_stain_jitter_is_a_3x3_map_in_optical_density_matching_colour_deconvolution():
    from skimage.color import hed2rgb, rgb2hed

    from src_train.augment import OD_FLOOR, stain_matrix, to_tensor

    rgb, _ = synthetic_he((40, 40), mpp=0.4, seed=1)
    x = to_tensor(rgb)
    alpha, beta = torch.tensor([1.1, 0.9, 1.0]), torch.zeros(3)
    m, b = stain_matrix(alpha, beta)
    od = -torch.log(x.clamp(min=OD_FLOOR))
    ours = torch.exp(-(torch.einsum("chw,cd->dhw", od, m) + b[:, None, None]).clamp(min=0)).permute(1, 2, 0).numpy()
    hed = rgb2hed(rgb)
    reference = hed2rgb(hed * alpha.numpy())  # scikit-image's own deconvolution and back
    linear = (hed > 0).all(-1)  # skimage clips negative stain amounts; elsewhere both are the same linear map
    assert linear.sum() > 200
    np.testing.assert_allclose(ours[linear], reference[linear], atol=2e-3)
    identity, zero = stain_matrix(torch.ones(3), torch.zeros(3))
    torch.testing.assert_close(identity, torch.eye(3), atol=1e-5, rtol=0)


def _ddp_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = TrainConfig(out=out, max_steps=3, warmup_steps=1, checkpoint_every=1000, val_every=1000, seed=3)
    cfg.augment = AugmentConfig(crop=96)
    t = Trainer(tiny_config(), cfg, _synthetic_samples(2, size=128), [])
    t.run(progress=False)
    torch.save({k: v.detach().clone() for k, v in t.model.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_processes_end_with_identical_weights(tmp_path):
    """torchrun --nproc_per_node=2 on CPU: DistributedDataParallel averages gradients, so
    both ranks hold the same model after every step, and only rank 0 writes checkpoints."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    start = build_model(tiny_config()).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # and they did train
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "log.csv").read_text().count("\n") == 4


def test_ema_weights_are_validated_shipped_and_resumed(tmp_path):
    t = _trainer(tmp_path / "a", max_steps=4, ema=0.5, accumulate=2)
    for _ in range(2):
        t.train_step()
    saved = t.save("last.pt")
    from napari_bach.checkpoint import read_checkpoint

    payload = read_checkpoint(saved)
    ema = t.ema.module.state_dict()
    raw = t.model.state_dict()
    key = next(k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], ema[k]))
    torch.testing.assert_close(payload["state_dict"][key], ema[key])  # the file ships the average
    raw, ema = {k: v.clone() for k, v in raw.items()}, {k: v.clone() for k, v in ema.items()}
    expected = t.train_step()["loss"]  # before the resumed run restores the global RNG
    resumed = _trainer(tmp_path / "b", max_steps=4, ema=0.5, accumulate=2)
    resumed.resume(saved)
    torch.testing.assert_close(resumed.model.state_dict()[key], raw[key])
    torch.testing.assert_close(resumed.ema.module.state_dict()[key], ema[key])
    assert resumed.train_step()["loss"] == pytest.approx(expected, rel=1e-4)


def test_organ_hold_out_validates_on_unseen_breast_slides():
    from src_train.datasets import organ_of, organ_split

    names = ["TCGA-A7-A13E-01Z-00-DX1", "TCGA-AR-A1AK-01Z-00-DX1", "TCGA-E2-A14V-01Z-00-DX1",
             "TCGA-B0-5698-01Z-00-DX1", "TCGA-G9-6336-01Z-00-DX1", "other"]
    samples = [Sample(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int32), 0.25, name=n, exact=i != 1)
               for i, n in enumerate(names)]
    assert [organ_of(n) for n in names] == ["breast"] * 3 + ["kidney", "prostate", None]
    train, val = organ_split(samples, "breast")
    assert [s.name for s in val] == [names[0], names[2]]  # exact breast outlines only
    assert [s.name for s in train] == names[3:]  # no breast image is trained on, outlined or not
    with pytest.raises(ValueError, match="no colon images"):
        organ_split(samples, "colon")


def test_scanner_cast_scales_each_channel_optical_density_and_is_off_by_default():
    from src_train.augment import OD_FLOOR, jitter_colour, to_tensor

    rgb, _ = synthetic_he((48, 48), mpp=0.4, seed=2)
    x = to_tensor(rgb)
    plain = AugmentConfig(stain_sigma=0.0, hue=0.0, saturation=0.0, contrast=0.0, brightness=0.0, blur_p=0.0,
                          sharpen_p=0.0, jpeg_p=0.0, gray_p=0.0)
    torch.testing.assert_close(jitter_colour(x, torch.Generator().manual_seed(0), plain), x)  # off: untouched
    cast = AugmentConfig(**{**plain.__dict__, "scanner_cast": 0.3})
    y = jitter_colour(x, torch.Generator().manual_seed(0), cast)
    od_x, od_y = (-torch.log(t.clamp(min=OD_FLOOR)) for t in (x, y))
    dark = od_x > 0.2  # well above rounding
    ratios = [(od_y[c][dark[c]] / od_x[c][dark[c]]) for c in range(3)]
    for r in ratios:  # one factor per channel, within 1 ± 0.3
        assert 0.7 - 1e-4 <= r.mean() <= 1.3 + 1e-4 and r.std() < 1e-3
    assert max(r.mean() for r in ratios) - min(r.mean() for r in ratios) > 0.01  # the channels differ


@pytest.mark.parametrize("option", [["--jpeg-p", "3"], ["--stain-sigma", "-1"], ["--scanner-cast", "1"],
                                    ["--scanner-cast", "purple"]])
def test_impossible_augmentation_strengths_are_refused_before_anything_runs(tmp_path, capsys, option):
    from src_train.__main__ import main

    with pytest.raises(SystemExit) as refused:
        main(["train", "--data", f"x:{tmp_path}", "--out", str(tmp_path / "run"), *option])
    assert refused.value.code == 2 and option[0] in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_augment_config_refuses_impossible_strengths_whoever_builds_it():
    from src_train.augment import AugmentConfig

    for bad in ({"jpeg_p": 1.5}, {"stain_sigma": 1.0}, {"scanner_cast": -0.1}, {"blur_p": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            AugmentConfig(**bad)
    assert AugmentConfig(jpeg_p=1.0, scanner_cast=0.45).jpeg_p == 1.0


@pytest.mark.parametrize("parts, frozen, learning", [("heads", "backbone.", "rpn."),
                                                     ("fpn+heads", "backbone.body.", "backbone.fpn.")])
def test_train_parts_freeze_the_rest(tmp_path, parts, frozen, learning):
    """Fine-tuning on a few images may train the heads (and FPN) only: the trunk stays as it was."""
    trainer = _trainer(tmp_path, max_steps=2, train_parts=parts)
    start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.run(progress=False)
    moved = {k for k, v in trainer.model.named_parameters() if not torch.equal(v, start[k])}
    assert moved and not any(k.startswith(frozen) for k in moved)
    assert any(k.startswith(learning) for k in moved)


def test_unknown_train_parts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="train_parts must be one of"):
        _trainer(tmp_path, train_parts="trunk")


def test_on_step_returning_true_ends_the_run(tmp_path):
    trainer = _trainer(tmp_path, max_steps=30)
    result = trainer.run(progress=False, on_step=lambda row: trainer.step >= 3)
    assert trainer.step == 3 and result["stopped_early"] and (tmp_path / "last.pt").is_file()
