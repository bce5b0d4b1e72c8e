"""Model build per backbone, checkpoint round trip and rejection, pretrained offline."""
import urllib.error

import pytest
import torch

from conftest import tiny_config
from napari_bach.checkpoint import CheckpointError, ModelInfo, load_checkpoint, save_checkpoint
from napari_bach.config import ModelConfig
from napari_bach.model import PretrainedWeightsUnavailable, build_model


def _target(h=64, w=64):
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:15, 5:17] = 1
    masks[1, 30:44, 20:30] = 1
    return {"boxes": torch.tensor([[5.0, 5, 17, 15], [20, 30, 30, 44]]), "labels": torch.ones(2, dtype=torch.int64),
            "masks": masks, "tissue": torch.tensor(2)}


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50", "resnet101"])
def test_each_backbone_trains_and_predicts_on_a_tiny_input(backbone):
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(backbone, rpn_post_nms_test=50, max_candidates_per_tile=20))
    losses = model.train()([torch.rand(3, 64, 64)], [_target()])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg",
                           "loss_mask", "loss_tissue"}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_tissue"] > 0
    with torch.no_grad():
        out = model.eval()([torch.rand(3, 64, 80)])[0]
    assert out["masks"].shape[1:] == (1, 28, 28)  # not pasted at full size
    assert out["tissue_logits"].shape == (4,)
    assert (out["boxes"][:, 2] <= 80).all() and len(out["boxes"]) <= 20


def test_anchor_settings_are_the_nucleus_ones():
    model = build_model(tiny_config())
    assert model.rpn.anchor_generator.num_anchors_per_location() == [6] * 5
    assert model.rpn.proposal_matcher.high_threshold == 0.7 and model.rpn.proposal_matcher.low_threshold == 0.3
    assert model.roi_heads.nms_thresh == model.config.candidate_nms


def test_checkpoint_round_trip_full_and_half(tmp_path):
    torch.manual_seed(1)
    model = build_model(tiny_config(mpp=0.5))
    info = ModelInfo(name="t", nuclei_trained=True, steps=12, metrics={"f1": 0.5})
    x = [torch.rand(3, 96, 96)]
    with torch.no_grad():
        ref = model.eval()(x)[0]
    for half in (False, True):
        path = save_checkpoint(tmp_path / f"m{half}.pt", model, info, half=half)
        loaded, loaded_info = load_checkpoint(path)
        assert loaded.config == model.config and loaded.config.mpp == 0.5
        assert loaded_info.steps == 12 and loaded_info.metrics == {"f1": 0.5} and loaded_info.nuclei_trained
        with torch.no_grad():
            out = loaded(x)[0]
        tol = 5e-2 if half else 1e-5
        torch.testing.assert_close(out["tissue_logits"], ref["tissue_logits"], atol=tol, rtol=tol)
    assert (tmp_path / "mTrue.pt").stat().st_size < 0.6 * (tmp_path / "mFalse.pt").stat().st_size
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary file


def test_bad_checkpoints_are_rejected_with_reasons(tmp_path, tiny_checkpoint):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 100)
    plain = tmp_path / "plain.pt"
    torch.save(build_model(tiny_config()).state_dict(), plain)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    cases = {truncated: "cannot be loaded|truncated", junk: "not a PyTorch checkpoint",
             plain: "not a napari-bach checkpoint", other: "not a napari-bach checkpoint",
             tmp_path / "missing.pt": "no such checkpoint"}
    for path, reason in cases.items():
        with pytest.raises(CheckpointError, match=reason):
            load_checkpoint(path)


