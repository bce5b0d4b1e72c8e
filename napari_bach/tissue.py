"""The BACH tissue class (Normal, Benign, InSitu, Invasive) of a field, and maps of it.

A field is what BACH's pathologists labelled: about 0.65 × 0.86 mm (1536 × 2048 px at
0.42 µm/px). Its class comes from a frozen ImageNet trunk of the backbone registry seen at
a few µm/px at once — coarse scales for architecture (ducts, lobules, stroma), a finer one
for nuclear atypia — whose feature maps are pooled (mean and standard deviation of each
channel) into one vector per field; a linear layer, calibrated by a temperature on
cross-validated predictions, turns it into four probabilities. Pooling makes the
classifier size-agnostic: an image smaller than a field is classified whole.

Larger images and slides get a **tissue map**: windows of one field, half a field apart,
each classified as above. The trunk runs once per image (or slide block) and scale; each
window's vector is pooled from the feature maps by box sums, so overlapping windows cost
no more than the image itself.

The classifier is a checkpoint of its own (``models/tissue.pt``, trained by
``python -m src_train tissue``) beside the nucleus model, so each can be retrained alone.
"""
from __future__ import annotations

import functools
import zipfile
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write
from .backbones import spec
from .config import BACH_CLASSES

FORMAT = "napari-bach-tissue"
VERSION = 1
DEFAULT_TISSUE_MODEL = Path(__file__).parent / "models" / "tissue.pt"
# BACH's field (height, width) in µm: 1536 × 2048 px at 0.42 µm/px
FIELD_UM: tuple[float, float] = (645.0, 860.0)
# Images up to this many fields in each direction are one field (a BACH image, a photo of
# one); larger ones are mapped.
ONE_FIELD = 1.5


class TissueModelError(ValueError):
    """A file that is not a usable tissue classifier; the message says why."""


@dataclass
class TissueConfig:
    """What rebuilds the classifier and feeds it: trunk, scales, pooled stages, classes."""

    backbone: str = "efficientnet_lite0"  # cross-validated better than mobilenet_v2 (docs/model-card.md)
    scales: tuple[float, ...] = (1.0, 2.0)  # µm/px each field is seen at
    stages: tuple[str, ...] = ("2", "3")  # the trunk's outputs pooled (strides 16 and 32)
    classes: tuple[str, ...] = BACH_CLASSES
    field_um: tuple[float, float] = FIELD_UM
    mean: tuple[float, float, float] = (127.0 / 255, 127.0 / 255, 127.0 / 255)  # the trunk's ImageNet input
    std: tuple[float, float, float] = (128.0 / 255, 128.0 / 255, 128.0 / 255)

    def __post_init__(self) -> None:
        if not self.scales or min(self.scales) <= 0:
            raise ValueError("scales are positive µm/px values")
        for name in ("scales", "stages", "classes", "field_um", "mean", "std"):
            setattr(self, name, tuple(getattr(self, name)))

    @classmethod
    def for_backbone(cls, backbone: str, **kw) -> "TissueConfig":
        s = spec(backbone)
        return cls(backbone=backbone, mean=s.mean, std=s.std, **kw)

    @property
    def dim(self) -> int:
        s = spec(self.backbone)
        per_scale = sum(2 * s.channels[int(k)] for k in self.stages)
        return per_scale * len(self.scales)


@dataclass
class TissueInfo:
    """Provenance: what it was trained on, how it was validated, under which license."""

    name: str = "untrained"
    trained: bool = False
    data: str = ""
    license: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    metrics: dict = field(default_factory=dict)
    notes: str = ""

    @property
    def status(self) -> str:
        if not self.trained:
            return "tissue class not trained"
        acc = self.metrics.get("balanced_accuracy")
        return f"tissue class trained ({self.name}" + (f", cross-validated balanced accuracy {acc:.2f})" if acc else ")")


