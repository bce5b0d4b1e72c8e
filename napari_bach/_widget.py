"""The "Segment nuclei" dock widget: collect parameters, run a worker, show layers.

All computation lives in the Qt-free core; this module only wires it to napari.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSlider, FloatSpinBox, Label, ProgressBar,
                              PushButton, create_widget)
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info

from .checkpoint import DEFAULT_MODEL, CheckpointError, load_checkpoint, recommended_thresholds
from .config import ModelConfig
from .detections import Detections
from .imageio import BACH_MPP, to_rgb_uint8
from .layers import ROLE_KEY, result_layers
from .measure import hematoxylin, measure_nuclei
from .predict import available_devices, iter_predict

if TYPE_CHECKING:
    import napari

DEFAULT_CHOICE = "Default (shipped)"
FILE_CHOICE = "Checkpoint file…"


class ModelPicker(Container):
    """The shipped default model or a checkpoint file; shared by the plugin's widgets."""

    def __init__(self) -> None:
        self.choice = ComboBox(label="Model", choices=[DEFAULT_CHOICE, FILE_CHOICE], value=DEFAULT_CHOICE)
        self.file = FileEdit(label="Checkpoint", filter="*.pt", visible=False)
        super().__init__(widgets=[self.choice, self.file], labels=True)
        self.margins = (0, 0, 0, 0)
        self.choice.changed.connect(lambda v: setattr(self.file, "visible", v == FILE_CHOICE))

    def use_file(self, path) -> None:
        self.choice.value = FILE_CHOICE
        self.file.value = str(path)

    def path(self) -> Path:
        return DEFAULT_MODEL if self.choice.value == DEFAULT_CHOICE else Path(self.file.value)


class ModelCache:
    """Loaded models by (path, device): loading takes longer than a small image's run."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], tuple] = {}

    def get(self, path: Path, device: str):
        key = (str(Path(path).resolve()), device)
        if key not in self._models:
            self._models[key] = load_checkpoint(path, device)
        return self._models[key]


@thread_worker
def _segment(rgb: np.ndarray, model_path: Path, device: str, mpp: float, cache: ModelCache):
    yield "loading model"
    try:
        model, info = cache.get(model_path, device)
    except CheckpointError as exc:  # the user's input, not a bug: reported without a traceback
        return exc
    det = yield from iter_predict(rgb, model, mpp, tissue_trained=info.tissue_trained)
    yield "measuring"
    return det, info, hematoxylin(rgb)


def put_result_layer(viewer, data, kwargs: dict, layer_type: str) -> None:
    """Update the layer with the same napari-bach role and source, or add it: results are
    replaced, never stacked."""
    role = kwargs["metadata"][ROLE_KEY]
    for layer in viewer.layers:
        if (layer.metadata or {}).get(ROLE_KEY) == role:
            layer.data = data
            layer.features = kwargs["features"]
            layer.metadata = kwargs["metadata"]
            return
    getattr(viewer, f"add_{layer_type}")(data, **kwargs)


def wrap(label: Label) -> None:
    """Let a status label wrap to the dock's width and grow in height, never cut off."""
    from qtpy.QtWidgets import QSizePolicy

    label.native.setWordWrap(True)
    label.native.setMinimumWidth(1)
    label.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)


def layer_rgb(layer) -> np.ndarray:
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    return to_rgb_uint8(np.asarray(data))


def layer_mpp(layer) -> float:
    """µm/px from reader metadata, else from a non-unit scale, else BACH's 0.42."""
    mpp = (layer.metadata or {}).get("mpp")
    if mpp:
        return float(mpp)
    if not np.isclose(layer.scale[-1], 1.0):
        return float(layer.scale[-1])
    return BACH_MPP


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


