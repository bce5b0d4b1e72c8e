"""Benchmark: training throughput, in crops/s and s/step, on the CPU and (when present) CUDA.

Uses MoNuSeg from ../shared/data when present, synthetic H&E otherwise. Each step is data
(augmentation, in --workers loader processes or here), forward, backward and optimizer.

    python bench/train_step.py [--steps 20] [--backbone resnet18] [--crop 384]
    python bench/train_step.py --device cuda --backbone resnet50 --batch-size 16 --workers 12
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from napari_bach.config import ModelConfig
from napari_bach.synthetic import synthetic_he
from src_train.datasets import Sample, load_monuseg
from src_train.train import Trainer, TrainConfig

MONUSEG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "monuseg-train"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--crop", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None, help="cpu, cuda (default: every one present)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if MONUSEG.exists():
        samples, source = load_monuseg(MONUSEG)[:6], "MoNuSeg"
    else:
        samples = [Sample(*synthetic_he((600, 600), mpp=0.4, seed=i), mpp=0.4) for i in range(4)]
        source = "synthetic"
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        cfg = TrainConfig(out=tempfile.mkdtemp(), max_steps=args.steps + 3, checkpoint_every=10**9, val_every=10**9,
                          device=device, batch_size=args.batch_size, workers=args.workers)
        cfg.augment.crop = args.crop
        trainer = Trainer(ModelConfig.preset(args.backbone), cfg, samples, [])
        times = []
        for i in range(args.steps + 3):
            t0 = time.perf_counter()
            trainer.train_step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= 3:  # the first steps warm up allocators (and start the workers)
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        print(f"{device}: {args.backbone}, batch {cfg.batch_size}×{args.crop}², {source} data, {args.threads} threads, "
              f"{args.workers} workers: median {step:.2f} s/step, {cfg.batch_size / step:.1f} crops/s "
              f"(mean {statistics.mean(times):.2f} s; data + forward + backward + step, {args.steps} steps)", flush=True)


if __name__ == "__main__":
    main()
