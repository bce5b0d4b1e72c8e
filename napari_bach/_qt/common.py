"""What the dock widgets share: the model picker, background runs with one error path,
result layers, and reading an image layer's pixels and µm/px."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    ProgressBar,
    PushButton,
    create_widget,
)

from ..checkpoint import DEFAULT_MODEL, CheckpointError, cached_model
from ..imageio import ImageReadError, bach_class_from_path, to_rgb_uint8
from ..pixelsize import FILE_TAGS, UNKNOWN, PixelSize, file_mpp, resolve_mpp
from ..predict import available_devices
from .layers import ROLE_KEY

recent: dict[str, str] = {}  # what this session last did, for other docks' defaults (e.g. "dataset")
DEFAULT_CHOICE = "Default (shipped)"
FILE_CHOICE = "Checkpoint file…"
EXPECTED_ERRORS = (CheckpointError, ImageReadError, ValueError, OSError)  # the user's input, not a bug


class ModelPicker:
    """The shipped default model or a checkpoint file, and the device to run it on. Its rows
    go straight into the widget's own form, so their labels line up with every other row."""

    def __init__(self, device: str = "cpu") -> None:
        self.choice = ComboBox(label="Model", choices=[DEFAULT_CHOICE, FILE_CHOICE], value=DEFAULT_CHOICE)
        self.file = FileEdit(label="Checkpoint", filter="*.pt", visible=False)
        devices = available_devices()
        self.device = ComboBox(label="Device", choices=devices, value=device if device in devices else "cpu")
        self.widgets = [self.choice, self.file, self.device]
        self.choice.changed.connect(lambda v: setattr(self.file, "visible", v == FILE_CHOICE))

    def on_change(self, callback: Callable[..., None]) -> None:
        self.choice.changed.connect(callback)
        self.file.changed.connect(callback)

    def use_file(self, path) -> None:
        self.choice.value = FILE_CHOICE
        self.file.value = str(path)

    def path(self) -> Path:
        return DEFAULT_MODEL if self.choice.value == DEFAULT_CHOICE else Path(self.file.value)

    def load(self, device: str | None = None):
        """The model and its info from the shared cache (one copy per file and device)."""
        return cached_model(self.path(), device or self.device.value)


@dataclass
class Failure:
    """An expected error (bad file, wrong checkpoint, impossible setting) returned by a
    worker so it is shown as a message, not as a traceback."""

    error: Exception


def _guarded(work, *args):
    try:
        return (yield from work(*args))
    except EXPECTED_ERRORS as exc:
        return Failure(exc)


class BackgroundTask:
    """Runs a progress generator in a napari ``thread_worker``: its own progress bar, status
    line and Cancel button, the widget's ``buttons`` disabled while it runs, one path for
    every error, and a stop when the dock goes away."""

    def __init__(self, owner: Container, buttons: list[PushButton], status: str = "") -> None:
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self._status = Label(label="Status", value=status)
        wrap(self._status)
        self.widgets = (self._cancel, self._progress, self._status)
        self._buttons = buttons
        self.worker = None
        self.closed = False
        self._cancel.changed.connect(self.cancel)
        owner.native.destroyed.connect(lambda *_: self.close())  # the task, not the owner: Qt may outlive it

    def start(self, work, *args, done: Callable[[object], None],
              cancelled: Callable[[], None] | None = None) -> None:
        """Run ``work(*args)``; ``done(result)`` on success, ``cancelled()`` after Cancel
        (to put back what the dock showed before the run)."""
        from napari.qt.threading import create_worker

        worker = create_worker(_guarded, work, *args, _start_thread=False, _connect={"errored": self.fail})
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda out: self.closed or (self.fail(out.error) if isinstance(out, Failure)
                                                            else done(out)))
        worker.aborted.connect(lambda: self.closed or (self.say("Cancelled; earlier results are kept."),
                                                       cancelled and cancelled()))
        worker.finished.connect(self._on_finished)
        self.worker = worker
        for button in self._buttons:
            button.enabled = False
        self._cancel.enabled = True
        self._progress.max, self._progress.value = 1, 0
        self.say("Starting…")
        worker.start()

    def cancel(self) -> None:
        if self.worker is not None:
            self.say("Cancelling after the current step…")
            self.worker.quit()

    def close(self) -> None:
        """The dock went away: stop the run and ignore its late signals."""
        self.closed = True
        if self.worker is not None:
            self.worker.quit()

    def say(self, text: str) -> None:
        if not self.closed:
            self._status.value = text

    def fail(self, exc: Exception) -> None:
        if not self.closed:
            from napari.utils.notifications import show_error

            self.say(f"Failed: {exc}")
            if not isinstance(exc, EXPECTED_ERRORS):
                return  # napari's own notification already shows the traceback of a bug
            show_error(f"napari-bach: {exc}")

    def _on_progress(self, step) -> None:
        if self.closed:
            return
        if isinstance(step, str):
            self.say(step.capitalize() + "…")
            return
        self._progress.max = max(step.total, 1)
        self._progress.value = step.done
        self.say(step.message)

    def _on_finished(self) -> None:
        self.worker = None
        if not self.closed:
            for button in self._buttons:
                button.enabled = True
            self._cancel.enabled = False


