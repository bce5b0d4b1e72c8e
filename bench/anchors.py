"""Benchmark: *RPN anchors* on a whole BACH-size view — memory and how soon Cancel is heard.

A 2048×1536 image at 0.42 µm/px, every FPN level, five anchor sizes on each, labelled
against ~3000 nuclei (the trial that took napari past 19 GB and ignored Cancel for 151 s).
Prints the peak resident memory, the longest gap between two progress yields (a napari
worker can only stop at a yield) and the region actually shown.

    python bench/anchors.py [--nuclei 3000] [--threads 2]
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch


def main() -> None:
    from napari_bach.anchors import make_generator
    from napari_bach.config import ModelConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nuclei", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [2030, 1520], (args.nuclei, 2))
    gt = np.concatenate([xy, xy + rng.uniform(8, 30, (args.nuclei, 2))], 1).astype(np.float32)  # 3–13 µm nuclei
    five = ((8, 11, 16, 23, 32), (16, 23, 32, 45, 64), (32, 45, 64, 91, 128), (64, 91, 128, 181, 256),
            (128, 181, 256, 362, 512))
    for name, sizes in (("the model's own sizes", ModelConfig().anchor_sizes), ("five sizes per level", five)):
        print(f"-- {name}")
        run(make_generator(sizes, (0.5, 1.0, 2.0)), gt)


def run(gen, gt) -> None:
    from napari_bach.anchors import MAX_ANCHORS, iter_anchors_in_region

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    steps = iter_anchors_in_region(gen, (1536, 2048), 0.42 / 0.3, (0, 0, 2048, 1536), [0, 1, 2, 3, 4], gt)
    t0 = last = time.perf_counter()
    gaps = []
    while True:
        try:
            next(steps)
        except StopIteration as end:
            view = end.value
            break
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    gaps.append(time.perf_counter() - last)
    total = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    x0, y0, x1, y1 = view.region
    print(f"{view.total:,} anchors labelled in the region shown ({x1 - x0:.0f} × {y1 - y0:.0f} px of 2048 × 1536, "
          f"shrunk: {view.shrunk}, cap {MAX_ANCHORS:,}); {view.counts}")
    print(f"time {total:.1f} s in {len(gaps)} steps; longest gap between progress yields {max(gaps):.2f} s")
    print(f"peak RSS {rss:.0f} MB (before: {rss0:.0f} MB)")


if __name__ == "__main__":
    main()
