"""Model configuration: everything needed to rebuild a model and feed it correctly.

The config travels inside every checkpoint, so a model file is self-describing: backbone,
head widths, anchors, the µm/px it works at and the normalisation it was trained with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

BACH_CLASSES: tuple[str, ...] = ("Normal", "Benign", "InSitu", "Invasive")
# Segment nuclei computes candidates (and their masks, most of a run's time) from this far
# below the score threshold; moving the slider below that floor computes the rest.
CANDIDATE_MARGIN = 0.15
# The registry (napari_bach.backbones) builds each; named here so the config needs no torch.
BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "resnet101", "mobilenet_v2", "efficientnet_lite0")


@dataclass
class ModelConfig:
    """Mask R-CNN settings chosen for nuclei (5–20 µm blobs), not COCO objects."""

    backbone: str = "resnet18"
    # "group": GroupNorm, trains from scratch with tiny batches; "frozen_bn": for
    # ImageNet-pretrained backbones, as torchvision does.
    norm: str = "group"
    fpn_channels: int = 128
    box_head_dim: int = 256
    mask_head_channels: int = 64
    mask_head_layers: int = 4
    # Two octave scales per FPN level so 8–60 px nuclei reach IoU > 0.7 with some anchor.
    anchor_sizes: tuple[tuple[float, ...], ...] = ((8, 11), (16, 23), (32, 45), (64, 91), (128, 181))
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # The method's anchor labelling and NMS.
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_nms: float = 0.7
    rpn_batch_size: int = 128
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 600
    rpn_pre_nms_test: int = 2000
    rpn_post_nms_test: int = 1000
    box_batch_size: int = 128
    box_positive_fraction: float = 0.25
    # Bilinear samples per RoIAlign bin side (torchvision's default is 2): 1 is 4× fewer
    # samples for the box RoIAlign over every proposal.
    roi_sampling_ratio: int = 2
    # Cached candidates: the floor under the score slider and the ceiling over the NMS
    # slider. Masks are computed for every candidate so refiltering never reruns the net.
    candidate_score: float = 0.05
    candidate_nms: float = 0.7
    max_candidates_per_tile: int = 1000
    # The model's own thresholds, chosen on validation (see Thresholds).
    default_score_threshold: float = 0.5
    default_nms_iou: float = 0.5
    # Smaller "nuclei" are fragments: 3 µm² (a 2 µm disc) is the 1st percentile of the
    # 24,133 labelled MoNuSeg nuclei, cut-off ones at image borders included.
    default_min_area: float = 3.0
    # A pixel belongs to a nucleus where its mask probability is above this (torchvision
    # and the method: 0.5); chosen on validation with the thresholds above.
    mask_threshold: float = 0.5
    # Working scale and tiling.
    mpp: float = 0.4
    # Median equivalent diameter (µm) of this model's nuclei on validation images at their
    # true µm/px. > 0: an image of unknown µm/px is segmented at the scale where its nuclei
    # have this median size (napari_bach.scale, as cellpose estimates a diameter);
    # 0: such an image runs as if it were at ``mpp``.
    nucleus_diameter_um: float = 0.0
    # A model fine-tuned on one lab's corrections whose nuclei are smaller (or larger) than
    # that reference: > 0, the µm/px where their median looks like it (below ``mpp``:
    # smaller). An image of known µm/px whose own median nucleus (a first pass) is smaller
    # too, as the lab's, is segmented where it has the reference size (zoomed at most 2×);
    # other tissue keeps its scale; 0: every image at its µm/px (napari_bach.scale).
    lab_mpp: float = 0.0
    tile_size: int = 512
    tile_overlap: int = 96
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    tissue_classes: tuple[str, ...] = BACH_CLASSES
    # "macenko": every input is mapped onto the reference stain ``stain_target`` (8 numbers,
    # napari_bach.stain), fitted on the training images by src_train; "none": inputs as they are.
    stain_norm: str = "none"
    stain_target: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.roi_sampling_ratio < 1:
            raise ValueError("roi_sampling_ratio must be at least 1")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold is a probability between 0 and 1 (exclusive), got {self.mask_threshold:g}")
        if self.nucleus_diameter_um < 0:
            raise ValueError("nucleus_diameter_um is a size in µm (0: no scale estimate for unknown µm/px)")
        if self.lab_mpp < 0 or (self.lab_mpp and not self.nucleus_diameter_um):
            raise ValueError("lab_mpp is a µm/px (0: none) and needs nucleus_diameter_um, the size it matches")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.norm not in ("group", "frozen_bn", "bn"):
            raise ValueError(f"unknown norm {self.norm!r}; choose group, frozen_bn or bn")
        if len(self.anchor_sizes) != 5:
            raise ValueError("anchor_sizes needs one tuple per FPN level (5 levels)")
        if self.tile_overlap * 2 >= self.tile_size:
            raise ValueError("tile_overlap must be less than half the tile size")
        if self.stain_norm not in ("none", "macenko"):
            raise ValueError(f"unknown stain_norm {self.stain_norm!r}; choose none or macenko")
        if len(self.stain_target) not in (0, 8):
            raise ValueError("stain_target holds 8 numbers (H and E vectors, their concentration scales)")
        # JSON round trips give lists; keep tuples so configs compare equal.
        self.anchor_sizes = tuple(tuple(float(s) for s in level) for level in self.anchor_sizes)
        self.stain_target = tuple(float(v) for v in self.stain_target)
        for name in ("aspect_ratios", "mean", "std", "tissue_classes"):
            setattr(self, name, tuple(getattr(self, name)))

    @classmethod
    def preset(cls, backbone: str, **overrides) -> "ModelConfig":
        """The paper's heads for ResNet-50/101, slim heads for the CPU backbones; the
        input normalisation the backbone's ImageNet weights expect."""
        from .backbones import spec

        base: dict = dict(mean=spec(backbone).mean, std=spec(backbone).std)
        if backbone in ("resnet50", "resnet101"):
            base.update(fpn_channels=256, box_head_dim=1024, mask_head_channels=256,
                        rpn_batch_size=256, box_batch_size=512, tile_size=768)
        base.update(overrides)
        return cls(backbone=backbone, **base)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(sorted(unknown))}")
        return cls(**data)


