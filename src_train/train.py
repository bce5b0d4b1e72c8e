"""Training loop: joint Mask R-CNN + tissue-class loss, checkpoints, resume, early stopping.

Nucleus crops (MoNuSeg XML/masks, exported napari labels) train every head; BACH images,
which have a tissue class but no nucleus outlines, train the backbone and the tissue head
in steps of their own. Crops come from :mod:`src_train.loader` (workers, pinned memory);
on CUDA the forward runs in bf16 autocast and channels-last. Under ``torchrun`` the model
is wrapped in DistributedDataParallel (NCCL on CUDA, gloo on CPU): each rank draws its own
crops, rank 0 alone logs, validates and writes checkpoints, in the same format. Everything
is seeded and the RNG states and crop positions are checkpointed, so ``--resume``
continues the very same run.
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

from napari_bach.checkpoint import ModelInfo, read_checkpoint, save_checkpoint
from napari_bach.config import ModelConfig
from napari_bach.model import BachMaskRCNN, build_model

from .augment import AugmentConfig
from .datasets import Sample, normalise_stains, rescale_sample
from .loader import CropStream, make_loader
from .narrow import narrow_fpn
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
    workers: int = 0  # loader worker processes (0: augment in the training process)
    accumulate: int = 1  # micro-batches per optimizer step
    lr_scaling: str = "sqrt"  # lr is for REFERENCE_BATCH crops; scaled to the global batch: none|linear|sqrt
    amp: bool = True  # bf16 autocast on CUDA (CPU always trains in fp32)
    ema: float = 0.0  # >0: keep an exponential moving average of the weights (e.g. 0.999) and ship it
    max_hours: float = 0.0  # >0: the schedule runs on training time and ends after this many hours
    val_every_steps: int = 0  # >0: validate every this many steps instead of every val_every epochs
    # validate under src_train.stress's recolourings too; the best checkpoint is then the best
    # mean of PQ as-is and PQ under stress (a model that holds on other stains)
    stress: bool = False
    # which weights learn (PARTS): "fpn+heads" and "heads" keep the ImageNet-and-nuclei
    # trunk as it is, for a fine-tune on a few images that must not forget the rest
    train_parts: str = "all"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


REFERENCE_BATCH = 2  # the batch --lr is given for
# parameters frozen by TrainConfig.train_parts, by name prefix
PARTS = {"all": (), "fpn+heads": ("backbone.body.",), "heads": ("backbone.",)}


@dataclass(frozen=True)
class Distributed:
    """Where this process is in a ``torchrun`` job (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Distributed":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def start(self, device: str) -> str:
        """Join the process group; returns this rank's device."""
        if self.world == 1:
            return device
        if device.startswith("cuda"):
            torch.cuda.set_device(self.local_rank)
            device = f"cuda:{self.local_rank}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return device


def scaled_lr(cfg: "TrainConfig", world: int) -> float:
    """Base lr for the global batch (batch × accumulate × ranks), from REFERENCE_BATCH."""
    ratio = cfg.batch_size * cfg.accumulate * world / REFERENCE_BATCH
    return cfg.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]


