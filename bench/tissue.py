"""Benchmark: what the tissue class costs on top of the nuclei (issue 27: ≤ 1 s for a
BACH-size image, a slide's map ≤ 10% of its segmentation).

A BACH-size image: a real BACH field (``../shared/data/bach-partA-train``) resized to the
2048 × 1536 px at 0.42 µm/px of users' files, else synthetic H&E. The tissue class
(``tissue_map``, one field) and the nuclei (``predict``) are timed in this process, each
the median of three runs after one warm-up. The slide: bench/slide.py's pyramidal slide of
real BACH slide-crop tissue; its map (``iter_slide_tissue_map``) and optionally its
segmentation (``--segment``, minutes) are timed.

    python bench/tissue.py                    # BACH image and a 10000² slide, 2 threads
    python bench/tissue.py --segment          # and the slide's nuclei, for the ratio
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from slide import BACH_CROPS, TISSUE_MPP, write_slide  # noqa: E402

BACH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bach-partA-train"


def bach_size_image() -> tuple[np.ndarray, str]:
    from PIL import Image

    files = sorted(BACH.glob("InSitu/*.jpg"))
    if files:
        with Image.open(files[0]) as im:
            return np.asarray(im.convert("RGB").resize((2048, 1536), Image.BILINEAR)), f"{files[0].name} at 2048×1536"
    from napari_bach.synthetic import synthetic_he

    return synthetic_he((1536, 2048), mpp=0.42)[0], "synthetic 2048×1536"


def timed(fn, runs: int = 3) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=10000, help="slide side in pixels")
    parser.add_argument("--segment", action="store_true", help="also time the slide's nucleus segmentation")
    args = parser.parse_args()
    import torch

    from napari_bach.checkpoint import DEFAULT_MODEL, load_checkpoint
    from napari_bach.predict import drain, predict
    from napari_bach.slide import iter_segment_slide
    from napari_bach.slideio import open_slide
    from napari_bach.tissue import DEFAULT_TISSUE_MODEL, iter_slide_tissue_map, load_tissue_model, tissue_map

    torch.set_num_threads(args.threads)
    net, info = load_tissue_model(DEFAULT_TISSUE_MODEL)
    model, _ = load_checkpoint(DEFAULT_MODEL)
    rgb, name = bach_size_image()
    out = {"threads": args.threads, "tissue_model": info.name, "image": name,
           "tissue_class_s": round(timed(lambda: tissue_map(rgb, 0.42, net)), 3),
           "nuclei_s": round(timed(lambda: predict(rgb, model, 0.42), runs=1), 2)}
    tissue = "bach" if BACH_CROPS.is_dir() else "synthetic"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"slide_{args.size}.tif"
        write_slide(path, args.size, tissue)
        slide = open_slide(path)
        t = time.perf_counter()
        tmap = drain(iter_slide_tissue_map(slide, net))
        out.update(slide=f"{args.size}² {tissue} tissue at {TISSUE_MPP[tissue]} µm/px", slide_fields=len(tmap.windows),
                   slide_fields_with_tissue=int((tmap.tissue > 0.02).sum()),
                   slide_map_s=round(time.perf_counter() - t, 2))
        if args.segment:
            t = time.perf_counter()
            drain(iter_segment_slide(slide, model, Path(tmp) / "out"))
            out["slide_nuclei_s"] = round(time.perf_counter() - t, 1)
            out["map_share_of_segmentation"] = round(out["slide_map_s"] / out["slide_nuclei_s"], 3)
        slide.close()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
