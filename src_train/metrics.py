"""Nucleus and tissue-class metrics, from label images and class scores.

Nuclei: detection precision/recall/F1 at IoU > 0.5, AJI (Kumar et al. 2017), PQ (Kirillov
et al. 2019) and pixel Dice. Tissue: accuracy, per-class and macro precision/recall/F1,
confusion matrix, one-vs-rest ROC-AUC.
"""
from __future__ import annotations

import numpy as np
from skimage.segmentation import relabel_sequential


def _overlaps(gt: np.ndarray, pred: np.ndarray):
    gt, _, _ = relabel_sequential(np.asarray(gt, np.int64))
    pred, _, _ = relabel_sequential(np.asarray(pred, np.int64))
    n_g, n_p = int(gt.max()), int(pred.max())
    inter = np.bincount(gt.ravel() * (n_p + 1) + pred.ravel(), minlength=(n_g + 1) * (n_p + 1))
    inter = inter.reshape(n_g + 1, n_p + 1)
    area_g, area_p = inter.sum(1), inter.sum(0)
    inter = inter[1:, 1:].astype(np.float64)
    union = area_g[1:, None] + area_p[None, 1:] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return inter, union, iou, area_g[1:], area_p[1:]


def nucleus_metrics(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict[str, float]:
    """Detection P/R/F1 at IoU > threshold, AJI, PQ and pixel Dice for one image."""
    if gt.shape != pred.shape:
        raise ValueError(f"shape mismatch: {gt.shape} vs {pred.shape}")
    inter, union, iou, area_g, area_p = _overlaps(gt, pred)
    n_g, n_p = len(area_g), len(area_p)
    matched = iou > iou_threshold  # unique at 0.5: two nuclei cannot both exceed it
    tp = int(matched.sum())
    fp, fn = n_p - tp, n_g - tp
    precision = tp / n_p if n_p else float(n_g == 0)
    recall = tp / n_g if n_g else 1.0
    f1 = 2 * tp / (n_g + n_p) if n_g + n_p else 1.0
    denom = tp + 0.5 * fp + 0.5 * fn
    pq = float(iou[matched].sum() / denom) if denom else 1.0
    # AJI: each GT nucleus with its best-IoU prediction; unused predictions join the union.
    c, u = 0.0, 0.0
    used = np.zeros(n_p, bool)
    for g in range(n_g):
        if n_p and iou[g].max() > 0:
            p = int(iou[g].argmax())
            c += inter[g, p]
            u += union[g, p]
            used[p] = True
        else:
            u += area_g[g]
    u += area_p[~used].sum()
    aji = c / u if u else 1.0
    fg_g, fg_p = gt > 0, pred > 0
    total = fg_g.sum() + fg_p.sum()
    dice = 2 * np.logical_and(fg_g, fg_p).sum() / total if total else 1.0
    return {"precision": precision, "recall": recall, "f1": f1, "aji": float(aji), "pq": pq,
            "dice": float(dice), "tp": tp, "fp": fp, "fn": fn}


def pooled_nucleus_metrics(per_image: list[dict]) -> dict[str, float]:
    """Detection counts pooled over images; AJI, PQ and Dice averaged per image."""
    tp = sum(m["tp"] for m in per_image)
    fp = sum(m["fp"] for m in per_image)
    fn = sum(m["fn"] for m in per_image)
    out = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
           "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, "tp": tp, "fp": fp, "fn": fn}
    for k in ("aji", "pq", "dice"):
        out[k] = float(np.mean([m[k] for m in per_image])) if per_image else 0.0
    out["images"] = len(per_image)
    return out


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the Mann–Whitney U statistic (ties count half)."""
    y_true = np.asarray(y_true, bool)
    pos, neg = score[y_true], score[~y_true]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates over all thresholds (for plotting)."""
    order = np.argsort(-score, kind="stable")
    y = np.asarray(y_true, bool)[order]
    tps = np.concatenate([[0], np.cumsum(y)])
    fps = np.concatenate([[0], np.cumsum(~y)])
    return fps / max(fps[-1], 1), tps / max(tps[-1], 1)


def tissue_metrics(y_true: np.ndarray, probs: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Accuracy, per-class and macro P/R/F1, confusion matrix (rows = truth), ROC-AUC."""
    y_true = np.asarray(y_true, int)
    y_pred = np.asarray(probs).argmax(1)
    k = len(classes)
    cm = np.zeros((k, k), int)
    np.add.at(cm, (y_true, y_pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = cm[i, i]
        p = tp / cm[:, i].sum() if cm[:, i].sum() else 0.0
        r = tp / cm[i].sum() if cm[i].sum() else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        per_class[name] = {"precision": float(p), "recall": float(r), "f1": float(f),
                           "roc_auc": roc_auc(y_true == i, np.asarray(probs)[:, i])}
    macro = {m: float(np.nanmean([per_class[c][m] for c in classes])) for m in ("precision", "recall", "f1", "roc_auc")}
    return {"accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
            "balanced_accuracy": macro["recall"], "macro": macro,
            "per_class": per_class, "confusion": cm.tolist(), "classes": list(classes)}