def lr_factor(step: int, total: int, warmup: int, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to 5% of the base rate. ``progress`` (0–1) is
    where the run is when it is scheduled by time rather than steps."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def validate(model: BachMaskRCNN, groups: dict[str, list[Sample]], stress: bool = False) -> dict:
    """Nucleus metrics of the model on whole validation images at its default thresholds,
    per group (source) and their mean: every unseen source counts the same. ``stress``:
    also the mean under each stain-stress recolouring (``stress``, ``stress_pq``)."""
    from .evaluate import score_nuclei, stress_metrics

    score = model.config.default_score_threshold
    out: dict = {}
    for name, samples in groups.items():
        per_image = score_nuclei(model, samples, [score], model.config.default_nms_iou)[score]
        out[name] = pooled_nucleus_metrics(per_image)
    for key in ("f1", "aji", "pq", "dice"):
        out[key] = float(np.mean([m[key] for m in out.values() if isinstance(m, dict)]))
    if stress:
        samples = [replace(s, group=name) for name, group in groups.items() for s in group]
        measured = stress_metrics(model, samples, score, model.config.default_nms_iou)
        out["stress"] = {"mean": measured["mean"], **measured["transforms"]}
        out["stress_pq"] = measured["mean"]["pq"]
    model.train()
    return out


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, nuclei_train: list[Sample],
                 nuclei_val: list[Sample] | dict[str, list[Sample]], tissue_train: list[Sample] = (),
                 data_note: str = "", license: str = "", pretrained: str | None = None) -> None:
        self.cfg, self.model_cfg = cfg, model_cfg
        self.dist = Distributed.from_env()
        self.device = self.dist.start(cfg.device)
        self.out = Path(cfg.out)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.rng = np.random.default_rng(cfg.seed)  # the same nucleus/tissue step choices on every rank
        self.train = [rescale_sample(s, model_cfg.mpp) for s in nuclei_train]
        self.tissue = [rescale_sample(s, model_cfg.mpp) for s in tissue_train]
        # stain normalisation: the reference is fitted on the nucleus images (or, without
        # any, the tissue images); both are mapped onto it
        model_cfg, self.train = normalise_stains(self.train, model_cfg)
        model_cfg, self.tissue = normalise_stains(self.tissue, model_cfg)
        self.model_cfg = model_cfg
        self.val = dict(nuclei_val) if isinstance(nuclei_val, dict) else ({"validation": list(nuclei_val)} if nuclei_val else {})
        self.data_note, self.license = data_note, license
        cuda = self.device.startswith("cuda")
        self.model = build_model(model_cfg, pretrained=pretrained).to(self.device).train()
        if cuda:  # channels-last weights and batches (the transform batches them); slower on CPU
            self.model = self.model.to(memory_format=torch.channels_last)
            self.model.transform.channels_last = True
        self.net = self.model
        if self.dist.world > 1:  # tissue steps leave the detection heads unused, and vice versa
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(self.model, device_ids=[self.dist.local_rank] if cuda else None,
                                               find_unused_parameters=True)
        self.ema = None
        if cfg.ema > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        if cfg.train_parts not in PARTS:
            raise ValueError(f"train_parts must be one of {', '.join(PARTS)}, got {cfg.train_parts!r}")
        frozen = PARTS[cfg.train_parts]
        for name, p in self.model.named_parameters():
            if frozen and name.startswith(frozen):
                p.requires_grad_(False)
        self.base_lr = scaled_lr(cfg, self.dist.world)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=self.base_lr, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=self.base_lr, momentum=0.9, weight_decay=cfg.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}")
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.amp else nullcontext())
        n_items = len(self.train) + len(self.tissue)
        global_batch = cfg.batch_size * cfg.accumulate * self.dist.world
        self.steps_per_epoch = max(1, math.ceil(n_items * cfg.crops_per_image / global_batch))
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.step, self.best, self.bad_validations, self.history = 0, -1.0, 0, []
        self.seconds = 0.0  # training time so far (this and earlier sessions), for --max-hours
        self.start_note = f"from ImageNet ({pretrained})" if pretrained else "from scratch"
        self.prior_steps, self.prior_hours = 0, 0.0  # training behind a warm start's weights
        self.drawn = {"nuclei": 0, "tissue": 0}  # batches taken from each stream: where a resume continues
        self._streams = {"nuclei": CropStream(self.train, cfg.augment, cfg.seed, self.dist.rank),
                         "tissue": CropStream(self.tissue, cfg.augment, cfg.seed + 1, self.dist.rank)}
        self._batches: dict = {}

    # -- checkpoints -------------------------------------------------------------------
    def info(self, metrics: dict | None = None) -> ModelInfo:
        return ModelInfo(name=f"{self.model_cfg.backbone}-nuclei", nuclei_trained=self.step > 0 and bool(self.train),
                         tissue_trained=self.step > 0 and bool(self.tissue), data=self.data_note,
                         license=self.license, steps=self.prior_steps + self.step, metrics=metrics or {},
                         hours=self.prior_hours + self.seconds / 3600,
                         notes=f"trained {self.start_note} by src_train, seed {self.cfg.seed}, "
                               f"{self.step} steps in {self.seconds / 3600:.2f} h")

    def shipped_model(self) -> BachMaskRCNN:
        """The weights validated and shipped: the moving average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def save(self, name: str, metrics: dict | None = None, with_state: bool = True) -> Path | None:
        """Rank 0 writes; the file format is the same with one process or many."""
        if not self.dist.main:
            return None
        state = None
        if with_state:
            state = {"step": self.step, "best": self.best, "bad_validations": self.bad_validations,
                     "history": json.dumps(self.history), "optimizer": self.opt.state_dict(),
                     "torch_rng": torch.get_rng_state(), "numpy_rng": json.dumps(self.rng.bit_generator.state),
                     "python_rng": json.dumps(random.getstate()), "train_config": json.dumps(asdict(self.cfg)),
                     "drawn": json.dumps(self.drawn), "world": self.dist.world, "seconds": self.seconds,
                     "start_note": self.start_note, "prior": [self.prior_steps, self.prior_hours]}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
                state["weights"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        model = self.shipped_model()
        return save_checkpoint(self.out / name, model, self.info(metrics), train_state=state)

    def resume(self, path: str | Path) -> None:
        payload = read_checkpoint(path)
        if "train_state" not in payload:
            raise ValueError(f"{path} has no training state to resume from")
        st = payload["train_state"]
        weights = st.get("weights", payload["state_dict"])  # with EMA the file's weights are the average
        self.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
        if self.ema is not None and "ema" in st:
            self.ema.load_state_dict(st["ema"])
        self.drawn = json.loads(st.get("drawn", '{"nuclei": 0, "tissue": 0}'))
        if int(st.get("world", 1)) != self.dist.world:
            print(f"note: resumed a {st.get('world', 1)}-process run with {self.dist.world}: crops continue per rank")
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.best, self.bad_validations = int(st["step"]), float(st["best"]), int(st["bad_validations"])
        self.seconds = float(st.get("seconds", 0.0))
        self.start_note = st.get("start_note", self.start_note)  # a resumed warm start still says where it began
        self.prior_steps, self.prior_hours = st.get("prior", [0, 0.0])
        self.history = json.loads(st["history"])
        torch.set_rng_state(st["torch_rng"])
        self.rng.bit_generator.state = json.loads(st["numpy_rng"])
        state = json.loads(st["python_rng"])
        random.setstate((state[0], tuple(state[1]), state[2]))

    def init_from(self, path: str | Path) -> int:
        """Warm start: weights only from a napari-bach checkpoint (a new schedule, optimizer
        and step count). Tensors whose name and shape match are copied; returns how many.
        A wider FPN is narrowed to this model's channels first (:func:`narrow_fpn`)."""
        payload = read_checkpoint(path)
        own = self.model.state_dict()
        state = payload["state_dict"]
        if "rpn.head.conv.0.0.weight" in state and state["rpn.head.conv.0.0.weight"].shape[0] != self.model_cfg.fpn_channels:
            state = narrow_fpn(state, self.model_cfg.fpn_channels)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
                 if k in own and own[k].shape == v.shape}
        if not any(k.startswith("backbone.") for k in state):
            raise ValueError(f"{path}: its backbone does not fit this model's ({self.model_cfg.backbone})")
        self.model.load_state_dict(state, strict=False)
        if self.ema is not None:
            self.ema.module.load_state_dict(state, strict=False)
        prior = payload.get("info", {})
        self.start_note = f"warm-started from {Path(path).name} ({prior.get('name', '?')}, {prior.get('steps', 0)} steps)"
        self.prior_steps, self.prior_hours = int(prior.get("steps", 0)), float(prior.get("hours", 0.0))
        return len(state)

    def progress(self) -> float:
        """Where the schedule is, 0–1: by steps, or by training time with ``max_hours``."""
        if self.cfg.max_hours > 0:
            by_steps = self.step / self.cfg.max_steps if self.cfg.max_steps else 0.0
            return max(self.seconds / (self.cfg.max_hours * 3600), by_steps)
        return self.step / max(1, self.total_steps)

    # -- one step ------------------------------------------------------------------------
    def _next(self, kind: str):
        """The next batch of ``kind`` ("nuclei" or "tissue"), on this rank's device."""
        if kind not in self._batches:  # a loader starts where the (resumed) run left off
            loader = make_loader(self._streams[kind], self.cfg.batch_size, self.drawn[kind] * self.cfg.batch_size,
                                 self.cfg.workers, pin_memory=self.device.startswith("cuda"))
            self._batches[kind] = iter(loader)
        images, targets = next(self._batches[kind])
        self.drawn[kind] += 1
        images = [im.to(self.device, non_blocking=True) for im in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        return images, targets

    def train_step(self) -> dict[str, float]:
        for group in self.opt.param_groups:
            timed = self.progress() if self.cfg.max_hours > 0 else None
            group["lr"] = self.base_lr * lr_factor(self.step, self.total_steps, self.cfg.warmup_steps, timed)
        use_tissue = self.tissue and (not self.train or self.rng.random() < len(self.tissue) / (len(self.tissue) + len(self.train)))
        kind = "tissue" if use_tissue else "nuclei"
        self.opt.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(self.cfg.accumulate):
            images, targets = self._next(kind)
            sync = micro == self.cfg.accumulate - 1 or self.net is self.model
            with (nullcontext() if sync else self.net.no_sync()), self.autocast:
                losses = self.net(images, targets, tissue_only=use_tissue)
            total = sum(losses.values()) / self.cfg.accumulate
            if not torch.isfinite(total):
                raise FloatingPointError(f"loss became {total.item()} at step {self.step}; lower --lr")
            with nullcontext() if sync else self.net.no_sync():
                total.backward()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item() / self.cfg.accumulate
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        row = {k: sums.get(k, "") for k in LOSS_KEYS}
        row["loss"] = sum(sums.values())
        return row

    # -- the run -------------------------------------------------------------------------
    def run(self, progress: bool = True, on_step: Callable[[dict], bool | None] | None = None) -> dict:
        """Train until the schedule ends (steps or ``max_hours``) or early stopping;
        ``on_step`` receives each step's log row and ends the run by returning True (a
        caller's own early stopping, as fine-tuning's on the held-out corrections)."""
        log_path = self.out / "log.csv"
        fields = ["step", "epoch", "lr", "loss", *LOSS_KEYS, "seconds"]
        new_log = not log_path.exists() or self.step == 0
        log = open(log_path if self.dist.main else os.devnull, "w" if new_log else "a", newline="")
        writer = csv.DictWriter(log, fieldnames=fields)
        if new_log:
            writer.writeheader()
        bar = None
        if progress and self.dist.main:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", mininterval=5)
        stopped_early = False
        val_every = self.cfg.val_every_steps or self.cfg.val_every * self.steps_per_epoch
        try:
            while self.progress() < 1.0:
                t0 = time.perf_counter()
                row = self.train_step()
                took = time.perf_counter() - t0
                self.seconds += took
                row.update(step=self.step, epoch=round(self.step / self.steps_per_epoch, 3),
                           lr=self.opt.param_groups[0]["lr"], seconds=round(took, 3))
                writer.writerow(row)
                log.flush()
                caller_stop = bool(on_step(row)) if on_step is not None else False
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}")
                if caller_stop:
                    stopped_early = True
                    break
                if self.step % self.cfg.checkpoint_every == 0:
                    self.save("last.pt")
                if self.val and self.step % val_every == 0:
                    if self._validate():
                        stopped_early = True
                        break
            if self.val and not stopped_early and self.step % val_every:
                self._validate()  # the final weights are a candidate too
        finally:
            log.close()
            if bar is not None:
                bar.close()
        self.save("last.pt")
        return {"steps": self.step, "best": self.best, "stopped_early": stopped_early, "history": self.history}

    def _validate(self) -> bool:
        """Rank 0 validates and keeps the best checkpoint; every rank learns whether early
        stopping triggered. True when it did."""
        stop = [False]
        if self.dist.main:
            stop[0] = self._validate_here()
        if self.dist.world > 1:
            dist.broadcast_object_list(stop, src=0)
        return stop[0]

    def _validate_here(self) -> bool:
        t0 = time.perf_counter()
        metrics = validate(self.shipped_model(), self.val, self.cfg.stress)
        metrics.update(step=self.step, seconds=round(time.perf_counter() - t0, 1))
        self.history.append(metrics)
        with open(self.out / "val.jsonl", "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        # every validated weight set is kept: a later rule (evaluate's stain stress) may choose
        self.save(f"snaps/step{self.step:06d}.pt", metrics, with_state=False)
        score = metrics["pq"] if not self.cfg.stress else (metrics["pq"] + metrics["stress_pq"]) / 2
        if score > self.best:
            self.best, self.bad_validations = score, 0
            self.save("best.pt", metrics, with_state=False)
        else:
            self.bad_validations += 1
        return self.bad_validations >= self.cfg.patience
