"""Regenerate README's pictures from a real napari window (needs an X server).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_pictures.py [IMAGE] [--model PATH] [--out DIR]

Writes screenshot.png (Segment nuclei), anchors.png (RPN anchors & proposals),
figure.png ("Save figure"), report.png (page 1 of "Save report", via pdftoppm) and
slide.png (Segment slide on a synthetic pyramidal slide, a region streamed to disk).
Without IMAGE it uses the built-in synthetic sample, so nothing third-party is committed.

    ... docs/make_pictures.py --bach CROP.png [--mpp 0.467]   # runs/pictures/bach.png: a real BACH crop
    (to look at, never to commit: BACH is CC BY-NC-ND, and nothing cut from it goes into the project)
    ... docs/make_pictures.py --finetune                       # finetune_running.png, finetune_done.png
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication, QWidget

import napari_bach.model  # noqa: F401,E402  torch before napari's OpenGL canvas (see napari_bach/__init__.py)


def _wait(widget) -> None:
    while widget.worker is not None:
        QApplication.processEvents()
    QApplication.processEvents()


def _shot(viewer, path: Path) -> None:
    """A window screenshot without napari's notification toasts over the canvas."""
    for w in viewer.window._qt_window.findChildren(QWidget):
        if type(w).__name__ == "NapariQtNotification":
            w.close()
    QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--out", default=None, help="default: docs/ (synthetic pictures), runs/pictures/ (--bach)")
    parser.add_argument("--bach", help="only bach.png: Segment nuclei on this real BACH crop")
    parser.add_argument("--mpp", type=float, default=0.467, help="µm/px of --bach (BACH slides: 0.467)")
    parser.add_argument("--finetune", action="store_true", help="only the Fine-tune on corrections pictures")
    args = parser.parse_args()
    out = Path(args.out or ("runs/pictures" if args.bach else Path(__file__).parent))
    out.mkdir(parents=True, exist_ok=True)
    if args.bach:
        return bach_picture(Path(args.bach), args.mpp, args.model, out)
    if args.finetune:
        return finetune_pictures(args.model, out)

    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1600, 1000)
    if args.image:
        viewer.open(args.image, plugin="napari-bach")
    else:
        viewer.open_sample("napari-bach", "synthetic_he")
    image = viewer.layers[0]
    _, seg = viewer.window.add_plugin_dock_widget("napari-bach", "Segment nuclei")
    if args.model:
        seg.model.use_file(args.model)
    seg.run()
    _wait(seg)
    _shot(viewer, out / "screenshot.png")

    nuclei = viewer.layers[f"{image.name} nuclei"]
    viewer.window.remove_dock_widget(viewer.window._dock_widgets["Segment nuclei (napari-bach)"])
    _, anchors = viewer.window.add_plugin_dock_widget("napari-bach", "RPN anchors & proposals")
    if args.model:
        anchors.model.use_file(args.model)
    h, w = image.data.shape[:2]
    viewer.camera.center = (image.scale[0] * h / 2, image.scale[1] * w / 2)
    viewer.camera.zoom *= 8
    anchors._nuclei.value = nuclei
    anchors._levels.value = ["P2", "P3"]
    anchors._cap.value = 150  # every positive, then a sample of the rest: readable
    anchors.show_proposals()
    _wait(anchors)
    anchors.show_anchors()
    _wait(anchors)
    viewer.layers["proposals before NMS"].visible = False
    viewer.layers[f"{image.name} boxes"].visible = False
    _shot(viewer, out / "anchors.png")
    for name in ("anchors", "proposals before NMS", "proposals after NMS"):
        viewer.layers.remove(name)
    viewer.layers[f"{image.name} boxes"].visible = True
    viewer.reset_view()

    _, curate = viewer.window.add_plugin_dock_widget("napari-bach", "Correct, export & report")
    curate._nuclei.value = nuclei
    (out / "figure.png").unlink(missing_ok=True)  # replaced on purpose (the dock would ask first)
    curate._figure.value = out / "figure.png"
    curate.save_figure()
    with tempfile.TemporaryDirectory() as tmp:
        curate._report.value = Path(tmp) / "report.pdf"
        curate.save_report()
        if shutil.which("pdftoppm"):
            subprocess.run(["pdftoppm", "-png", "-r", "70", "-singlefile", str(Path(tmp) / "report.pdf"),
                            str(out / "report")], check=True)
        print(curate._status.value)
    viewer.close()
    slide_picture(out, args.model)


