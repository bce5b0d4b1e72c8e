"""Benchmark: training throughput, in crops/s and s/step, on the CPU and (when present) CUDA.

Uses MoNuSeg from ../shared/data when present, synthetic H&E otherwise. Each step is data
(augmentation, in --workers loader processes or here), forward, backward and optimizer.

    python bench/train_step.py [--steps 20] [--backbone resnet18] [--crop 384]
    python bench/train_step.py --backbone mobilenet_v2 --mpp 0.3 --profile   # where a CPU step goes
    python bench/train_step.py --backbone mobilenet_v2 --mpp 0.3 --baseline HEAD~3   # and with REV's code
    python bench/train_step.py --device cuda --backbone resnet50 --batch-size 16 --workers 12

``--profile`` times each part of a step with forward hooks: augmentation (drawing the
batch), backbone trunk, FPN, RPN, the ROI heads' parts, and backward + optimizer (the rest).
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
    parser.add_argument("--mpp", type=float, default=None, help="working µm/px (default: the preset's)")
    parser.add_argument("--fpn-channels", type=int, default=None, help="FPN/RPN width (default: the preset's)")
    parser.add_argument("--profile", action="store_true", help="seconds per part of a step")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="then the same measurement with commit REV's napari_bach and src_train")
    args = parser.parse_args()
    run(args)
    if args.baseline:
        import sys

        from baseline import run_baseline, without_baseline

        for line in run_baseline(args.baseline, __file__, without_baseline(sys.argv[1:])):
            print(line, flush=True)


def run(args) -> None:
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
        overrides = {"mpp": args.mpp} if args.mpp else {}
        if args.fpn_channels:
            overrides["fpn_channels"] = args.fpn_channels
        trainer = Trainer(ModelConfig.preset(args.backbone, **overrides), cfg, samples, [])
        parts = _profile(trainer) if args.profile else None
        times = []
        for i in range(args.steps + 3):
            if i == 3 and parts is not None:
                parts.update(dict.fromkeys(parts, 0.0))  # warm-up steps not counted
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
        if parts is not None:
            total = sum(times)
            rest = total - sum(parts.values())
            for name, seconds in [*parts.items(), ("backward + optimizer (the rest)", rest)]:
                print(f"  {name:<34} {seconds / len(times):6.3f} s/step  {100 * seconds / total:5.1f}%")


def _profile(trainer) -> dict[str, float]:
    """Accumulate seconds spent in each part's forward (and in drawing batches)."""
    spent: dict[str, float] = {}
    m = trainer.model
    watched = {"augmentation (batch drawn)": None, "backbone trunk": m.backbone.body, "FPN": m.backbone.fpn,
               "RPN": m.rpn, "ROI box pooling": m.roi_heads.box_roi_pool, "ROI box head": m.roi_heads.box_head,
               "ROI box predictor": m.roi_heads.box_predictor, "ROI mask pooling": m.roi_heads.mask_roi_pool,
               "ROI mask head": m.roi_heads.mask_head, "ROI mask predictor": m.roi_heads.mask_predictor}
    for name, module in watched.items():
        spent[name] = 0.0
        if module is None:
            continue
        start = {}
        module.register_forward_pre_hook(lambda mod, inp, name=name: start.__setitem__(name, time.perf_counter()))
        module.register_forward_hook(lambda mod, inp, out, name=name: spent.__setitem__(
            name, spent[name] + time.perf_counter() - start[name]))
    draw = trainer._next

    def timed_next(kind):
        t = time.perf_counter()
        try:
            return draw(kind)
        finally:
            spent["augmentation (batch drawn)"] += time.perf_counter() - t
    trainer._next = timed_next
    return spent


if __name__ == "__main__":
    main()
