"""Warm start into a narrower FPN: the channels kept are the ones the heads read, and the
narrow model computes exactly what the wide one did when the others carried nothing."""
import pytest
import torch

from napari_bach.config import ModelConfig
from napari_bach.model import build_model
from src_train.narrow import narrow_fpn


def test_narrowing_keeps_the_used_channels_and_their_outputs():
    torch.manual_seed(0)
    wide_cfg = ModelConfig.preset("mobilenet_v2", norm="frozen_bn", fpn_channels=16)
    wide = build_model(wide_cfg).eval()
    state = wide.state_dict()
    out, lateral, rpn = torch.tensor([1, 4, 5, 9, 11, 12, 14, 15]), torch.arange(0, 16, 2), torch.arange(8, 16)
    dropped = {name: torch.tensor([c for c in range(16) if c not in kept]) for name, kept in
               (("out", out), ("lateral", lateral), ("rpn", rpn))}
    # The dropped channels are read by nobody: the wide model's results do not depend on them.
    for key, value in state.items():
        if key.startswith("backbone.fpn.layer_blocks.") and key.endswith("weight"):
            value[:, dropped["lateral"]] = 0
        elif key in ("rpn.head.conv.0.0.weight", "roi_heads.mask_head.0.0.weight", "tissue_head.classifier.1.weight"):
            value[:, dropped["out"]] = 0
        elif key in ("rpn.head.cls_logits.weight", "rpn.head.bbox_pred.weight"):
            value[:, dropped["rpn"]] = 0
        elif key == "roi_heads.box_head.fc6.weight":
            value.view(value.shape[0], 16, -1)[:, dropped["out"]] = 0
    wide.load_state_dict(state)
    narrow = build_model(ModelConfig.from_dict({**wide_cfg.to_dict(), "fpn_channels": 8})).eval()
    narrow.load_state_dict(narrow_fpn(state, 8))

    x = torch.rand(1, 3, 128, 128)
    boxes = [torch.tensor([[10.0, 12.0, 40.0, 50.0], [60.0, 60.0, 90.0, 80.0]])]
    with torch.no_grad():
        fw, fn = wide.backbone(x), narrow.backbone(x)
        for level in fw:
            torch.testing.assert_close(fn[level], fw[level][:, out], atol=1e-5, rtol=1e-4)
        for a, b in zip(wide.rpn.head(list(fw.values())), narrow.rpn.head(list(fn.values()))):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        sizes = [(128, 128)]
        heads = lambda m, f: (m.roi_heads.box_head(m.roi_heads.box_roi_pool(f, boxes, sizes)),
                              m.roi_heads.mask_head(m.roi_heads.mask_roi_pool(f, boxes, sizes)))
        for a, b in zip(heads(wide, fw), heads(narrow, fn)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(narrow.tissue_head(fn), wide.tissue_head(fw), atol=1e-5, rtol=1e-4)
    assert narrow_fpn(state, 16).keys() == state.keys()
    with pytest.raises(ValueError, match="cannot widen"):
        narrow_fpn(narrow.state_dict(), 16)