def test_checkpoint_whose_weights_do_not_match_its_config(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model(tiny_config()), ModelInfo())
    payload = torch.load(path, weights_only=True)
    payload["config"]["fpn_channels"] = 64
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_untrained_status_is_said_plainly():
    assert "UNTRAINED" in ModelInfo().status
    assert "tissue class not trained" in ModelInfo(name="m", nuclei_trained=True).status
    # a separate tissue classifier's status replaces the nucleus model's own tissue part, whole
    assert ModelInfo(name="m, v2", nuclei_trained=True, steps=5).status_parts("tissue class trained (t)") == [
        "m, v2: nuclei trained (5 steps)", "tissue class trained (t)"]
    assert ModelInfo(name="u").status_parts("tissue class trained (t)") == [
        "u: UNTRAINED weights, masks are meaningless", "tissue class trained (t)"]


def test_pretrained_weights_fail_clearly_when_offline(monkeypatch):
    from torchvision.models._api import WeightsEnum

    def offline(self, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    cfg = ModelConfig.preset("resnet50", norm="frozen_bn")
    for source in ("imagenet", "coco"):
        with pytest.raises(PretrainedWeightsUnavailable, match="internet access once"):
            build_model(cfg, pretrained=source)
    with pytest.raises(ValueError, match="frozen_bn"):
        build_model(ModelConfig.preset("resnet50"), pretrained="imagenet")


def test_pretrained_loading_copies_matching_tensors(monkeypatch):
    """The online path, with torchvision's own ImageNet state dict served locally."""
    from torchvision.models import resnet18
    from torchvision.models._api import WeightsEnum

    torch.manual_seed(3)
    reference = resnet18().state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: reference)
    model = build_model(ModelConfig(norm="frozen_bn"), pretrained="imagenet")
    torch.testing.assert_close(model.backbone.body.conv1.weight, reference["conv1.weight"])
    assert not model.backbone.body.conv1.weight.requires_grad  # stem frozen when fine-tuning


def _randomise_frozen_bn(model):
    from torchvision.ops.misc import FrozenBatchNorm2d

    for bn in (m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)):
        bn.weight.copy_(torch.rand_like(bn.weight) + 0.5)
        bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.1)


def test_inference_copy_folds_batchnorm_gives_the_same_detections_and_leaves_the_model_alone():
    from napari_bach.model import for_inference
    from napari_bach.predict import predict
    from napari_bach.synthetic import synthetic_he

    torch.manual_seed(0)
    model = build_model(tiny_config(backbone="mobilenet_v2", norm="frozen_bn", fpn_channels=32, box_head_dim=64,
                                    mask_head_channels=16, candidate_score=0.0))
    _randomise_frozen_bn(model)
    model.train()
    keys = list(model.state_dict())
    rgb = synthetic_he((160, 200), mpp=0.4, seed=1)[0]
    twin = for_inference(model)
    assert twin is not model and not twin.training and for_inference(model) is twin  # cached
    assert model.training and list(model.state_dict()) == keys  # still trainable, still saveable
    with torch.no_grad():
        reference = [model.eval()([torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(3))])[0]]
        folded = [twin([torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(3))])[0]]
    torch.testing.assert_close(folded[0]["scores"], reference[0]["scores"], atol=1e-4, rtol=1e-4)
    det = predict(rgb, model, 0.4)
    assert len(det) > 0 and det.boxes.shape[1] == 4
    with torch.no_grad():  # an optimizer step changes the weights: a new copy follows them
        next(model.parameters()).add_(1.0)
    assert for_inference(model) is not twin


def test_inference_settings_change_without_retraining_and_nothing_else_does(tmp_path):
    from napari_bach.model import with_settings

    torch.manual_seed(0)
    model = build_model(tiny_config())
    faster = with_settings(model, roi_sampling_ratio="1", mpp=0.35, rpn_post_nms_test=40)
    assert faster.config.roi_sampling_ratio == 1 and faster.config.mpp == 0.35
    assert faster.roi_heads.box_roi_pool.sampling_ratio == 1 and faster.rpn.post_nms_top_n() == 40
    for a, b in zip(model.state_dict().values(), faster.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cannot change without retraining"):
        with_settings(model, fpn_channels=64)
