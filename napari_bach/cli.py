"""Command line: ``python -m napari_bach view|segment``.

``view`` opens napari with an image (default: the built-in sample) and the Segment nuclei
widget; ``segment`` is the headless batch mode, using the same core as the widget.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from .checkpoint import DEFAULT_MODEL
from .imageio import IMAGE_SUFFIXES, ImageReadError, read_image


def _images(inputs: list[str]) -> list[Path]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths


def segment_files(inputs: list[str], out: str | Path, model_path: str | Path = DEFAULT_MODEL, mpp: float | None = None,
                  score_threshold: float | None = None, nms_iou: float | None = None, device: str = "cpu",
                  log=print) -> Path:
    """Segment every image; write ``<stem>_labels.tif``, ``<stem>_nuclei.csv`` and ``summary.csv``."""
    import tifffile

    from .checkpoint import load_checkpoint
    from .measure import hematoxylin, measure_nuclei
    from .predict import predict
    from .report import write_nuclei_csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, info = load_checkpoint(model_path, device)
    cfg = model.config
    score = cfg.default_score_threshold if score_threshold is None else score_threshold
    nms = cfg.default_nms_iou if nms_iou is None else nms_iou
    log(f"model: {info.status}")
    classes = list(cfg.tissue_classes)
    summary_rows = []
    for path in _images(inputs):
        try:
            data = read_image(path)
        except ImageReadError as exc:
            log(f"skipped: {exc}")
            summary_rows.append({"image": str(path), "error": str(exc)})
            continue
        image_mpp = mpp or data.mpp or cfg.mpp
        det = predict(data.rgb, model, image_mpp, tissue_trained=info.tissue_trained)
        seg = det.refilter(score, nms)
        table = measure_nuclei(seg, hematoxylin(data.rgb), image_mpp)
        tifffile.imwrite(out / f"{path.stem}_labels.tif", seg.labels.astype(np.int32), compression="zlib")
        write_nuclei_csv(out / f"{path.stem}_nuclei.csv", table)
        row = {"image": str(path), "mpp": image_mpp, "nuclei": len(seg.ids), "tissue_class": "not trained"}
        if det.tissue_probs is not None:
            row["tissue_class"] = classes[int(np.argmax(det.tissue_probs))]
            row.update({f"p_{c}": round(float(p), 4) for c, p in zip(classes, det.tissue_probs)})
        summary_rows.append(row)
        log(f"{path.name}: {len(seg.ids)} nuclei, tissue class {row['tissue_class']}")
    fields = ["image", "mpp", "nuclei", "tissue_class", *[f"p_{c}" for c in classes], "error"]
    with open(out / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(summary_rows)
    return out / "summary.csv"


def view(image: str | None, segment: bool, screenshot: str | None = None) -> None:
    """Open napari with the image (or the sample) and the docked widget."""
    import napari

    from . import model  # noqa: F401  torch before napari's OpenGL canvas (see napari_bach/__init__.py)

    viewer = napari.Viewer()
    if image:
        viewer.open(image, plugin="napari-bach")
    else:
        viewer.open_sample("napari-bach", "synthetic_he")
    _, widget = viewer.window.add_plugin_dock_widget("napari-bach", "Segment nuclei")
    viewer.window._qt_window.resize(1500, 950)
    if segment or screenshot:
        widget.run()
    if screenshot:
        from qtpy.QtWidgets import QApplication

        while widget.worker is not None:
            QApplication.processEvents()
        for _ in range(5):  # let the dock re-layout its wrapped status lines
            QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False)
        viewer.close()
        return
    napari.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_bach", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("view", help="open napari with an image (default: the sample) and the widget")
    v.add_argument("image", nargs="?")
    v.add_argument("--segment", action="store_true", help="segment right away with the default model")
    v.add_argument("--screenshot", help="segment, save a window screenshot to this PNG and quit")
    s = sub.add_parser("segment", help="segment images headlessly")
    s.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    s.add_argument("--out", required=True)
    s.add_argument("--model", default=str(DEFAULT_MODEL))
    s.add_argument("--mpp", type=float, default=None, help="µm/px of the inputs (default: from the file, BACH 0.42)")
    s.add_argument("--score-threshold", type=float, default=None)
    s.add_argument("--nms-iou", type=float, default=None)
    s.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.command == "view":
        view(args.image, args.segment, args.screenshot)
        return 0
    from .checkpoint import CheckpointError

    try:
        segment_files(args.inputs, args.out, args.model, args.mpp, args.score_threshold, args.nms_iou, args.device,
                      log=lambda m: print(m, file=sys.stderr))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