class SegmentWidget(Container):
    """Mask R-CNN nuclei + tissue class for the chosen image layer."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:  # napari injects the viewer by this annotation
        super().__init__(labels=True)
        self._viewer = viewer
        cfg = ModelConfig()
        self._image = create_widget(label="Image", annotation="napari.layers.Image")
        self.model = ModelPicker()
        self._device = ComboBox(label="Device", choices=available_devices(), value="cpu")
        self._mpp = FloatSpinBox(label="µm/px", min=0.05, max=5.0, step=0.01, value=BACH_MPP)
        self._score = FloatSlider(label="Score threshold", min=cfg.candidate_score, max=1.0, step=0.01,
                                  value=cfg.default_score_threshold)
        self._nms = FloatSlider(label="NMS IoU", min=0.1, max=cfg.candidate_nms, step=0.01, value=cfg.default_nms_iou)
        self._run = PushButton(text="Segment nuclei")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self._status = Label(label="Status", value="")
        self._tissue = Label(label="Result", value="")
        self.extend([self._image, self.model, self._device, self._mpp, self._score, self._nms,
                     self._run, self._cancel, self._progress, self._status, self._tissue])
        for label in (self._status, self._tissue):
            wrap(label)
        self.worker = None
        self.result: dict | None = None
        self._closed = False
        self._cache = ModelCache()
        self.native.destroyed.connect(self._on_closed)
        self._image.changed.connect(self._on_image_changed)
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._score.changed.connect(self.refilter)
        self._nms.changed.connect(self.refilter)
        self.model.changed.connect(self._use_model_thresholds)
        self._on_image_changed(self._image.value)
        self._show_model_status()
        self._use_model_thresholds()

    # -- parameters -----------------------------------------------------------------------
    def _show_model_status(self) -> None:
        if self.model.choice.value == DEFAULT_CHOICE and not DEFAULT_MODEL.exists():
            self._status.value = "No default model is shipped in this install: choose a checkpoint file."

    def _use_model_thresholds(self, *_) -> None:
        """Start from the chosen model's own thresholds, as stardist-napari does."""
        path = self.model.path()
        thresholds = recommended_thresholds(path) if path.is_file() else None
        if thresholds is not None:
            with self._score.changed.blocked(), self._nms.changed.blocked():  # one refilter, not two
                self._score.value = thresholds[0]
                self._nms.value = min(thresholds[1], self._nms.max)
            self.refilter()

    def _on_image_changed(self, layer) -> None:
        if layer is not None:
            self._mpp.value = layer_mpp(layer)

    # -- running --------------------------------------------------------------------------
    def run(self) -> None:
        layer = self._image.value
        if layer is None:
            self._status.value = "Open an image first (File > Open, or File > Open Sample > napari-bach)."
            return
        path = self.model.path()
        if not path.is_file():
            self._status.value = f"Model file not found: {path}"
            return
        try:
            rgb = layer_rgb(layer)
        except ValueError as exc:
            show_error(f"napari-bach: {exc}")
            return
        source, placement = layer.name, {"scale": tuple(layer.scale[-2:]), "units": tuple(layer.units[-2:])}
        known = (layer.metadata or {}).get("tissue_class")
        mpp = float(self._mpp.value)
        self.worker = _segment(rgb, path, self._device.value, mpp, self._cache, _start_thread=False,
                               _connect={"errored": self._on_error})
        self.worker.yielded.connect(self._on_progress)
        self.worker.returned.connect(lambda out: self._on_done(out, source, placement, known, mpp))
        self.worker.aborted.connect(self._on_aborted)
        self.worker.finished.connect(self._on_finished)
        self._run.enabled, self._cancel.enabled = False, True
        self._progress.value = 0
        self._status.value = "Starting…"
        self.worker.start()

    def cancel(self) -> None:
        if self.worker is not None:
            self._status.value = "Cancelling after the current tile…"
            self.worker.quit()

    def _on_closed(self, *_) -> None:
        """The viewer (and this dock) went away: stop the run, ignore its late signals."""
        self._closed = True
        if self.worker is not None:
            self.worker.quit()

    def _on_progress(self, step) -> None:
        if self._closed:
            return
        if isinstance(step, str):
            self._status.value = step.capitalize() + "…"
            return
        self._progress.max = max(step.total, 1)
        self._progress.value = step.done
        self._status.value = step.message

    def _on_done(self, out, source: str, placement: dict, known: str | None, mpp: float) -> None:
        if self._closed:
            return
        if isinstance(out, Exception):
            self._on_error(out)
            return
        det, info, hema = out
        self.result = {"det": det, "info": info, "hema": hema, "source": source, "placement": placement,
                       "known": known, "mpp": mpp}
        self._tissue.value = tissue_text(det.tissue_probs, det.meta["classes"], known)
        self.refilter()
        self._status.value = self._count_text()
        if not info.nuclei_trained:
            show_info("napari-bach: this model is UNTRAINED; its masks are meaningless.")
        self._viewer.scale_bar.visible = True

    def _on_error(self, exc: Exception) -> None:
        if self._closed:
            return
        self._status.value = f"Failed: {exc}"
        show_error(f"napari-bach: {exc}")

    def _on_aborted(self) -> None:
        if self._closed:
            return
        self._status.value = "Cancelled; earlier results are kept."

    def _on_finished(self) -> None:
        self.worker = None
        if not self._closed:
            self._run.enabled, self._cancel.enabled = True, False

    # -- results --------------------------------------------------------------------------
    def refilter(self, *_) -> None:
        """Re-apply score threshold and NMS to the cached candidates (no network)."""
        if self.result is None:
            return
        r = self.result
        det: Detections = r["det"]
        seg = det.refilter(float(self._score.value), float(self._nms.value))
        features = measure_nuclei(seg, r["hema"], r["mpp"])
        classes = det.meta["classes"]
        meta = {
            "tissue_probs": None if det.tissue_probs is None else dict(zip(classes, map(float, det.tissue_probs))),
            "tissue_class_from_file": r["known"], "model": r["info"].status, "model_name": r["info"].name,
            "score_threshold": float(self._score.value), "nms_iou": float(self._nms.value), "image_mpp": r["mpp"],
        }
        for data, kwargs, layer_type in result_layers(seg, r["source"], r["placement"], features, meta):
            put_result_layer(self._viewer, data, kwargs, layer_type)
        r["count"] = len(seg.ids)
        if self.worker is None:
            self._status.value = self._count_text()

    def _count_text(self) -> str:
        model_lines = self.result["info"].status.replace(", ", "\n")
        return f"{self.result['count']} nuclei\n{model_lines}"