def image_and_placement(widget):
    """The chosen image layer and the scale/units overlays need, or None after telling the
    user to open one."""
    layer = widget._image.value
    if layer is None:
        widget._status.value = "Open an image first (File > Open, or File > Open Sample > napari-bach)."
        return None, None
    return layer, {"scale": tuple(layer.scale[-2:]), "units": tuple(layer.units[-2:])}


def put_result_layer(viewer, data, kwargs: dict, layer_type: str) -> None:
    """Update the layer with the same napari-bach role and source, or add it: results are
    replaced, never stacked."""
    layer = find_result_layer(viewer, kwargs["metadata"][ROLE_KEY])
    if layer is None:
        kwargs = dict(kwargs)
        style = {k: kwargs.pop(k) for k in ("contour",) if k in kwargs}  # not add_labels arguments
        layer = getattr(viewer, f"add_{layer_type}")(data, **kwargs)
        for name, value in style.items():
            setattr(layer, name, value)
        return
    for key in ("scale", "units"):  # a re-run at another µm/px moves its results with the image
        if key in kwargs and tuple(getattr(layer, key)) != tuple(kwargs[key]):
            setattr(layer, key, kwargs[key])
    if layer.data is not data:
        layer.data = data
    layer.features = kwargs["features"]
    layer.metadata = kwargs["metadata"]


def find_result_layer(viewer, role: dict):
    for layer in viewer.layers:
        if (layer.metadata or {}).get(ROLE_KEY) == role:
            return layer
    return None


def row(*widgets, label: str = "") -> Container:
    """Widgets side by side in one form row: keeps two docks within a 1000 px screen."""
    box = Container(layout="horizontal", labels=False, widgets=widgets, label=label)
    box.margins = (0, 0, 0, 0)
    return box


def wrap(label: Label) -> None:
    """Let a status label wrap to the dock's width and grow in height, never cut off."""
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    label.native.setMinimumWidth(1)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)


MAX_IN_MEMORY_PIXELS = 60_000_000  # beyond this, a layer is segmented as a slide (streamed)


def layer_rgb(layer) -> np.ndarray:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if np.prod(data.shape[:2]) > MAX_IN_MEMORY_PIXELS:
        h, w = data.shape[:2]
        raise ValueError(f"{layer.name} is a whole slide ({w}×{h} px): use Plugins › Segment slide, which "
                         "streams it to disk, or segment a region there")
    return to_rgb_uint8(np.asarray(data))


def visible_region(viewer, layer) -> tuple[float, float, float, float]:
    """x0 y0 x1 y1 in the layer's pixels of what the canvas shows, clipped to the image."""
    h, w = np.asarray(viewer.canvas.size, float) / viewer.camera.zoom
    cy, cx = viewer.camera.center[-2:]
    (y0, x0), (y1, x1) = (layer.world_to_data((cy - h / 2, cx - w / 2))[-2:],
                          layer.world_to_data((cy + h / 2, cx + w / 2))[-2:])
    ih, iw = layer.data.shape[:2]
    return max(0.0, x0), max(0.0, y0), min(float(iw), x1), min(float(ih), y1)


WHOLE, VIEW, SHAPES = "Whole image (tissue only)", "Current view", "Boxes in a Shapes layer"


class RegionPicker:
    """Where to work: the current view, the boxes of a Shapes layer, or (optionally) the
    whole image. Its two rows go into the widget's own form, like :class:`ModelPicker`."""

    def __init__(self, whole: bool = False) -> None:
        choices = [WHOLE, VIEW, SHAPES] if whole else [VIEW, SHAPES]
        self.choice = ComboBox(label="Region", choices=choices, value=choices[0])
        self.shapes = create_widget(label="Region boxes", annotation="napari.layers.Shapes", options={"nullable": True})
        self.widgets = [self.choice, self.shapes]

    def boxes(self, viewer, layer) -> list[tuple[float, float, float, float]] | None:
        """x0 y0 x1 y1 per box in the layer's pixels; None for the whole image."""
        if self.choice.value == WHOLE:
            return None
        if self.choice.value == VIEW:
            return [visible_region(viewer, layer)]
        return shapes_regions(self.shapes.value, layer)