# What a checkpoint's weights do not depend on: changed without retraining (``ship --config``,
# ``evaluate --config``, :func:`napari_bach.model.with_settings`) and chosen on validation.
INFERENCE_SETTINGS: tuple[str, ...] = (
    "mpp", "nucleus_diameter_um", "lab_mpp", "tile_size", "tile_overlap", "rpn_pre_nms_test", "rpn_post_nms_test", "rpn_nms", "roi_sampling_ratio",
    "candidate_score", "candidate_nms", "max_candidates_per_tile",
    "default_score_threshold", "default_nms_iou", "default_min_area", "mask_threshold")


@dataclass(frozen=True)
class Thresholds:
    """Score threshold, NMS IoU and minimum area applied to a model's cached candidates.

    ``None`` means the model's own default (``ModelConfig.default_score_threshold``,
    ``default_nms_iou``, chosen on validation, and ``default_min_area``); :meth:`resolve`
    fills them in. Scores below the model's ``candidate_score`` floor and NMS IoU above
    its ``candidate_nms`` were never cached, so they are clamped to what re-filtering can
    honour. ``min_area`` is in µm²; :meth:`min_area_px` turns it into the image's pixels."""

    score: float | None = None
    nms_iou: float | None = None
    min_area: float | None = None  # µm²

    def __post_init__(self) -> None:
        if self.score is not None and not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score threshold must be between 0 and 1, got {self.score:g}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"NMS IoU must be above 0 and at most 1, got {self.nms_iou:g}")
        if self.min_area is not None and not 0.0 <= self.min_area <= 1000.0:
            raise ValueError(f"minimum area must be between 0 and 1000 µm², got {self.min_area:g}")

    def resolve(self, config: ModelConfig) -> "Thresholds":
        score = config.default_score_threshold if self.score is None else self.score
        nms_iou = config.default_nms_iou if self.nms_iou is None else self.nms_iou
        min_area = config.default_min_area if self.min_area is None else self.min_area
        return Thresholds(max(score, config.candidate_score), min(nms_iou, config.candidate_nms), min_area)

    def min_area_px(self, mpp: float | None, config: ModelConfig) -> float:
        """The minimum area in pixels of ``mpp`` (``Detections.segmented_mpp``: the image's
        own µm/px or the estimate it was segmented at); an image segmented as if at the
        model's own µm/px has pixels of that size."""
        area = config.default_min_area if self.min_area is None else self.min_area
        return area / (mpp or config.mpp) ** 2
