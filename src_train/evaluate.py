"""Evaluate a checkpoint: nucleus metrics on held-out images, tissue-class metrics on
held-out BACH images, and the plots (loss/validation curves, confusion matrix, ROC)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from napari_bach.checkpoint import load_checkpoint
from napari_bach.config import Thresholds
from napari_bach.model import with_settings
from napari_bach.predict import predict

from .datasets import Sample
from .metrics import nucleus_metrics, pooled_nucleus_metrics, roc_curve, tissue_metrics


SCORE_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
NMS_SWEEP = (0.3, 0.4, 0.5, 0.6)


def sweep_nuclei(model, samples: list[Sample], score_thresholds, nms_values, tta: bool = False,
                 hide_mpp: bool = False, size_at: tuple[float, float] | None = None, gray_pass: bool = False
                 ) -> dict[tuple[float, float], list[dict]]:
    """Per-image nucleus metrics at each (score threshold, NMS IoU); the network runs once
    per image and the pairs only re-filter its cached candidates. The model's minimum
    nucleus area applies, as it does for users. ``hide_mpp``: each image is segmented as
    if its µm/px were unknown (an untagged file). ``size_at``: at this pair, each image's
    metrics also hold the median equivalent diameter of the nuclei found
    (``median_diameter_um``, with the µm/px known). ``gray_pass``: as the CLI's ``--gray-pass
    auto``, images whose colours are flagged are segmented as grayscale copies."""
    from napari_bach.colour import check_colours, model_input
    from napari_bach.scale import median_diameter

    out = {(t, n): [] for t in score_thresholds for n in nms_values}
    for s in samples:
        mpp = None if hide_mpp else s.mpp
        pixels = model_input(s.image, check_colours(s.image), gray_pass)[0] if gray_pass else s.image
        det = predict(pixels, model, mpp, tissue_trained=False, tta=tta)
        min_area = Thresholds().min_area_px(det.segmented_mpp, model.config)
        for t, n in out:
            labels = det.refilter(t, n, min_area=min_area).labels
            metrics = nucleus_metrics(s.labels, labels)
            if (t, n) == size_at and not hide_mpp:
                metrics["median_diameter_um"] = median_diameter(labels)[0] * s.mpp
            out[t, n].append(metrics)
    return out


def score_nuclei(model, samples: list[Sample], score_thresholds, nms_iou: float,
                 tta: bool = False) -> dict[float, list[dict]]:
    """Per-image nucleus metrics at each score threshold, at one NMS IoU."""
    return {t: v for (t, _), v in sweep_nuclei(model, samples, score_thresholds, [nms_iou], tta).items()}


def group_mean(per_image: list[dict], groups: list[str]) -> dict[str, float]:
    """Pooled metrics per group, then their mean: every unseen source counts the same."""
    names = sorted(set(groups))
    pooled = [pooled_nucleus_metrics([m for m, g in zip(per_image, groups) if g == name]) for name in names]
    return {k: float(np.mean([p[k] for p in pooled])) for k in ("f1", "aji", "pq", "dice")}


def stress_metrics(model, samples: list[Sample], score: float, nms: float, gray_pass: bool = False) -> dict:
    """Each stain-stress transform's group means (and per group) at one threshold pair, and
    the mean over transforms: the colours of labs and scanners the data lacks."""
    from .stress import STRESS, stress_summary, stressed

    groups = [s.group for s in samples]
    per_transform, per_group = {}, {}
    for name in STRESS:
        per_image = sweep_nuclei(model, stressed(samples, name), [score], [nms], gray_pass=gray_pass)[score, nms]
        per_transform[name] = group_mean(per_image, groups)
        per_group[name] = {g: pooled_nucleus_metrics([m for m, h in zip(per_image, groups) if h == g])
                           for g in sorted(set(groups))}
    return {"mean": stress_summary(per_transform), "transforms": per_transform, "groups": per_group}


def evaluate(model_path: str | Path, nuclei: list[Sample], tissue: list[Sample] = (),
             score_threshold: float | None = None, nms_iou: float | None = None, tta: bool = False,
             settings: dict | None = None, hide_mpp: bool = False, stress: bool = False,
             gray_pass: bool = False) -> dict:
    """Metrics of one model; nucleus images are segmented whole, at their own µm/px
    (``tta``: with flip test-time augmentation; ``hide_mpp``: as if it were unknown).
    Images from several sources (``group``) are also reported per group, with the sweep
    of their group means: unseen hospitals count the same however many images each has.
    ``settings``: inference settings to change first (:func:`napari_bach.model.with_settings`).
    ``nucleus_diameter_um``: the median nucleus the model finds at its thresholds (the
    median of each group's image medians, averaged over groups), its reference size for
    images of unknown µm/px (``ship --config nucleus_diameter_um=...``)."""
    model, info = load_checkpoint(model_path)
    if settings:
        model = with_settings(model, **settings)
    cfg = model.config
    score = cfg.default_score_threshold if score_threshold is None else score_threshold
    nms = cfg.default_nms_iou if nms_iou is None else nms_iou
    result = {"model": str(model_path), "model_status": info.status, "score_threshold": score, "nms_iou": nms,
              "tta": tta, "settings": settings or {}, "mpp_hidden": hide_mpp, "gray_pass": gray_pass}
    if nuclei:
        by_pair = sweep_nuclei(model, nuclei, sorted({score, *SCORE_SWEEP}), sorted({nms, *NMS_SWEEP}), tta,
                               hide_mpp, size_at=(score, nms), gray_pass=gray_pass)
        by_threshold = {t: v for (t, n), v in by_pair.items() if n == nms}
        result["nuclei"] = pooled_nucleus_metrics(by_threshold[score])
        result["nuclei_per_image"] = [{"image": s.name, **m} for s, m in zip(nuclei, by_threshold[score])]
        if not hide_mpp:
            sizes = {g: [m["median_diameter_um"] for s, m in zip(nuclei, by_threshold[score])
                         if s.group == g and m["median_diameter_um"] > 0] for g in {s.group for s in nuclei}}
            medians = [float(np.median(v)) for v in sizes.values() if v]
            if medians:  # none when the model finds no nucleus
                result["nucleus_diameter_um"] = float(np.mean(medians))
        result["score_sweep"] = [{"score_threshold": t, **pooled_nucleus_metrics(by_threshold[t])} for t in SCORE_SWEEP]
        groups = sorted({s.group for s in nuclei})
        if len(groups) > 1:
            per_group = {}
            for g in groups:
                idx = [i for i, s in enumerate(nuclei) if s.group == g]
                per_group[g] = {"images": len(idx),
                                "nuclei": pooled_nucleus_metrics([by_threshold[score][i] for i in idx]),
                                "score_sweep": [{"score_threshold": t, **pooled_nucleus_metrics(
                                    [by_threshold[t][i] for i in idx])} for t in SCORE_SWEEP]}
            result["groups"] = per_group
            result["group_mean_sweep"] = [
                {"score_threshold": t, **{k: float(np.mean([g["score_sweep"][j][k] for g in per_group.values()]))
                                          for k in ("f1", "aji", "pq", "dice")}}
                for j, t in enumerate(SCORE_SWEEP)]
        # both thresholds at once: the model's default NMS IoU is chosen here too
        result["nms_sweep"] = [{"score_threshold": t, "nms_iou": n,
                                **group_mean(by_pair[t, n], [s.group for s in nuclei])}
                               for t in SCORE_SWEEP for n in NMS_SWEEP]
        result["group_mean"] = group_mean(by_threshold[score], [s.group for s in nuclei])
        if stress:
            result["stress"] = stress_metrics(model, nuclei, score, nms, gray_pass)
    if tissue:
        if not info.tissue_trained:
            result["tissue"] = "not trained: this checkpoint's tissue head never saw tissue labels"
        else:
            probs = np.stack([predict(s.image, model, s.mpp).tissue_probs for s in tissue])
            result["tissue"] = tissue_metrics(np.array([s.tissue for s in tissue]), probs, cfg.tissue_classes)
            result["tissue"]["probs"] = probs.tolist()
            result["tissue"]["truth"] = [s.tissue for s in tissue]
    return result


def save_plots(result: dict, out: Path, log_csv: Path | None = None) -> list[Path]:
    """Loss and validation curves from a run folder, confusion matrix and ROC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if log_csv is not None and Path(log_csv).exists():
        with open(log_csv) as fh:
            rows = list(csv.DictReader(fh))
        steps = np.array([float(r["step"]) for r in rows])
        loss = np.array([float(r["loss"]) for r in rows])
        k = max(1, len(loss) // 50)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ax[0].plot(steps, loss, alpha=0.3, label="loss per step")
        ax[0].plot(steps[k - 1:], smooth, label=f"mean of {k}")
        ax[0].set(xlabel="step", ylabel="training loss", yscale="log")
        ax[0].legend()
        val_path = Path(log_csv).with_name("val.jsonl")
        if val_path.exists():
            val = [json.loads(l) for l in val_path.read_text().splitlines() if l.strip()]
            for key in ("f1", "aji", "pq", "dice"):
                ax[1].plot([v["step"] for v in val], [v[key] for v in val], marker="o", label=key)
            ax[1].set(xlabel="step", ylabel="validation", ylim=(0, 1))
            ax[1].legend()
        fig.tight_layout()
        written.append(out / "curves.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    tissue = result.get("tissue")
    if isinstance(tissue, dict):
        classes = tissue["classes"]
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        cm = np.array(tissue["confusion"])
        ax[0].imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax[0].text(j, i, str(v), ha="center", va="center")
        ax[0].set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
                  xlabel="predicted", ylabel="true", title=f"accuracy {tissue['accuracy']:.2f}")
        probs, truth = np.array(tissue["probs"]), np.array(tissue["truth"])
        for i, c in enumerate(classes):
            fpr, tpr = roc_curve(truth == i, probs[:, i])
            ax[1].plot(fpr, tpr, label=f"{c} AUC {tissue['per_class'][c]['roc_auc']:.2f}")
        ax[1].plot([0, 1], [0, 1], "k:", lw=0.8)
        ax[1].set(xlabel="false positive rate", ylabel="true positive rate")
        ax[1].legend()
        fig.tight_layout()
        written.append(out / "tissue.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def evaluate_main(args, nuclei: list[Sample], tissue: list[Sample]) -> int:
    result = evaluate(args.model, nuclei, tissue, args.score_threshold, args.nms_iou, args.tta,
                      dict(args.config or ()), getattr(args, "hide_mpp", False), getattr(args, "stress", False),
                      getattr(args, "gray_pass", False))
    if getattr(args, "zoom", None):
        result["zoom"] = args.zoom  # the images were resampled first
    if getattr(args, "colour_cast", None):
        result["colour_cast"] = list(args.colour_cast)  # the images were re-coloured first
    summary = {k: v for k, v in result.items() if k not in ("nuclei_per_image", "groups", "nms_sweep")}
    if "nms_sweep" in result:  # all of it in metrics.json
        summary["best_score_and_nms_by_f1"] = max(result["nms_sweep"], key=lambda r: r["f1"])
    if "groups" in result:
        summary["groups"] = {g: v["nuclei"] for g, v in result["groups"].items()}
    if "stress" in result:
        summary["stress"] = {"mean": result["stress"]["mean"], **result["stress"]["transforms"]}
    if isinstance(summary.get("tissue"), dict):
        summary["tissue"] = {k: v for k, v in summary["tissue"].items() if k not in ("probs", "truth")}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        summary["plots"] = [str(p) for p in save_plots(result, out, args.log)]
    print(json.dumps(summary, indent=2))
    return 0