def shapes_regions(shapes, layer) -> list[tuple[float, float, float, float]]:
    """x0 y0 x1 y1 (the layer's pixels) of each shape's bounding box."""
    if shapes is None or len(shapes.data) == 0:
        raise ValueError("draw a box in a Shapes layer and choose it as 'Region boxes'")
    out = []
    for s in shapes.data:
        pts = np.array([layer.world_to_data(shapes.data_to_world(p))[-2:] for p in s])
        (y0, x0), (y1, x1) = pts.min(0), pts.max(0)
        out.append((x0, y0, x1, y1))
    return out


def _source_path(layer) -> Path | None:
    path = (layer.metadata or {}).get("path") or getattr(getattr(layer, "source", None), "path", None)
    return Path(path) if path else None


def layer_pixel_size(layer) -> PixelSize:
    """µm/px of an image layer, the same way whoever opened it: napari-bach's reader or
    sample (metadata), another reader (the file's own tags or BACH name), a µm layer
    scale, else unknown."""
    meta = layer.metadata or {}
    if meta.get("mpp"):
        return PixelSize(float(meta["mpp"]), meta.get("mpp_source", FILE_TAGS))
    path = _source_path(layer)
    if path is not None:
        found = resolve_mpp(tags=file_mpp(path), path=path)
        if found.known:
            return found
    if not np.isclose(layer.scale[-1], 1.0):
        return PixelSize(float(layer.scale[-1]), "layer scale")
    return PixelSize(None, UNKNOWN)


def layer_tissue_class(layer) -> str | None:
    """The BACH class a file's name or folder states, whoever opened it."""
    meta = layer.metadata or {}
    if meta.get("tissue_class"):
        return meta["tissue_class"]
    path = _source_path(layer)
    return bach_class_from_path(path) if path is not None else None


def result_pixel_size(nuclei, image) -> PixelSize:
    """The µm/px a result was made at (stored on its labels layer), else the image's."""
    meta = (nuclei.metadata or {}) if nuclei is not None else {}
    if "mpp_source" in meta:
        return PixelSize(meta.get("mpp"), meta["mpp_source"])
    return layer_pixel_size(image)


def tissue_text(probs: np.ndarray | None, classes: tuple[str, ...], known: str | None) -> str:
    if probs is None:
        text = "Tissue class: not trained\n(this model had no tissue labels)"
    else:
        best = int(np.argmax(probs))
        text = f"Tissue class: {classes[best]} ({probs[best]:.0%})\n" + " · ".join(
            f"{c} {p:.0%}" for c, p in zip(classes, probs))
    if known:
        text += f"\nFile name says: {known}"
    return text


def check_output_file(path: Path, suffix: str) -> Path:
    """A file to save into: the right suffix and an existing folder (ValueError otherwise)."""
    if not path.name or path.suffix.lower() != suffix:
        raise ValueError(f"choose a {suffix} file")
    if not path.parent.is_dir():
        raise ValueError(f"folder {path.parent} does not exist")
    return path


def scrolling(container: Container) -> None:
    """Put a dock's rows in a scroll area inside its own widget: with several docks open
    each shrinks and scrolls instead of growing the window past the screen. (magicgui's
    ``scrollable=True`` cannot: napari docks ``.native``, the widget inside that scroll
    area.) The rows' layout moves as it is, so the container still adds and removes rows."""
    from qtpy.QtCore import QSize, Qt, QTimer
    from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget

    class Area(QScrollArea):
        def showEvent(self, event) -> None:  # once the dock is placed: share the area's height
            super().showEvent(event)
            QTimer.singleShot(0, lambda: _share_height(outer))

        def sizeHint(self) -> QSize:  # as tall as the rows when there is room
            hint = self.widget().sizeHint()
            return QSize(hint.width() + self.verticalScrollBar().sizeHint().width(), hint.height() + 2)

        def minimumSizeHint(self) -> QSize:  # never narrower than the rows, however short
            width = self.widget().minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
            return QSize(width, min(120, self.widget().minimumSizeHint().height()))

    outer = container.native
    rows = outer.layout()
    inner = QWidget()
    inner.setLayout(rows)  # takes the layout and reparents its widgets
    rows.addStretch(1)  # spare height below the rows, not between them
    area = Area()
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.Shape.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    area.setWidget(inner)
    layout = QVBoxLayout(outer)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(area)


def _share_height(widget) -> None:
    """The docks beside ``widget``'s in its window area, each as tall as its rows when they
    fit, scaled down together when not (Qt leaves a newly added dock at its minimum)."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QDockWidget, QMainWindow

    dock = widget.parent()
    window = dock.parent() if isinstance(dock, QDockWidget) else None
    if not isinstance(window, QMainWindow) or dock.isFloating():
        return
    area = window.dockWidgetArea(dock)
    docks = [d for d in window.findChildren(QDockWidget)
             if d.isVisible() and not d.isFloating() and window.dockWidgetArea(d) == area]
    window.resizeDocks(docks, [d.sizeHint().height() for d in docks], Qt.Orientation.Vertical)
