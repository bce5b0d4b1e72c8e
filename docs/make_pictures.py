"""Regenerate README's pictures from a real napari window (needs an X server).

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/make_pictures.py [IMAGE] [--model PATH] [--out DIR]

Writes screenshot.png (Segment nuclei), anchors.png (RPN anchors & proposals),
figure.png ("Save figure"), report.png (page 1 of "Save report", via pdftoppm) and
slide.png (Segment slide on a synthetic pyramidal slide, a region streamed to disk).
Without IMAGE it uses the built-in synthetic sample, so nothing third-party is committed.
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
    parser.add_argument("--out", default=str(Path(__file__).parent))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

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
