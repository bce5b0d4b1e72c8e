"""Benchmark: stream a pyramidal slide through the shipped model.

Writes a tiled, JPEG-compressed pyramidal TIFF (tissue in an ellipse, glass around it) of
each size, segments all its tissue with ``iter_segment_slide`` in a fresh process, and
prints tissue area, time, throughput in mm² of tissue per second, nuclei and peak RSS.
Peak RSS should not grow with the slide.

The tissue is real when ``../shared/data/bach-wsi-crops`` is there: the BACH slide crops
at their 0.467 µm/px (20000² holds 41 mm² of tissue); otherwise synthetic H&E at 0.25 µm/px.

    python bench/slide.py                        # 10000² and 20000² (BACH tissue) on the CPU
    python bench/slide.py --baseline HEAD~3      # and the same slides with REV's code and model
    python bench/slide.py --tissue synthetic --sizes 6000 12000
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


BACH_CROPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bach-wsi-crops"
BACH_MPP = 0.467
TISSUE_MPP = {"bach": BACH_MPP, "synthetic": 0.25}  # µm/px of each kind of benchmark slide


def write_slide(path: Path, size: int, tissue: str) -> None:
    """The benchmark slide (written once per size and tissue, by this working tree's code)
    at ``TISSUE_MPP[tissue]``."""
    from napari_bach.imageio import read_image
    from napari_bach.synthetic import write_synthetic_slide

    if tissue == "bach":
        crops = [read_image(p).rgb for p in sorted(BACH_CROPS.glob("*.png"))]
        write_synthetic_slide(path, (size, size), mpp=TISSUE_MPP[tissue], patches=crops)
    else:
        write_synthetic_slide(path, (size, size), mpp=TISSUE_MPP[tissue], seed=0)


def one(path: Path, mpp: float, device: str, threads: int, block: int, workdir: Path) -> dict:
    import torch

    from napari_bach.checkpoint import DEFAULT_MODEL, load_checkpoint
    from napari_bach.predict import drain
    from napari_bach.slide import iter_segment_slide
    from napari_bach.slideio import open_slide, tissue_mask

    torch.set_num_threads(threads)
    slide = open_slide(path)
    mask, factor = tissue_mask(slide)
    tissue_mm2 = mask.sum() * (factor * mpp / 1000) ** 2
    model, info = load_checkpoint(DEFAULT_MODEL, device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(tempfile.mkdtemp(prefix="out_", dir=workdir))
    t = time.perf_counter()
    result = drain(iter_segment_slide(slide, model, out, block_size=block, model_name=info.name))
    seconds = time.perf_counter() - t
    return {"slide": path.name, "mpp": mpp, "model": f"{info.name} at {model.config.mpp:g} um/px",
            "device": device, "block": block,
            "tissue_mm2": round(float(tissue_mm2), 2), "blocks": result.blocks, "blocks_without_tissue": result.skipped,
            "seconds": round(seconds, 1), "mm2_per_s": round(float(tissue_mm2) / seconds, 3), "nuclei": result.nuclei,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_segmenting_mb": round(rss_before), "slide_file_mb": round(path.stat().st_size / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="slide sides in pixels (default 10000 20000 for BACH tissue, 6000 12000 synthetic)")
    parser.add_argument("--tissue", choices=["bach", "synthetic"], default="bach" if BACH_CROPS.is_dir() else "synthetic")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also segment the same slides with commit REV's code and shipped model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--workdir", default=None, help="where slides and outputs go (default: a temporary folder)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--mpp", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.one), args.mpp, args.device, args.threads, args.block, Path(args.workdir))))
        return
    if args.tissue == "bach" and not BACH_CROPS.is_dir():
        parser.error(f"--tissue bach needs {BACH_CROPS}")
    sizes = args.sizes or ([10000, 20000] if args.tissue == "bach" else [6000, 12000])
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        slides = []
        for size in sizes:
            path = workdir / f"{args.tissue}_{size}.tif"
            if not path.exists():
                write_slide(path, size, args.tissue)
            slides.append((path, TISSUE_MPP[args.tissue]))
        for path, mpp in slides:
            cmd = ["--one", str(path), "--mpp", str(mpp), "--device", args.device, "--threads", str(args.threads),
                   "--block", str(args.block), "--workdir", str(workdir)]
            out = subprocess.run([sys.executable, __file__, *cmd], check=True, capture_output=True, text=True)
            print(json.dumps({**json.loads(out.stdout.splitlines()[-1]), "rev": "working tree"}), flush=True)
            if args.baseline:
                from baseline import run_baseline

                for result in run_baseline(args.baseline, __file__, cmd):
                    print(result if isinstance(result, str) else json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
