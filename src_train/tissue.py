"""Train the tissue classifier (:mod:`napari_bach.tissue`) on class folders, on a CPU.

The trunk stays frozen (ImageNet), so training is: pooled features of every field, as it
is and in augmented copies (colour as the nucleus model's recipe: grayscale, wide hue,
stain jitter; µm/px off by up to ±25%; flips; part-fields, as a slide tile shows), then a
multinomial logistic regression on them. Validation never mixes patients: BACH numbers one
patient's images contiguously, so each class's files (in name order) are cut into k
contiguous blocks and fold i holds out block i of every class. The L2 strength is chosen
inside each training part (nested), the temperature on the out-of-fold predictions, and
the shipped head is fitted on every image with both.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from napari_bach.config import BACH_CLASSES
from napari_bach.tissue import TissueConfig, TissueInfo, TissueNet

from .augment import AugmentConfig, jitter_colour, to_tensor
from .metrics import tissue_metrics

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)  # weight decay of the logistic regression (per feature, standardised)
# the nucleus model's colour recipe (README, training): other labs' stains and scanners
COLOUR = AugmentConfig(scanner_cast=0.3, stain_vector=0.3, channel_gain=0.1)


@dataclass
class TissueSample:
    path: Path
    tissue: int  # index into the classes
    mpp: float


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_class_folders(root: str | Path, mpp: float | None = None,
                       classes: tuple[str, ...] = BACH_CLASSES) -> list[TissueSample]:
    """``root/<class>/*`` images; µm/px from ``mpp``, else the file's tags, else a
    ``labels.csv`` (file, …, um_per_px) beside the folders. Unknown µm/px is an error: the
    classifier sees fields at fixed µm/px, so a wrong guess shows it other magnifications."""
    from napari_bach.imageio import IMAGE_SUFFIXES
    from napari_bach.pixelsize import file_mpp

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    listed: dict[str, float] = {}
    if (root / "labels.csv").is_file():
        with open(root / "labels.csv") as fh:
            listed = {r["file"]: float(r["um_per_px"]) for r in csv.DictReader(fh) if r.get("um_per_px")}
    samples, unknown = [], []
    for index, cls in enumerate(classes):
        for path in sorted((root / cls).glob("*"), key=lambda p: _natural(p.name)):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            value = mpp or file_mpp(path) or listed.get(f"{cls}/{path.name}")
            if value is None:
                unknown.append(path.name)
                continue
            samples.append(TissueSample(path, index, float(value)))
    if unknown:
        raise ValueError(f"{len(unknown)} images of unknown µm/px (e.g. {unknown[0]}): give --mpp")
    found = {classes[s.tissue] for s in samples}
    if len(found) < 2:
        raise ValueError(f"{root}: need images in at least two of the class folders {', '.join(classes)} "
                         f"(found {', '.join(sorted(found)) or 'none'})")
    return samples


def contiguous_folds(samples: list[TissueSample], k: int) -> np.ndarray:
    """Fold index of each sample: each class's images, in name order, cut into ``k``
    contiguous blocks (one patient's images stay on one side)."""
    return _blocks(np.array([s.tissue for s in samples]), k)


def _blocks(y: np.ndarray, k: int) -> np.ndarray:
    """Each class's items, in their order, cut into ``k`` contiguous blocks."""
    if k < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    fold = np.zeros(len(y), int)
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        if len(idx) < k:
            raise ValueError(f"class {cls} has {len(idx)} images, fewer than {k} folds")
        for block, part in enumerate(np.array_split(idx, k)):
            fold[part] = block
    return fold


# -- features ------------------------------------------------------------------------------------


def augmented_field(rgb: np.ndarray, mpp: float, gen: torch.Generator,
                    colour: AugmentConfig) -> tuple[np.ndarray, float]:
    """One random view of a field: colour jitter, µm/px off by up to ±25%, a flip, and half
    the time a part of it (40–100% of each side), as a slide tile or a photo shows."""
    h, w = rgb.shape[:2]
    if float(torch.rand(1, generator=gen)) < 0.5:
        fy, fx = (0.4 + 0.6 * torch.rand(2, generator=gen)).tolist()
        ch, cw = max(64, int(h * fy)), max(64, int(w * fx))
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        rgb = rgb[y0:y0 + ch, x0:x0 + cw]
    if float(torch.rand(1, generator=gen)) < 0.5:
        rgb = rgb[:, ::-1]
    if float(torch.rand(1, generator=gen)) < 0.5:
        rgb = rgb[::-1]
    x = jitter_colour(to_tensor(np.ascontiguousarray(rgb)), gen, colour)
    out = x.mul(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()
    return out, mpp * math.exp(float(torch.empty(1).uniform_(math.log(0.8), math.log(1.25), generator=gen)))


def extract_features(net: TissueNet, samples: list[TissueSample], copies: int, seed: int = 0,
                     colour: AugmentConfig | None = None, cache: Path | None = None,
                     log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """Features (images × (1 + copies) × dim): each image as it is, then ``copies`` augmented
    views, seeded per image. With ``cache`` (an .npy file) finished images are kept and a
    re-run continues where it stopped."""
    from napari_bach.imageio import read_image

    colour = colour or COLOUR
    out = np.zeros((len(samples), 1 + copies, net.config.dim), np.float32)
    done = np.zeros(len(samples), bool)
    if cache is not None and cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        if saved["features"].shape == out.shape:
            out, done = saved["features"], saved["done"]
    for i, s in enumerate(samples):
        if done[i]:
            continue
        rgb = read_image(s.path).rgb
        gen = torch.Generator().manual_seed(seed * 100003 + i)
        out[i, 0] = net.field_features(rgb, s.mpp).numpy()
        for c in range(copies):
            view, mpp = augmented_field(rgb, s.mpp, gen, colour)
            out[i, 1 + c] = net.field_features(view, mpp).numpy()
        done[i] = True
        if cache is not None and (i % 10 == 9 or i == len(samples) - 1):
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, features=out, done=done)
            tmp.replace(cache)
        if i % 10 == 9 or i == len(samples) - 1:
            log(f"features: {i + 1}/{len(samples)} images")
    return out, np.array([s.tissue for s in samples])


# -- the head ----------------------------------------------------------------------------------


def fit_head(x: np.ndarray, y: np.ndarray, n_classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features (L-BFGS, mean loss + l2·|W|²),
    classes weighted to equal shares. Returns (weight, bias, feature mean, feature std)."""
    xt = torch.from_numpy(x.reshape(-1, x.shape[-1])).double()
    yt = torch.from_numpy(np.asarray(y)).long()
    mean, std = xt.mean(0), xt.std(0).clamp(min=1e-6)
    z = (xt - mean) / std
    counts = torch.bincount(yt, minlength=n_classes).double()
    class_weight = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    w = torch.zeros(n_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, yt, weight=class_weight) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float(), b.detach().float(), mean.float(), std.float()


def head_logits(params, x: np.ndarray) -> np.ndarray:
    w, b, mean, std = params
    z = (torch.from_numpy(x).float() - mean) / std
    return (z @ w.T + b).numpy()


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the out-of-fold negative log-likelihood (Guo et al. 2017)."""
    lt, yt = torch.from_numpy(logits).double(), torch.from_numpy(y).long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lt / log_t.exp(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def reliability(probs: np.ndarray, y: np.ndarray, bins: int = 5) -> dict:
    """Expected calibration error and per-bin confidence vs accuracy of the top class."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(1 / probs.shape[1], 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf >= lo) & (conf <= hi if hi == edges[-1] else conf < hi)
        if inside.any():
            acc, mean_conf = float((pred[inside] == y[inside]).mean()), float(conf[inside].mean())
            ece += inside.mean() * abs(acc - mean_conf)
            rows.append({"confidence": [round(float(lo), 2), round(float(hi), 2)], "images": int(inside.sum()),
                         "mean_confidence": round(mean_conf, 3), "accuracy": round(acc, 3)})
    return {"ece": float(ece), "bins": rows}


def _choose_l2(x: np.ndarray, y: np.ndarray, folds: np.ndarray, n_classes: int) -> float:
    """The L2 strength with the best balanced accuracy on the originals of ``folds``' blocks
    (the training part's own blocks; cut in two when it holds a single one)."""
    if len(np.unique(folds)) < 2:
        folds = _blocks(y, 2)
    best, best_score = L2_GRID[0], -1.0
    for l2 in L2_GRID:
        pred = np.zeros(len(y), int)
        for f in np.unique(folds):
            train = folds != f
            params = fit_head(x[train], np.repeat(y[train], x.shape[1]), n_classes, l2)
            pred[~train] = head_logits(params, x[~train, 0]).argmax(1)
        score = float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)]))
        if score > best_score:
            best, best_score = l2, score
    return best


def cross_validate(x: np.ndarray, y: np.ndarray, folds: np.ndarray, classes: tuple[str, ...],
                   log: Callable[[str], None] = print) -> dict:
    """Out-of-fold logits of every image (as it is), each fold's L2 chosen inside its training
    folds; metrics before and after the temperature fitted on those logits."""
    n = len(classes)
    logits = np.zeros((len(y), n), np.float32)
    chosen = []
    for f in range(int(folds.max()) + 1):
        train = folds != f
        l2 = _choose_l2(x[train], y[train], folds[train], n)
        params = fit_head(x[train], np.repeat(y[train], x.shape[1]), n, l2)
        logits[~train] = head_logits(params, x[~train, 0])
        chosen.append(l2)
        acc = float((logits[~train].argmax(1) == y[~train]).mean())
        log(f"fold {f + 1}/{folds.max() + 1}: accuracy {acc:.3f} on {int((~train).sum())} held-out images (L2 {l2:g})")
    temperature = fit_temperature(logits, y)
    raw = torch.from_numpy(logits).softmax(-1).numpy()
    calibrated = torch.from_numpy(logits / temperature).softmax(-1).numpy()
    per_fold = [float((logits[folds == f].argmax(1) == y[folds == f]).mean()) for f in range(int(folds.max()) + 1)]
    return {"folds": int(folds.max()) + 1, "images": int(len(y)), "l2_per_fold": chosen,
            "accuracy_per_fold": per_fold, "temperature": temperature,
            **tissue_metrics(y, calibrated, classes),
            "reliability_before": reliability(raw, y), "reliability_after": reliability(calibrated, y),
            "out_of_fold_probs": calibrated.round(4).tolist()}


def stress_cross_validated(net: TissueNet, samples: list[TissueSample], x: np.ndarray, fold: np.ndarray,
                           result: dict, log: Callable[[str], None] = print) -> dict:
    """Out-of-fold metrics under each stain-stress recolouring (:mod:`src_train.stress`):
    every fold's head (its own L2, at the cross-validated temperature) scores that fold's
    held-out images re-rendered."""
    from napari_bach.imageio import read_image

    from .stress import STRESS

    y = np.array([s.tissue for s in samples])
    n = len(net.config.classes)
    heads = [fit_head(x[fold != f], np.repeat(y[fold != f], x.shape[1]), n, result["l2_per_fold"][f])
             for f in range(result["folds"])]
    out = {}
    for name, recolour in STRESS.items():
        feats = np.stack([net.field_features(recolour(read_image(s.path).rgb), s.mpp).numpy() for s in samples])
        logits = np.zeros((len(y), n), np.float32)
        for f, head in enumerate(heads):
            logits[fold == f] = head_logits(head, feats[fold == f])
        m = tissue_metrics(y, torch.from_numpy(logits / result["temperature"]).softmax(-1).numpy(), net.config.classes)
        out[name] = {k: m[k] for k in ("accuracy", "balanced_accuracy", "confusion")}
        log(f"stress {name}: accuracy {m['accuracy']:.3f}, balanced {m['balanced_accuracy']:.3f}")
    out["mean"] = {k: float(np.mean([v[k] for v in out.values()])) for k in ("accuracy", "balanced_accuracy")}
    return out


def train_tissue(root: str | Path, out: str | Path, backbone: str = "efficientnet_lite0",
                 scales: tuple[float, ...] = (1.0, 2.0), folds: int = 5, copies: int = 4,
                 mpp: float | None = None, seed: int = 0, threads: int = 0, license: str = "",
                 log: Callable[[str], None] = print, stress: bool = False) -> dict:
    """Features, grouped cross-validation, then the shipped classifier (``out/tissue.pt``)
    fitted on every image with the most chosen L2 and the out-of-fold temperature."""
    from napari_bach.backbones import spec
    from napari_bach.tissue import save_tissue_model

    if threads:
        torch.set_num_threads(threads)
    samples = load_class_folders(root, mpp)
    fold = contiguous_folds(samples, folds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = TissueConfig.for_backbone(backbone, scales=tuple(scales))
    net = TissueNet(config)
    loaded = spec(backbone).load_imagenet
    if loaded is None:
        from napari_bach.backbones import _load_torchvision_imagenet

        _load_torchvision_imagenet(backbone, net.trunk)
    else:
        loaded(net.trunk)
    log(f"{len(samples)} images ({', '.join(f'{c} {sum(s.tissue == i for s in samples)}' for i, c in enumerate(config.classes))}); "
        f"{folds} contiguous folds; {copies} augmented views each")
    x, y = extract_features(net, samples, copies, seed, cache=out / "features.npz", log=log)
    result = cross_validate(x, y, fold, config.classes, log)
    if stress:  # the trunk is ImageNet's and frozen: the net is ready before the head is fitted
        result["stress"] = stress_cross_validated(net, samples, x, fold, result, log)
    l2 = max(set(result["l2_per_fold"]), key=result["l2_per_fold"].count)
    w, b, mean, std = fit_head(x, np.repeat(y, x.shape[1]), len(config.classes), l2)
    net.head.weight.copy_(w)
    net.head.bias.copy_(b)
    net.feature_mean.copy_(mean)
    net.feature_std.copy_(std)
    net.temperature.fill_(result["temperature"])
    summary = {k: result[k] for k in ("accuracy", "balanced_accuracy", "macro", "confusion", "folds", "images",
                                      "temperature")}
    summary["ece"] = result["reliability_after"]["ece"]
    if stress:
        summary["stress"] = {k: v if k == "mean" else {m: v[m] for m in ("accuracy", "balanced_accuracy")}
                             for k, v in result["stress"].items()}
    info = TissueInfo(name=f"napari-bach tissue ({backbone}, {'+'.join(f'{s:g}' for s in scales)} µm/px)",
                      trained=True, data=f"{len(samples)} images of {root}", license=license, metrics=summary,
                      notes=f"frozen ImageNet {backbone}; logistic regression L2 {l2:g} on {copies} augmented "
                            f"views + the image; {folds}-fold contiguous-block cross-validation")
    save_tissue_model(out / "tissue.pt", net, info)
    files = [{"file": str(s.path.relative_to(root)), "truth": config.classes[s.tissue], "fold": int(f),
              "predicted": config.classes[int(np.argmax(p))]} for s, f, p in zip(samples, fold, result["out_of_fold_probs"])]
    (out / "cv.json").write_text(json.dumps({**result, "files": files, "l2": l2}, indent=1))
    return {**summary, "l2": l2, "model": str(out / "tissue.pt")}