def bach_picture(crop: Path, mpp: float, model: str | None, out: Path) -> None:
    """Segment nuclei on a real BACH slide crop, nuclei as outlines (the picture only)."""
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open(str(crop), plugin="napari-bach")
    _, seg = viewer.window.add_plugin_dock_widget("napari-bach", "Segment nuclei")
    if model:
        seg.model.use_file(model)
    seg._mpp.value = mpp
    seg.run()
    _wait(seg)
    image = viewer.layers[0]
    h, w = image.data.shape[:2]
    viewer.camera.center = (image.scale[0] * h * 0.45, image.scale[1] * w * 0.45)
    viewer.camera.zoom *= 2.2
    _shot(viewer, out / "bach.png")
    print(seg._status.value)
    viewer.close()


def finetune_pictures(model: str | None, out: Path) -> None:
    """Fine-tune on corrections during and after a short run on synthetic exported tiles."""
    from napari_bach._qt import finetune_widget
    from napari_bach.export import export_sample
    from napari_bach.synthetic import synthetic_he

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(3):
            rgb, labels = synthetic_he((256, 256), mpp=0.42, seed=40 + i)
            export_sample(Path(tmp) / "my-corrections", f"tile{i}", rgb, labels, 0.42, None, {})
        viewer = napari.Viewer()
        viewer.window._qt_window.resize(1600, 1000)
        viewer.open_sample("napari-bach", "synthetic_he")
        _, w = viewer.window.add_plugin_dock_widget("napari-bach", "Fine-tune on corrections")
        if model:
            w.model.use_file(model)
        w._dataset.value = str(Path(tmp) / "my-corrections")
        w._out.value = str(Path(tmp) / "models")
        finetune_widget.BUDGETS["5 min"] = 1.0
        w.run()
        while w.process is not None and "step" not in w._status.value:
            QApplication.processEvents()
        for _ in range(400):
            QApplication.processEvents()
            if w.process is None or w._progress.value >= 30:
                break
            QApplication.instance().thread().msleep(50)
        _shot(viewer, out / "finetune_running.png")
        while w.process is not None:
            QApplication.processEvents()
        QApplication.processEvents()
        _shot(viewer, out / "finetune_done.png")
        print(w._status.value, w._table.value, sep="\n")
        viewer.close()


def slide_picture(out: Path, model: str | None) -> None:
    """A synthetic 6000×8000 slide opened lazily, one region streamed to disk."""
    from napari_bach.synthetic import write_synthetic_slide

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic_slide.tif"
        write_synthetic_slide(path, (6000, 8000), mpp=0.25, seed=3)
        viewer = napari.Viewer()
        viewer.window._qt_window.resize(1600, 1000)
        viewer.open(str(path), plugin="napari-bach")
        _, widget = viewer.window.add_plugin_dock_widget("napari-bach", "Segment slide")
        if model:
            widget.model.use_file(model)
        mpp = 0.25
        box = np.array([[2600, 3400], [2600, 4600], [3500, 4600], [3500, 3400]]) * mpp
        viewer.add_shapes([box], shape_type="rectangle", name="region", edge_color="cyan", face_color="transparent",
                          edge_width=8)
        widget._region.value = "Boxes in a Shapes layer"
        widget._region_layer.value = viewer.layers["region"]
        widget._out.value = str(Path(tmp) / "out")
        widget.run()
        _wait(widget)
        viewer.camera.center = (3050 * mpp, 4000 * mpp)
        viewer.camera.zoom = 1.6
        viewer.layers.selection.active = viewer.layers[-1]
        _shot(viewer, out / "slide.png")
        print(widget._status.value)
        viewer.close()


if __name__ == "__main__":
    main()
