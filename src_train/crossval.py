"""k-fold cross-validation of the tissue head: train on k-1 folds, predict the held-out
images whole (tile probabilities averaged, weighted by tissue, as the BACH winners
aggregated patches), and report mean ± sd accuracy, the pooled confusion matrix and ROC-AUC."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from napari_bach.config import ModelConfig
from napari_bach.predict import predict

from .datasets import Sample, stratified_split
from .metrics import tissue_metrics
from .train import Trainer, TrainConfig


def tissue_cross_validation(samples: list[Sample], folds: int, model_cfg: ModelConfig, train_cfg: TrainConfig,
                            seed: int = 0, log=print) -> dict:
    """Whole images are dealt into ``folds`` stratified folds; each fold is held out once."""
    if folds < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    classes = model_cfg.tissue_classes
    per_fold, truth, probs = [], [], []
    for fold in range(folds):
        train, held = stratified_split(samples, seed=seed, folds=folds, fold=fold)
        trainer = Trainer(model_cfg, replace(train_cfg, out=str(Path(train_cfg.out) / f"fold{fold}")), [], [], train)
        trainer.run(progress=False)
        model = trainer.shipped_model().eval()
        p = np.stack([predict(s.image, model, s.mpp).tissue_probs for s in held])
        t = np.array([s.tissue for s in held])
        per_fold.append(tissue_metrics(t, p, classes)["accuracy"])
        truth.append(t)
        probs.append(p)
        log(f"fold {fold + 1}/{folds}: accuracy {per_fold[-1]:.3f} on {len(held)} held-out images")
    pooled = tissue_metrics(np.concatenate(truth), np.concatenate(probs), classes)
    return {"folds": folds, "images": int(sum(len(t) for t in truth)), "accuracy_per_fold": per_fold,
            "accuracy_mean": float(np.mean(per_fold)), "accuracy_sd": float(np.std(per_fold, ddof=1)),
            "pooled": pooled}