class TissueNet(nn.Module):
    """Frozen trunk -> pooled multi-scale features -> standardised -> linear -> /T."""

    def __init__(self, config: TissueConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = spec(config.backbone).build("frozen_bn")
        self.head = nn.Linear(config.dim, len(config.classes))
        self.register_buffer("feature_mean", torch.zeros(config.dim))
        self.register_buffer("feature_std", torch.ones(config.dim))
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("image_mean", torch.tensor(config.mean).reshape(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(config.std).reshape(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def feature_maps(self, rgb: np.ndarray, mpp: float, scale: float) -> list[torch.Tensor]:
        """The pooled stages' maps of ``rgb`` (H×W×3 uint8 at ``mpp``) seen at ``scale``:
        each channel and its square (what window means and deviations are pooled from)."""
        x = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1)[None].float().div_(255)
        factor = mpp / scale
        if abs(factor - 1) > 0.02:
            size = (max(32, round(rgb.shape[0] * factor)), max(32, round(rgb.shape[1] * factor)))
            x = F.interpolate(x, size=size, mode="bilinear", antialias=factor < 1, align_corners=False)
        x = (x - self.image_mean) / self.image_std
        outs = self.trunk(x)
        return [outs[k] for k in self.config.stages]

    @torch.inference_mode()
    def field_features(self, rgb: np.ndarray, mpp: float) -> torch.Tensor:
        """One vector for the whole of ``rgb``: the mean and standard deviation of each
        pooled channel at each scale."""
        parts = []
        for scale in self.config.scales:
            for fmap in self.feature_maps(rgb, mpp, scale):
                flat = fmap[0].flatten(1)
                parts += [flat.mean(1), flat.std(1, correction=0)]
        return torch.cat(parts)

    @torch.inference_mode()
    def window_features(self, rgb: np.ndarray, mpp: float, windows: np.ndarray) -> torch.Tensor:
        """Vectors of many windows (N×4 ``y0, x0, y1, x1`` in ``rgb``'s pixels) from one
        pass of the trunk per scale: box sums over each map and its square."""
        h, w = rgb.shape[:2]
        per_window = [[] for _ in range(len(windows))]
        for scale in self.config.scales:
            for fmap in self.feature_maps(rgb, mpp, scale):
                fh, fw = fmap.shape[-2:]
                # integral images of x and x², one zero row/column in front
                sums = F.pad(fmap[0].cumsum(1).cumsum(2), (1, 0, 1, 0))
                squares = F.pad((fmap[0] ** 2).cumsum(1).cumsum(2), (1, 0, 1, 0))
                for i, (y0, x0, y1, x1) in enumerate(windows):
                    a, b = int(np.floor(y0 / h * fh)), max(int(np.floor(y0 / h * fh)) + 1, int(np.ceil(y1 / h * fh)))
                    c, d = int(np.floor(x0 / w * fw)), max(int(np.floor(x0 / w * fw)) + 1, int(np.ceil(x1 / w * fw)))
                    b, d = min(b, fh), min(d, fw)
                    n = (b - a) * (d - c)
                    s = (sums[:, b, d] - sums[:, a, d] - sums[:, b, c] + sums[:, a, c]) / n
                    q = (squares[:, b, d] - squares[:, a, d] - squares[:, b, c] + squares[:, a, c]) / n
                    per_window[i] += [s, (q - s**2).clamp(min=0).sqrt()]
        return torch.stack([torch.cat(p) for p in per_window])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of feature vectors (N×dim)."""
        return self.head((features - self.feature_mean) / self.feature_std) / self.temperature

    def probabilities(self, features: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self(features.reshape(-1, self.config.dim)).softmax(-1).numpy()


def field_pixels(mpp: float, config: TissueConfig) -> tuple[int, int]:
    """A field's (height, width) in pixels of ``mpp``."""
    return round(config.field_um[0] / mpp), round(config.field_um[1] / mpp)


def plan_windows(shape: tuple[int, int], mpp: float, config: TissueConfig) -> np.ndarray:
    """Field-size windows half a field apart covering ``shape`` (N×4 ``y0, x0, y1, x1``);
    an image up to ``ONE_FIELD`` fields in both directions is one window, the whole image."""
    h, w = shape
    fh, fw = field_pixels(mpp, config)
    if h <= ONE_FIELD * fh and w <= ONE_FIELD * fw:
        return np.array([[0, 0, h, w]])

    def starts(size: int, win: int) -> list[int]:
        if size <= win:
            return [0]
        n = int(np.ceil((size - win) / (win / 2))) + 1
        return [round(v) for v in np.linspace(0, size - win, n)]

    return np.array([[y, x, min(h, y + fh), min(w, x + fw)] for y in starts(h, fh) for x in starts(w, fw)])


@dataclass
class TissueMap:
    """Class probabilities of overlapping fields: ``windows`` (N×4, image pixels at level 0),
    ``probs`` (N×classes), ``tissue`` (the share of each window that is not glass)."""

    windows: np.ndarray
    probs: np.ndarray
    tissue: np.ndarray
    classes: tuple[str, ...]

    def image_probs(self) -> np.ndarray:
        """The image's class probabilities: windows weighted by how much tissue they hold."""
        weights = np.maximum(self.tissue, 1e-3)
        return (self.probs * weights[:, None]).sum(0) / weights.sum()

    @property
    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.probs.argmax(1)]

    def cells(self) -> np.ndarray:
        """The part of the image each window speaks for (N×4, not overlapping): its
        centre's cell, bounded midway between neighbouring window centres (for drawing)."""
        def bounds(lo: np.ndarray, hi: np.ndarray) -> dict[float, tuple[float, float]]:
            centres = np.unique((lo + hi) / 2)
            edges = np.concatenate([[lo.min()], (centres[1:] + centres[:-1]) / 2, [hi.max()]])
            return {c: (a, b) for c, a, b in zip(centres, edges[:-1], edges[1:])}

        w = self.windows.astype(float)
        rows, cols = bounds(w[:, 0], w[:, 2]), bounds(w[:, 1], w[:, 3])
        return np.array([[*rows[(y0 + y1) / 2], *cols[(x0 + x1) / 2]] for y0, x0, y1, x1 in w])[:, [0, 2, 1, 3]]


def tissue_map(rgb: np.ndarray, mpp: float, net: TissueNet) -> TissueMap:
    """Classify ``rgb`` (at ``mpp`` µm/px) in field-size windows (:func:`plan_windows`);
    windows that are almost all glass keep their probabilities but weigh little."""
    from .imageio import is_tissue

    windows = plan_windows(rgb.shape[:2], mpp, net.config)
    if len(windows) == 1:
        feats = net.field_features(rgb, mpp)[None]
    else:
        feats = net.window_features(rgb, mpp, windows)
    mask = is_tissue(rgb)
    tissue = np.array([mask[y0:y1, x0:x1].mean() if (y1 > y0 and x1 > x0) else 0.0 for y0, x0, y1, x1 in windows])
    return TissueMap(windows.astype(np.int64), net.probabilities(feats), tissue, net.config.classes)


def classify_image(rgb: np.ndarray, mpp: float, path: str | Path = DEFAULT_TISSUE_MODEL
                   ) -> tuple[TissueMap, TissueInfo] | None:
    """The tissue map of an image (one window for a BACH-size field) with the classifier's
    provenance; None when no tissue model is installed at ``path``."""
    loaded = cached_tissue_model(path)
    if loaded is None:
        return None
    net, info = loaded
    return tissue_map(rgb, mpp, net), info


def iter_slide_tissue_map(slide, net: TissueNet, region: tuple[int, int, int, int] | None = None,
                          mpp: float | None = None, chunk: int = 6):
    """The tissue map of a slide's ``region`` (y0 x0 y1 x1 level-0 px; default all of it),
    with memory bounded whatever the slide: the window grid is cut into chunks of
    ``chunk``×``chunk`` windows, each read once at the pyramid level nearest the trunk's
    finest scale (never coarser) and pooled by :meth:`TissueNet.window_features`. Windows
    without tissue in the slide's overview are skipped. Yields progress lines; returns a
    :class:`TissueMap` in level-0 pixels. ``mpp``: the slide's µm/px (its own, or the
    estimate its nuclei gave)."""
    from .imageio import is_tissue
    from .slideio import overview

    mpp = mpp or slide.pixel_size.mpp
    if not mpp:
        raise ValueError("the slide's µm/px is unknown: a tissue map needs it (give --mpp)")
    h, w = slide.shape
    y0, x0, y1, x1 = region or (0, 0, h, w)
    windows = plan_windows((y1 - y0, x1 - x0), mpp, net.config) + np.array([y0, x0, y0, x0])
    thumb, factor = overview(slide)
    mask = is_tissue(thumb)
    tissue = np.array([mask[int(a / factor):max(int(a / factor) + 1, int(np.ceil(c / factor))),
                            int(b / factor):max(int(b / factor) + 1, int(np.ceil(d / factor)))].mean()
                       for a, b, c, d in windows])
    # the level whose pixels are at most the trunk's finest scale
    target = min(net.config.scales) / mpp
    level = max([k for k, f in enumerate(slide.downsamples) if f <= target * 1.01] or [0])
    f = slide.downsamples[level]
    probs = np.full((len(windows), len(net.config.classes)), 1 / len(net.config.classes))
    starts_y, starts_x = np.unique(windows[:, 0]), np.unique(windows[:, 1])
    groups = [(gy, gx) for gy in range(0, len(starts_y), chunk) for gx in range(0, len(starts_x), chunk)]
    for n, (gy, gx) in enumerate(groups, start=1):
        inside = (np.isin(windows[:, 0], starts_y[gy:gy + chunk]) & np.isin(windows[:, 1], starts_x[gx:gx + chunk])
                  & (tissue > 0.02))
        if inside.any():
            part = windows[inside]
            by0, bx0, by1, bx1 = part[:, 0].min(), part[:, 1].min(), part[:, 2].max(), part[:, 3].max()
            rgb = slide.read(int(by0 / f), int(bx0 / f), int(np.ceil(by1 / f)), int(np.ceil(bx1 / f)), level)
            local = (part - np.array([by0, bx0, by0, bx0])) / f
            probs[inside] = net.probabilities(net.window_features(rgb, mpp * f, local))
        yield f"tissue map: chunk {n}/{len(groups)}"
    return TissueMap(windows.astype(np.int64), probs, tissue, net.config.classes)


# -- files ---------------------------------------------------------------------------------------


def save_tissue_model(path: str | Path, net: TissueNet, info: TissueInfo, half: bool = True) -> Path:
    """Write atomically (temporary name, then rename). The frozen trunk's weights are kept
    in fp16 (half the size); the head and its buffers stay fp32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and k.startswith("trunk.") and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in net.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "config": asdict(net.config), "info": asdict(info),
               "state_dict": state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_tissue_model(path: str | Path) -> tuple[TissueNet, TissueInfo]:
    """Rebuild a classifier from its file; :class:`TissueModelError` says why one is unusable."""
    path = Path(path)
    if not path.is_file():
        raise TissueModelError(f"{path}: no such tissue model file")
    if not zipfile.is_zipfile(path):
        raise TissueModelError(f"{path.name}: not a PyTorch file (truncated or another file type)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TissueModelError(f"{path.name}: cannot be loaded ({exc.__class__.__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TissueModelError(f"{path.name}: not a napari-bach tissue model (train one with "
                               "`python -m src_train tissue`)")
    if payload.get("version", 0) > VERSION:
        raise TissueModelError(f"{path.name}: tissue model version {payload['version']} is newer than this plugin")
    try:
        known = {f.name for f in fields(TissueConfig)}
        config = TissueConfig(**{k: v for k, v in payload["config"].items() if k in known})
        info = TissueInfo(**payload["info"])
        net = TissueNet(config)
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise TissueModelError(f"{path.name}: invalid tissue model ({str(exc).splitlines()[0][:200]})") from exc
    return net.eval(), info


def cached_tissue_model(path: str | Path = DEFAULT_TISSUE_MODEL,
                        required: bool = False) -> tuple[TissueNet, TissueInfo] | None:
    """One loaded copy per file, shared by every widget and run; None when there is no
    tissue model (the nucleus model then says "tissue class not trained") unless
    ``required`` (a file the user named): then :class:`TissueModelError`."""
    path = Path(path).resolve()
    if not path.is_file():
        if required:
            raise TissueModelError(f"{path}: no such tissue model file")
        return None
    return _cached(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached(path: str, stamp: int) -> tuple[TissueNet, TissueInfo]:
    return load_tissue_model(path)
