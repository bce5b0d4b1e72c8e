"""Benchmark: stream a synthetic pyramidal slide through the shipped model.

Writes a tiled, JPEG-compressed pyramidal TIFF (0.25 µm/px, tissue in an ellipse, glass
around it) of each size, segments all its tissue with ``iter_segment_slide`` in a fresh
process, and prints tissue area, time, throughput in mm² of tissue per second, nuclei and
peak RSS. Peak RSS should not grow with the slide.

    python bench/slide.py                        # 6000² and 12000² on the CPU
    python bench/slide.py --sizes 20000 --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(size: int, device: str, threads: int, block: int, workdir: Path) -> dict:
    import torch

    from napari_bach.checkpoint import DEFAULT_MODEL, load_checkpoint
    from napari_bach.predict import drain
    from napari_bach.slide import iter_segment_slide
    from napari_bach.slideio import open_slide, tissue_mask
    from napari_bach.synthetic import write_synthetic_slide

    torch.set_num_threads(threads)
    path = workdir / f"synthetic_{size}.tif"
    t = time.perf_counter()
    write_synthetic_slide(path, (size, size), mpp=0.25, seed=0)
    written = time.perf_counter() - t
    slide = open_slide(path)
    mask, factor = tissue_mask(slide)
    tissue_mm2 = mask.sum() * (factor * 0.25 / 1000) ** 2
    model, info = load_checkpoint(DEFAULT_MODEL, device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    result = drain(iter_segment_slide(slide, model, workdir / f"out_{size}", block_size=block, model_name=info.name))
    seconds = time.perf_counter() - t
    return {"slide_px": f"{size}x{size}", "mpp": 0.25, "device": device, "block": block,
            "tissue_mm2": round(float(tissue_mm2), 2), "blocks": result.blocks, "blocks_without_tissue": result.skipped,
            "seconds": round(seconds, 1), "mm2_per_s": round(float(tissue_mm2) / seconds, 3), "nuclei": result.nuclei,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_segmenting_mb": round(rss_before), "slide_file_mb": round(path.stat().st_size / 2**20, 1),
            "write_slide_s": round(written, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[6000, 12000])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--workdir", default=None, help="where slides and outputs go (default: a temporary folder)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.device, args.threads, args.block, Path(args.workdir))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            cmd = [sys.executable, __file__, "--one", str(size), "--device", args.device, "--threads",
                   str(args.threads), "--block", str(args.block), "--workdir", str(workdir)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            print(out, flush=True)


if __name__ == "__main__":
    main()
