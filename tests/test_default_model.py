"""The model shipped inside the package: honest metadata, small file, and it finds nuclei."""
import torch

from napari_bach.checkpoint import DEFAULT_MODEL, load_checkpoint, read_checkpoint
from napari_bach.predict import predict
from napari_bach.synthetic import synthetic_he
from src_train.metrics import nucleus_metrics


def test_shipped_model_says_what_it_was_trained_on():
    payload = read_checkpoint(DEFAULT_MODEL)
    assert "train_state" not in payload and DEFAULT_MODEL.stat().st_size < 50e6
    assert all(v.dtype == torch.float16 for v in payload["state_dict"].values() if v.is_floating_point())
    model, info = load_checkpoint(DEFAULT_MODEL)
    assert info.nuclei_trained and not info.tissue_trained  # no tissue labels here: the UI says "not trained"
    assert "MoNuSeg" in info.data and "CC BY-NC-SA" in info.license
    assert {"f1", "aji", "pq"} <= set(info.metrics["validation"]) and "src_train evaluate" in info.metrics["command"]
    assert model.config.mpp == 0.3 and model.config.backbone == "mobilenet_v2" and model.config.norm == "frozen_bn"
    assert set(info.metrics["groups"]) == {"monuseg", "consep", "cpm15"}  # each held-out source apart


def test_shipped_model_finds_the_nuclei_of_an_unseen_synthetic_tile():
    """Not a benchmark (real numbers are in README): a check that the file holds a working
    detector, on an H&E-like image it never saw, at a different µm/px than it was trained at.
    The tile is smaller than the model's tile size, so it also covers the glass padding
    (zero padding gave a row of edge slivers: precision 0.50)."""
    torch.set_num_threads(2)
    rgb, truth = synthetic_he((384, 384), mpp=0.42, seed=11)
    model, info = load_checkpoint(DEFAULT_MODEL)
    det = predict(rgb, model, 0.42, tissue_trained=info.tissue_trained)
    seg = det.refilter(model.config.default_score_threshold, model.config.default_nms_iou)
    assert det.tissue_probs is None
    m = nucleus_metrics(truth, seg.labels)
    assert m["f1"] > 0.85 and m["precision"] > 0.85, m


def test_masks_only_for_the_region_a_tile_owns_change_nothing_it_keeps():
    """``regions`` drops detections whose centre is outside before the mask branch: what
    stays is exactly what the tile would have kept afterwards (boxes, scores, masks)."""
    from napari_bach.model import for_inference
    from napari_bach.tiling import centre_in

    torch.set_num_threads(2)
    rgb, _ = synthetic_he((512, 512), mpp=0.3, seed=5)
    model = for_inference(load_checkpoint(DEFAULT_MODEL)[0])
    tile = torch.tensor(rgb).permute(2, 0, 1).float().div(255)
    region = (48, 100, 400, 464)
    with torch.inference_mode():
        every = model([tile], score_floor=0.15)[0]
        owned = model([tile], score_floor=0.15, regions=[region])[0]
    keep = centre_in(every["boxes"], region)
    assert 0 < int(keep.sum()) < len(keep)  # the region really cuts
    assert torch.equal(owned["boxes"], every["boxes"][keep]) and torch.equal(owned["scores"], every["scores"][keep])
    torch.testing.assert_close(owned["masks"], every["masks"][keep], atol=1e-5, rtol=0)


def test_shipped_tissue_model_says_what_it_was_trained_on_and_validated_with():
    """The tissue classifier beside the nucleus model: BACH's license, its cross-validated
    numbers, and four probabilities that sum to one on an unseen synthetic field."""
    from napari_bach.tissue import DEFAULT_TISSUE_MODEL, load_tissue_model, tissue_map

    net, info = load_tissue_model(DEFAULT_TISSUE_MODEL)
    assert info.trained and "CC BY-NC-ND" in info.license and "non-commercial" in info.license
    assert 0.5 < info.metrics["balanced_accuracy"] <= 1 and len(info.metrics["confusion"]) == 4
    assert "balanced accuracy" in info.status and DEFAULT_TISSUE_MODEL.stat().st_size < 20e6
    probs = tissue_map(synthetic_he((400, 500), mpp=0.42, seed=2)[0], 0.42, net).image_probs()
    assert probs.shape == (4,) and abs(probs.sum() - 1) < 1e-5
