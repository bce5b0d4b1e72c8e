"""Warm start a narrower FPN from a wider checkpoint.

On CPU the FPN's 3×3 convs and the RPN conv at stride 4 cost more than the whole
MobileNetV2 trunk; halving their channels quarters that. Training the narrow heads from
scratch would throw away hours of CPU training, so they start from the wide model's most
used channels (structured pruning) and are fine-tuned: each channel is kept by the share of
its consumers' weights it carries.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _share(weight: Tensor, dim: int, channels: int) -> Tensor:
    """Per channel along ``dim`` (grouped into ``channels`` equal blocks): its share of
    the weight's squared norm, so consumers of different sizes vote equally."""
    moved = weight.movedim(dim, 0).reshape(channels, -1)
    sq = moved.pow(2).sum(1)
    return sq / sq.sum().clamp_min(1e-12)


def _keep(score: Tensor, n: int) -> Tensor:
    return torch.sort(torch.topk(score, n).indices).values


def narrow_fpn(state: dict[str, Tensor], channels: int) -> dict[str, Tensor]:
    """``state`` (a wide model's weights) with FPN, RPN-conv, box-head input, mask-head
    input and tissue-head input narrowed to ``channels``; other tensors unchanged."""
    wide = state["rpn.head.conv.0.0.weight"].shape[0]
    if channels > wide:
        raise ValueError(f"cannot widen an FPN of {wide} channels to {channels}")
    if channels == wide:
        return dict(state)
    levels = sorted({k.split(".")[3] for k in state if k.startswith("backbone.fpn.layer_blocks.")})
    fc6 = state["roi_heads.box_head.fc6.weight"]
    # FPN outputs: read by the RPN conv, the box head's first layer, the mask head and the tissue head.
    out_score = (_share(state["rpn.head.conv.0.0.weight"], 1, wide) + _share(fc6, 1, wide)
                 + _share(state["roi_heads.mask_head.0.0.weight"], 1, wide))
    if "tissue_head.classifier.1.weight" in state:
        out_score = out_score + _share(state["tissue_head.classifier.1.weight"], 1, wide)
    # Lateral (inner) channels: read by every level's 3×3 output conv.
    lateral_score = sum(_share(state[f"backbone.fpn.layer_blocks.{i}.0.weight"], 1, wide) for i in levels)
    # The RPN conv's outputs: read by objectness and box regression.
    rpn_score = _share(state["rpn.head.cls_logits.weight"], 1, wide) + _share(state["rpn.head.bbox_pred.weight"], 1, wide)
    out, lateral, rpn = (_keep(s, channels) for s in (out_score, lateral_score, rpn_score))

    new = dict(state)
    for i in levels:
        inner = f"backbone.fpn.inner_blocks.{i}.0"
        new[f"{inner}.weight"] = state[f"{inner}.weight"][lateral]
        new[f"{inner}.bias"] = state[f"{inner}.bias"][lateral]
        layer = f"backbone.fpn.layer_blocks.{i}.0"
        new[f"{layer}.weight"] = state[f"{layer}.weight"][out][:, lateral]
        new[f"{layer}.bias"] = state[f"{layer}.bias"][out]
    new["rpn.head.conv.0.0.weight"] = state["rpn.head.conv.0.0.weight"][rpn][:, out]
    new["rpn.head.conv.0.0.bias"] = state["rpn.head.conv.0.0.bias"][rpn]
    for name in ("cls_logits", "bbox_pred"):
        new[f"rpn.head.{name}.weight"] = state[f"rpn.head.{name}.weight"][:, rpn]
    bins = fc6.shape[1] // wide  # RoIAlign output is flattened channel-major
    new["roi_heads.box_head.fc6.weight"] = fc6.reshape(fc6.shape[0], wide, bins)[:, out].reshape(fc6.shape[0], -1)
    new["roi_heads.mask_head.0.0.weight"] = state["roi_heads.mask_head.0.0.weight"][:, out]
    if "tissue_head.classifier.1.weight" in state:
        new["tissue_head.classifier.1.weight"] = state["tissue_head.classifier.1.weight"][:, out]
    return new
