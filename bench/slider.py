"""Benchmark: how long one score-slider step blocks napari, on a BACH-sized image.

A 2048×1536 image (0.42 µm/px) with about 1,500 nuclei shown and twice as many cached
candidates goes into a real Segment nuclei widget in a real viewer; then the score slider
steps up and down. Prints per-step latency (median and 90th percentile) of the whole step
as napari runs it (widget + repaint), of the widget's part (re-filter + labels layer
update), of the re-filter alone (the widget's, which pastes only the nuclei that change,
and from scratch), and of the deferred table/boxes update that runs once the
slider rests. Under Xvfb the repaint is software OpenGL; on a desktop GPU it is far less.

    xvfb-run -a python bench/slider.py          # needs an X server (napari's canvas)
    xvfb-run -a python bench/slider.py --filled # filled labels instead of the default outlines
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np


def candidates(seed: int = 0):
    """Detections built from the synthetic image's true nuclei (no network): each nucleus
    once with a high score and once, shifted, with a low one, as a detector proposes."""
    from scipy import ndimage

    from napari_bach.detections import Detections
    from napari_bach.pixelsize import PixelSize
    from napari_bach.synthetic import synthetic_he

    rgb, labels = synthetic_he((1536, 2048), mpp=0.42, seed=seed, nuclei_per_mm2=2700)
    rng = np.random.default_rng(seed)
    boxes, scores, offsets, crops = [], [], [], []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        crop = labels[sl] == i
        for shift, score in ((0, rng.uniform(0.4, 1.0)), (2, rng.uniform(0.05, 0.4))):
            y0, x0 = sl[0].start + shift, sl[1].start + shift
            h, w = min(crop.shape[0], labels.shape[0] - y0), min(crop.shape[1], labels.shape[1] - x0)
            boxes.append((x0, y0, x0 + w, y0 + h))
            scores.append(score)
            offsets.append((y0, x0))
            crops.append(crop[:h, :w])
    det = Detections(labels.shape, np.array(boxes, np.float32), np.array(scores, np.float32), np.array(offsets),
                     crops, candidate_nms=0.7, pixel_size=PixelSize(0.42, "BACH file name"))
    return rgb, det


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filled", action="store_true", help="filled labels (default: outlines, as the widget)")
    args = parser.parse_args()
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_bach import model  # noqa: F401  torch before the canvas (see napari_bach/__init__.py)
    from napari_bach._qt.segment_widget import SegmentWidget
    from napari_bach.checkpoint import ModelInfo
    from napari_bach.measure import hematoxylin

    rgb, det = candidates()
    viewer = napari.Viewer()
    layer = viewer.add_image(rgb, name="bach", rgb=True, scale=(0.42, 0.42), metadata={"mpp": 0.42})
    w = SegmentWidget(viewer)
    viewer.window.add_dock_widget(w)
    w._score.value = 0.5
    w._outlines.value = not args.filled
    w._on_done((det, ModelInfo(name="bench", nuclei_trained=True, steps=1), hematoxylin(rgb), 0.4), layer,
               "bach", {"scale": (0.42, 0.42), "units": ("um", "um")}, None)
    QApplication.processEvents()
    from napari_bach.detections import LiveLabels

    live = LiveLabels(det)
    steps, handler, refilter, fresh, rest = [], [], [], [], []
    values = [round(v, 2) for v in np.r_[np.arange(0.50, 0.60, 0.01), np.arange(0.60, 0.40, -0.01)]]
    for v in values:
        t = time.perf_counter()
        w._score.value = v  # a slider step: the widget re-filters when Qt is idle, then napari repaints
        t_handler = time.perf_counter()
        w.refilter()  # what that idle callback runs (re-filter + labels layer update)
        handler.append(time.perf_counter() - t_handler)
        QApplication.processEvents()  # napari's repaint (software OpenGL under Xvfb)
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        live.refilter(v, w._nms.value, w.result.edits)  # the widget's re-filter alone
        refilter.append(time.perf_counter() - t)
        t = time.perf_counter()
        det.refilter(v, w._nms.value, w.result.edits)  # from scratch, as the CLI does once
        fresh.append(time.perf_counter() - t)
    for _ in range(3):
        t = time.perf_counter()
        w.measure()
        QApplication.processEvents()
        rest.append(time.perf_counter() - t)

    def ms(xs, q=0.5):
        return round(float(np.quantile(xs, q)) * 1000, 1)

    print(json.dumps({"image": "synthetic H&E 2048x1536 at 0.42 µm/px", "candidates": len(det),
                      "nuclei_shown": len(w.result.seg.ids),
                      "drawn_as": "filled labels" if args.filled else "outlines", "step_ms_median": ms(steps), "step_ms_p90": ms(steps, 0.9),
                      "widget_ms_median": ms(handler), "widget_ms_p90": ms(handler, 0.9),
                      "refilter_ms_median": ms(refilter), "fresh_refilter_ms_median": ms(fresh),
                      "deferred_table_and_boxes_ms": round(statistics.median(rest) * 1000, 1),
                      "steps": len(values)}))
    viewer.close()


if __name__ == "__main__":
    main()
