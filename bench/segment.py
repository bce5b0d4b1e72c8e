"""Benchmark: whole-image segmentation on CPU for a BACH-sized image (2048×1536, 0.42 µm/px).

Prints, per model: segment time as Segment nuclei runs it (candidates from 0.15 below the
model's threshold, for the sliders; the first run in a fresh process, which also builds
the CPU kernels, and the next) and as the CLI/slides run it (masks only for nuclei kept),
peak RSS, candidates, and refilter latency (median of 20) for the model's own candidates
and for exactly 2000 candidates, and the headless time as if the file were untagged (µm/px
unknown: the scale is estimated from the nuclei first). Each model runs in its own process
so peak RSS is its own.

    python bench/segment.py                          # shipped default and an R50 with paper heads
    python bench/segment.py --image bach             # real tissue: a mosaic of ../shared's BACH crops
    python bench/segment.py --image x.tif            # any image
    python bench/segment.py --models default old.pt  # checkpoint files side by side, same run
    python bench/segment.py --image bach --models default --baseline HEAD~3  # REV's code and model too
    python bench/segment.py --image bach --models default --profile  # + seconds per part of the network

``--image bach`` tiles the real BACH slide crops of ``../shared/data/bach-wsi-crops``
(0.467 µm/px), rescaled to BACH's 0.42 µm/px, into one 2048×1536 image (nothing is
written to disk); without ``../shared`` it falls back to the synthetic image.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


PARTS = ("backbone.body", "backbone.fpn", "rpn.head", "rpn", "roi_heads.box_roi_pool", "roi_heads.box_head",
         "roi_heads.mask_roi_pool", "roi_heads.mask_head", "roi_heads.mask_predictor", "roi_heads")


def profile(rgb, net, mpp: float, score_floor: float) -> dict:
    """One more headless run with forward hooks: seconds in each part of the network (``rpn``
    and ``roi_heads`` include their parts) and how many RoIs the mask branch saw."""
    from collections import defaultdict

    from napari_bach.model import for_inference
    from napari_bach.predict import predict

    model = for_inference(net)
    seconds, rois, handles = defaultdict(float), [0], []
    for name in PARTS:
        module = model.get_submodule(name)

        def pre(mod, args):
            mod._t0 = time.perf_counter()

        def post(mod, args, out, name=name):
            seconds[name] += time.perf_counter() - mod._t0

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    handles.append(model.roi_heads.mask_head.register_forward_hook(
        lambda mod, args, out: rois.__setitem__(0, rois[0] + args[0].shape[0])))
    t0 = time.perf_counter()
    predict(rgb, net, mpp, score_floor=score_floor)
    total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    return {"profile_total_s": round(total, 2), "profile_s": {k: round(v, 2) for k, v in seconds.items()},
            "mask_rois": rois[0]}


def one(model: str, image: str | None, threads: int, with_profile: bool = False) -> dict:
    import torch

    from napari_bach.checkpoint import DEFAULT_MODEL, load_checkpoint
    from napari_bach.config import ModelConfig
    from napari_bach.imageio import read_image
    from napari_bach.model import build_model
    from napari_bach.predict import predict
    from napari_bach.synthetic import synthetic_he

    torch.set_num_threads(threads)
    if image == "bach" and BACH_CROPS.is_dir():
        rgb, mpp, image = bach_mosaic(), 0.42, "BACH slide crops, 2048x1536 mosaic at 0.42 um/px"
    elif image and image != "bach":
        data = read_image(image)
        rgb, mpp = data.rgb, data.mpp or 0.42
    else:
        rgb, mpp, image = synthetic_he((1536, 2048), mpp=0.42, seed=0)[0], 0.42, None
    if model == "default" or model.endswith(".pt"):
        net, info = load_checkpoint(DEFAULT_MODEL if model == "default" else model)
        label = f"{model}: {net.config.backbone} at {net.config.mpp:g} um/px ({info.status})"
    else:
        torch.manual_seed(0)
        net = build_model(ModelConfig.preset(model)).eval()
        label = f"{model} paper heads, untrained weights (worst case: every tile fills its candidate cap)"
    from napari_bach.config import CANDIDATE_MARGIN

    cfg = net.config
    tiles = []
    runs = []
    for _ in range(2):  # the first run in a process also builds oneDNN's kernels for each new shape
        t0 = time.perf_counter()  # what Segment nuclei runs: candidates from a margin below the threshold
        det = predict(rgb, net, mpp, progress=lambda step: tiles.append(step.total),
                      score_floor=cfg.default_score_threshold - CANDIDATE_MARGIN)
        runs.append(time.perf_counter() - t0)
    first, seconds = runs
    t0 = time.perf_counter()  # what the CLI and slides run: masks only for kept nuclei
    headless = predict(rgb, net, mpp, score_floor=cfg.default_score_threshold)
    headless_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # the same as an untagged file: µm/px unknown (the scale estimated first)
    untagged = predict(rgb, net, None, score_floor=cfg.default_score_threshold)
    untagged_s = time.perf_counter() - t0

    def latency(d) -> float:
        runs = []
        for _ in range(20):
            t = time.perf_counter()
            d.refilter(cfg.default_score_threshold, cfg.default_nms_iou)
            runs.append(time.perf_counter() - t)
        return statistics.median(runs) * 1000

    mm2 = rgb.shape[0] * rgb.shape[1] * mpp**2 / 1e6
    out = {"model": label, "image": image or "synthetic H&E 2048x1536", "tiles": tiles[-1], "mm2": round(mm2, 3),
           "first_segment_s": round(first, 1), "segment_s": round(seconds, 1), "headless_s": round(headless_s, 1),
           "headless_mm2_per_s": round(mm2 / headless_s, 3), "candidates": len(det),
           "headless_candidates": len(headless), "untagged_s": round(untagged_s, 1),
           "untagged_scale_estimate": getattr(untagged, "scale_estimate", None),
           "nuclei_at_defaults": len(det.refilter(cfg.default_score_threshold, cfg.default_nms_iou).ids),
           "refilter_ms": round(latency(det), 1)}
    if len(det) >= 2000:
        idx = np.argsort(-det.scores)[:2000]
        from napari_bach.detections import Detections

        sub = Detections(det.image_shape, det.boxes[idx], det.scores[idx], det.offsets[idx],
                         [det.crops[i] for i in idx], candidate_nms=det.candidate_nms)
        out["refilter_2000_ms"] = round(latency(sub), 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if with_profile:
        out.update(profile(rgb, net, mpp, cfg.default_score_threshold))
    return out


BACH_CROPS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bach-wsi-crops"


def bach_mosaic(shape: tuple[int, int] = (1536, 2048), source_mpp: float = 0.467, mpp: float = 0.42) -> np.ndarray:
    """Real BACH tissue at BACH's scale: the slide crops, rescaled, tiled row by row."""
    from skimage.transform import rescale

    from napari_bach.imageio import read_image

    crops = [rescale(read_image(p).rgb, source_mpp / mpp, order=1, channel_axis=-1, preserve_range=True)
             .astype(np.uint8) for p in sorted(BACH_CROPS.glob("*.png"))]
    out = np.full((*shape, 3), 255, np.uint8)
    y = x = k = 0
    size = crops[0].shape[0]
    while y < shape[0]:
        crop = crops[k % len(crops)]
        h, w = min(size, shape[0] - y), min(size, shape[1] - x)
        out[y:y + h, x:x + w] = crop[:h, :w]
        k += 1
        x += size
        if x >= shape[1]:
            x, y = 0, y + size
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["default", "resnet50"])
    parser.add_argument("--image", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run this benchmark as commit REV had it (its code, its shipped model)")
    parser.add_argument("--profile", action="store_true",
                        help="also time each part of the network in one more headless run (forward hooks)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.image, args.threads, args.profile)))
        return
    shared = ["--threads", str(args.threads)] + (["--image", args.image] if args.image else [])
    for model in args.models:
        cmd = [sys.executable, __file__, "--one", model, *shared, *(["--profile"] if args.profile else [])]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(json.dumps({**result, "rev": "working tree"}), flush=True)
    if args.baseline:
        from baseline import run_baseline

        for result in run_baseline(args.baseline, __file__, ["--models", *args.models, *shared]):
            print(result if isinstance(result, str) else json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
