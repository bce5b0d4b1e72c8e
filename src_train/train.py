"""Training loop: joint Mask R-CNN + tissue-class loss, checkpoints, resume, early stopping.

Nucleus crops (MoNuSeg XML/masks, exported napari labels) train every head; BACH images,
which have a tissue class but no nucleus outlines, train the backbone and the tissue head
in steps of their own. Everything is seeded and the RNG states are checkpointed, so
``--resume`` continues the very same run.
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_bach.checkpoint import ModelInfo, read_checkpoint, save_checkpoint
from napari_bach.config import ModelConfig
from napari_bach.model import BachMaskRCNN, build_model

from .augment import AugmentConfig, augment, jitter_colour, random_geometry
from .datasets import Sample, instances_from_labels, rescale_sample
from .metrics import pooled_nucleus_metrics

LOSS_KEYS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask", "loss_tissue")


@dataclass
class TrainConfig:
    out: str = "runs/default"
    epochs: int = 50
    batch_size: int = 2
    crops_per_image: int = 4  # random crops per training image and epoch
    optimizer: str = "adam"  # the method's Adam, lr 1e-3; "sgd" as an option
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    grad_clip: float = 10.0
    val_every: int = 5  # epochs
    patience: int = 6  # validations without improvement before stopping
    checkpoint_every: int = 200  # steps
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    max_steps: int = 0  # 0: epochs decide
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def make_target(labels: np.ndarray, tissue: int = -1) -> dict[str, torch.Tensor]:
    boxes, masks, _ = instances_from_labels(labels)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64),
            "masks": torch.from_numpy(masks), "tissue": torch.tensor(tissue)}


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0)


def tissue_loss(model: BachMaskRCNN, images: list[torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the tissue head alone, for images without nucleus outlines."""
    batch, _ = model.transform(images)
    return F.cross_entropy(model.tissue_head(model.backbone(batch.tensors)), classes)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def validate(model: BachMaskRCNN, samples: list[Sample]) -> dict:
    """Nucleus metrics of the model on whole validation images at its default thresholds."""
    from .evaluate import score_nuclei

    score = model.config.default_score_threshold
    per_image = score_nuclei(model, samples, [score], model.config.default_nms_iou)[score]
    model.train()
    return pooled_nucleus_metrics(per_image)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, nuclei_train: list[Sample],
                 nuclei_val: list[Sample], tissue_train: list[Sample] = (), data_note: str = "",
                 license: str = "", pretrained: str | None = None) -> None:
        self.cfg, self.model_cfg = cfg, model_cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.train = [rescale_sample(s, model_cfg.mpp) for s in nuclei_train]
        self.val = list(nuclei_val)
        self.tissue = [rescale_sample(s, model_cfg.mpp) for s in tissue_train]
        self.data_note, self.license = data_note, license
        self.model = build_model(model_cfg, pretrained=pretrained).to(cfg.device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
        n_items = len(self.train) + len(self.tissue)
        self.steps_per_epoch = max(1, math.ceil(n_items * cfg.crops_per_image / cfg.batch_size))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.step, self.best, self.bad_validations, self.history = 0, -1.0, 0, []

    # -- checkpoints -------------------------------------------------------------------
    def info(self, metrics: dict | None = None) -> ModelInfo:
        return ModelInfo(name=f"{self.model_cfg.backbone}-nuclei", nuclei_trained=self.step > 0 and bool(self.train),
                         tissue_trained=self.step > 0 and bool(self.tissue), data=self.data_note,
                         license=self.license, steps=self.step, metrics=metrics or {},
                         notes=f"trained from scratch by src_train, seed {self.cfg.seed}")

    def save(self, name: str, metrics: dict | None = None, with_state: bool = True) -> Path:
        state = None
        if with_state:
            state = {"step": self.step, "best": self.best, "bad_validations": self.bad_validations,
                     "history": json.dumps(self.history), "optimizer": self.opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(self.rng.bit_generator.state),
                     "python_rng": json.dumps(random.getstate()), "train_config": json.dumps(asdict(self.cfg))}
        return save_checkpoint(self.out / name, self.model, self.info(metrics), train_state=state)

    def resume(self, path: str | Path) -> None:
        payload = read_checkpoint(path)
        if "train_state" not in payload:
            raise ValueError(f"{path} has no training state to resume from")
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
        st = payload["train_state"]
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.best, self.bad_validations = int(st["step"]), float(st["best"]), int(st["bad_validations"])
        self.history = json.loads(st["history"])
        torch.set_rng_state(st["torch_rng"])
        self.rng.bit_generator.state = json.loads(st["numpy_rng"])
        state = json.loads(st["python_rng"])
        random.setstate((state[0], tuple(state[1]), state[2]))

    # -- one step ------------------------------------------------------------------------
    def _nucleus_batch(self):
        images, targets = [], []
        for _ in range(self.cfg.batch_size):
            s = self.train[int(self.rng.integers(len(self.train)))]
            img, lab = augment(s.image, s.labels, self.rng, self.cfg.augment)
            images.append(to_tensor(img).to(self.cfg.device))
            targets.append({k: v.to(self.cfg.device) for k, v in make_target(lab, s.tissue).items()})
        return images, targets

    def _tissue_batch(self):
        images, classes = [], []
        for _ in range(self.cfg.batch_size):
            s = self.tissue[int(self.rng.integers(len(self.tissue)))]
            a = self.cfg.augment
            img, _ = random_geometry(s.image, np.zeros(s.image.shape[:2], np.int32), self.rng, a.crop, a.scale, a.rotate, a.flip)
            images.append(to_tensor(jitter_colour(img, self.rng, a)).to(self.cfg.device))
            classes.append(s.tissue)
        return images, torch.tensor(classes, device=self.cfg.device)

    def train_step(self) -> dict[str, float]:
        for group in self.opt.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.step, self.total_steps, self.cfg.warmup_steps)
        use_tissue = self.tissue and (not self.train or self.rng.random() < len(self.tissue) / (len(self.tissue) + len(self.train)))
        if use_tissue:
            images, classes = self._tissue_batch()
            losses = {"loss_tissue": tissue_loss(self.model, images, classes)}
        else:
            images, targets = self._nucleus_batch()
            losses = self.model(images, targets)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} at step {self.step}; lower --lr")
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.step += 1
        row = {k: losses[k].item() if k in losses else "" for k in LOSS_KEYS}
        row["loss"] = total.item()
        return row

    # -- the run -------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        log_path = self.out / "log.csv"
        fields = ["step", "epoch", "lr", "loss", *LOSS_KEYS, "seconds"]
        new_log = not log_path.exists() or self.step == 0
        log = open(log_path, "w" if new_log else "a", newline="")
        writer = csv.DictWriter(log, fieldnames=fields)
        if new_log:
            writer.writeheader()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", mininterval=5)
        stopped_early = False
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                row = self.train_step()
                row.update(step=self.step, epoch=round(self.step / self.steps_per_epoch, 3),
                           lr=self.opt.param_groups[0]["lr"], seconds=round(time.perf_counter() - t0, 3))
                writer.writerow(row)
                log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save("last.pt")
                if self.val and self.step % (self.cfg.val_every * self.steps_per_epoch) == 0:
                    if self._validate():
                        stopped_early = True
                        break
        finally:
            log.close()
            if bar is not None:
                bar.close()
        self.save("last.pt")
        return {"steps": self.step, "best": self.best, "stopped_early": stopped_early, "history": self.history}

    def _validate(self) -> bool:
        """Validate, keep the best checkpoint; True when early stopping triggers."""
        t0 = time.perf_counter()
        metrics = validate(self.model, self.val)
        metrics.update(step=self.step, seconds=round(time.perf_counter() - t0, 1))
        self.history.append(metrics)
        with open(self.out / "val.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        score = metrics["pq"]
        if score > self.best:
            self.best, self.bad_validations = score, 0
            self.save("best.pt", metrics, with_state=False)
        else:
            self.bad_validations += 1
        return self.bad_validations >= self.cfg.patience
