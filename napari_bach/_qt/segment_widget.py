"""The "Segment nuclei" dock widget: collect parameters, run a worker, show layers.

All computation lives in the Qt-free core; this module only wires it to napari.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, Container, FloatSlider, FloatSpinBox, Label, PushButton, create_widget

from ..checkpoint import DEFAULT_MODEL, CheckpointError, ModelInfo, cached_model, read_config
from ..config import CANDIDATE_MARGIN, ModelConfig, Thresholds
from ..detections import Detections, LiveLabels, Segmentation
from ..edit import Edits
from ..measure import hematoxylin, measure_nuclei
from ..pixelsize import EXPLICIT, PixelSize
from ..colour import ColourCheck, check_colours, model_input
from ..predict import iter_predict
from ..tissue import DEFAULT_TISSUE_MODEL, TissueInfo, TissueMap, classify_image
from ..scale import scale_note
from .common import (DEFAULT_CHOICE, BackgroundTask, ModelPicker, find_result_layer, image_and_placement,
                      layer_pixel_size, layer_rgb, layer_tissue_class, put_result_layer, row, scrolling, tissue_text,
                      wrap)
from .layers import OUTLINE_PX, result_layers, tissue_map_layer, write_changed_nuclei

if TYPE_CHECKING:
    import napari

MEASURE_DELAY_MS = 300  # the full table waits until the slider rests

AREA_UM2, AREA_PX = "Min area µm²", "Min area px"


def _segment(rgb: np.ndarray, model_path: Path, device: str, pixel_size: PixelSize, tta: bool, floor: float,
             tissue_path: Path | None = DEFAULT_TISSUE_MODEL, gray_pass: bool = True):
    yield "loading model"
    model, info = cached_model(model_path, device)
    colours = check_colours(rgb)
    pixels, grayed = model_input(rgb, colours, gray_pass)  # unfamiliar colours: segmented as grayscale
    det = yield from iter_predict(pixels, model, pixel_size, tissue_trained=info.tissue_trained, tta=tta,
                                  score_floor=floor)
    yield "tissue class and colour check"
    mpp = pixel_size.mpp or det.segmented_mpp or model.config.mpp
    tissue = classify_image(rgb, mpp, tissue_path) if tissue_path else None
    if tissue is not None:  # the separate classifier speaks for the image's class
        det.tissue_probs, det.classes = tissue[0].image_probs(), tissue[0].classes
    if grayed:
        from dataclasses import replace

        colours = replace(colours, warning=colours.warning + "; segmented as a grayscale copy")
    yield "measuring"
    return det, info, hematoxylin(rgb), model.config.mpp, tissue, colours


@dataclass
class Result:
    """One run's cached candidates and everything the layers are rebuilt from."""

    det: Detections
    info: ModelInfo
    hema: np.ndarray
    model_mpp: float
    source: str
    placement: dict
    known: str | None
    edits: Edits
    tissue: tuple[TissueMap, TissueInfo] | None = None  # the tissue classifier's map, when one is installed
    colours: ColourCheck | None = None
    shown: np.ndarray | None = None  # the labels last put in the layer: edits are the difference
    seg: Segmentation | None = None
    live: LiveLabels = field(init=False)  # the sliders' re-filter: only nuclei that change are pasted

    def __post_init__(self) -> None:
        self.live = LiveLabels(self.det)


class SegmentWidget(Container):
    """Mask R-CNN nuclei + tissue class for the chosen image layer."""

    tissue_model: Path | None = DEFAULT_TISSUE_MODEL  # the tissue classifier (None: no tissue class)

    def __init__(self, viewer: napari.viewer.Viewer) -> None:  # napari injects the viewer by this annotation
        super().__init__(labels=True)
        self._viewer = viewer
        cfg = ModelConfig()
        self._image = create_widget(label="Image", annotation="napari.layers.Image")
        self.model = ModelPicker()
        self._tta = CheckBox(text="flip TTA (4× slower)", value=False)
        self._gray = CheckBox(text="grayscale pass for unfamiliar colours", value=True,
                              tooltip="an image whose stain colours are unlike the training images' is segmented "
                                      "as a grayscale copy (measured better on such images)")
        # 0 shows as "unknown": sizes then stay in pixels rather than use a guessed µm/px.
        self._mpp = FloatSpinBox(label="µm/px", min=0.0, max=100.0, step=0.0001, value=0.0)
        self._mpp.native.setDecimals(4)
        self._mpp.native.setSpecialValueText("unknown")
        self._score = FloatSlider(label="Score threshold", min=cfg.candidate_score, max=1.0, step=0.01,
                                  value=cfg.default_score_threshold)
        self._nms = FloatSlider(label="NMS IoU", min=0.1, max=cfg.candidate_nms, step=0.01, value=cfg.default_nms_iou)
        # µm² when the result's µm/px is known, else pixels (the label says which)
        self._min_area = FloatSpinBox(label=AREA_UM2, min=0.0, max=1000.0, step=0.5, value=cfg.default_min_area,
                                      tooltip="smaller objects are fragments, not nuclei (the model's default)")
        self._outlines = CheckBox(text="outlines", value=True, tooltip="nuclei as outlines, or filled labels")
        self._show_boxes = CheckBox(text="boxes", value=False, tooltip="a rectangle with its score per nucleus")
        self._area_row = row(self._min_area, self._outlines, self._show_boxes, label=AREA_UM2)
        self._run = PushButton(text="Segment nuclei")
        self._tissue = Label(label="Result", value="")
        self.task = BackgroundTask(self, [self._run])
        self._cancel, self._progress, self._status = self.task.widgets
        self.result: Result | None = None
        self._layer_pixel_size = PixelSize(None)
        self.extend([self._image, self.model.choice, self.model.file, row(self.model.device, self._tta, label="Device"),
                     self._gray, self._mpp, self._score, self._nms, self._area_row,
                     row(self._run, self._cancel), self._progress, self._status, self._tissue])
        scrolling(self)
        wrap(self._tissue)
        from qtpy.QtCore import QTimer

        self._measure_timer = QTimer()
        self._measure_timer.setSingleShot(True)
        self._measure_timer.setInterval(MEASURE_DELAY_MS)
        self._measure_timer.timeout.connect(self.measure)
        # A drag sends many values: re-filter once for the latest when Qt is idle, never a backlog.
        self._refilter_timer = QTimer()
        self._refilter_timer.setSingleShot(True)
        self._refilter_timer.setInterval(0)
        self._refilter_timer.timeout.connect(self.refilter)
        # the count follows edits made in other docks or with napari's brush (once they rest)
        self._count_timer = QTimer()
        self._count_timer.setSingleShot(True)
        self._count_timer.setInterval(MEASURE_DELAY_MS)
        self._count_timer.timeout.connect(self._recount)
        self._image.changed.connect(self._on_image_changed)
        self._run.changed.connect(lambda *_: self.run())
        self._score.changed.connect(lambda _: self._refilter_timer.start())
        self._nms.changed.connect(lambda _: self._refilter_timer.start())
        self._min_area.changed.connect(lambda _: self._refilter_timer.start())
        self._outlines.changed.connect(self._restyle)
        self._show_boxes.changed.connect(self._restyle)
        self.model.on_change(self._use_model_thresholds)
        self._on_image_changed(self._image.value)
        self._show_model_status()
        self._use_model_thresholds()

    @property
    def worker(self):
        return self.task.worker

    # -- parameters -----------------------------------------------------------------------
    def _show_model_status(self) -> None:
        if self.model.choice.value == DEFAULT_CHOICE and not DEFAULT_MODEL.exists():
            self._status.value = "No default model is shipped in this install: choose a checkpoint file."

    def _use_model_thresholds(self, *_) -> None:
        """Start from the chosen model's own thresholds, as stardist-napari does."""
        path = self.model.path()
        try:
            cfg = read_config(path) if path.is_file() else None
        except CheckpointError:
            cfg = None  # said when the user runs it
        if cfg is not None:
            limits = Thresholds().resolve(cfg)
            with self._score.changed.blocked(), self._nms.changed.blocked(), self._min_area.changed.blocked():
                self._score.value = limits.score  # one refilter, not three
                self._nms.value = min(limits.nms_iou, self._nms.max)
                px_mpp = None if self.result is None else self._px_mpp(self.result)
                self._min_area.value = limits.min_area if px_mpp is None else round(limits.min_area / px_mpp**2, 1)
            self.refilter()

    def _on_image_changed(self, layer) -> None:
        if layer is None:
            return
        self._layer_pixel_size = layer_pixel_size(layer)
        self._mpp.value = self._layer_pixel_size.mpp or 0.0
        if self.task.worker is None:
            self._status.value = f"{layer.name}: {self._layer_pixel_size.describe()}"
            in_um = [other.name for other in self._viewer.layers
                     if other is not layer and str(other.units[-1]) in ("um", "micrometer")]
            if not self._layer_pixel_size.known and in_um:
                self._status.value += (f"\nIt is drawn in pixels beside {in_um[0]} (in µm), so napari stops using "
                                       "units and the two differ in size: type its µm/px to put it in µm too.")

    def pixel_size(self) -> PixelSize:
        """The box's value: the image's own µm/px with its source, or what the user typed."""
        value = round(float(self._mpp.value), 4)
        if value == 0:
            return PixelSize(None)
        if self._layer_pixel_size.known and round(self._layer_pixel_size.mpp, 4) == value:
            return self._layer_pixel_size
        return PixelSize(value, EXPLICIT)

    # -- running --------------------------------------------------------------------------
    def run(self, floor: float | None = None) -> None:
        """Segment the chosen image; candidates from ``floor`` (default: a margin below the
        score slider) up are cached for the sliders."""
        layer, placement = image_and_placement(self)
        if layer is None:
            return
        path = self.model.path()
        if not path.is_file():
            self._status.value = f"Model file not found: {path}"
            return
        try:
            rgb = layer_rgb(layer)
        except ValueError as exc:
            self.task.fail(exc)
            return
        source, known = layer.name, layer_tissue_class(layer)
        floor = max(0.0, float(self._score.value) - CANDIDATE_MARGIN) if floor is None else floor
        self.task.start(_segment, rgb, path, self.model.device.value, self.pixel_size(), bool(self._tta.value), floor,
                        self.tissue_model, bool(self._gray.value),
                        done=lambda out: self._on_done(out, layer, source, placement, known),
                        cancelled=self._on_cancelled)

    def _on_cancelled(self) -> None:
        """The layers shown are the last finished run's: so are the count and the µm/px box."""
        if self.result is None:
            return
        with self._mpp.changed.blocked():
            self._mpp.value = self.result.det.pixel_size.mpp or 0.0
        self._status.value = "Cancelled; the results shown are the last finished run's.\n" + self._count_text()

    def cancel(self) -> None:
        self.task.cancel()

    def _on_done(self, out, layer, source: str, placement: dict, known: str | None) -> None:
        det, info, hema, model_mpp, tissue, colours = out
        edits = Edits(first_free=len(det) + 1)
        if self.result is not None and (self.result.source, self.result.det.image_shape) == (source, det.image_shape):
            self._absorb_edits()  # a re-run keeps what was drawn and deleted by hand
            edits = self.result.edits.carried_to(self.result.det.boxes, det.boxes, len(det) + 1)
        ps = det.pixel_size
        if ps.known and not np.allclose(layer.scale[-2:], ps.mpp):  # the image and its results in µm
            layer.scale = (*layer.scale[:-2], ps.mpp, ps.mpp)
            layer.units = (*layer.units[:-2], "um", "um")
            layer.metadata = {**(layer.metadata or {}), **ps.metadata()}
            placement = {"scale": tuple(layer.scale[-2:]), "units": tuple(layer.units[-2:])}
            self._viewer.reset_view()  # the image changed size on screen: keep it in view
        previous = self.result
        was_known = previous is None or previous.det.pixel_size.known
        self.result = Result(det, info, hema, model_mpp, source, placement, known, edits, tissue, colours)
        if ps.known != was_known:  # the minimum area changes units with the result's µm/px
            with self._min_area.changed.blocked():
                factor = self._px_mpp(previous)**2 if ps.known else 1 / self._px_mpp(self.result)**2
                self._min_area.value = round(float(self._min_area.value) * factor, 1)
        self._area_row.label = AREA_UM2 if ps.known else AREA_PX
        self._tissue.value = tissue_text(det.tissue_probs, det.classes, known)
        self._show_tissue_map()
        self.refilter()
        self.measure()
        self._status.value = self._count_text() + ("\nyour edits of the last run were kept" if edits else "")
        if not info.nuclei_trained:
            from napari.utils.notifications import show_info

            show_info("napari-bach: this model is UNTRAINED; its masks are meaningless.")
        self._viewer.scale_bar.visible = True

    # -- results --------------------------------------------------------------------------
    def _labels_layer(self):
        return None if self.result is None else find_result_layer(
            self._viewer, {"role": "nuclei", "source": self.result.source})

    def _absorb_edits(self) -> None:
        """Whatever the user changed in the labels layer since we last wrote it is an edit."""
        r = self.result
        layer = self._labels_layer()
        if r.shown is not None and layer is not None and layer.data.shape == r.shown.shape:
            r.edits.absorb(r.shown, np.asarray(layer.data), r.det.scores)

    def refilter(self, *_) -> None:
        """Re-apply score threshold and NMS to the cached candidates (no network), keeping
        the user's edits; the full measurement table follows once the slider rests."""
        self._refilter_timer.stop()
        if self.result is None:
            return
        r = self.result
        if float(self._score.value) < r.det.score_floor - 1e-6 and self.task.worker is None:
            self._status.value = (f"Candidates under score {r.det.score_floor:.2f} were not computed: "
                                  "computing them (your edits are kept)…")
            self.run(floor=0.0)
            return
        self._absorb_edits()
        r.seg = r.live.refilter(float(self._score.value), float(self._nms.value), r.edits, self._min_area_px())
        layer = self._labels_layer()
        if layer is not None and layer.data.shape == r.seg.labels.shape:
            write_changed_nuclei(layer, r.seg.labels)
            r.seg.labels = layer.data
        self._put_layers({"index": r.seg.ids, "score": r.seg.scores}, boxes=False)
        r.shown = np.array(r.seg.labels)  # a copy: the user edits the layer's array in place
        self._measure_timer.start()
        if self.task.worker is None:
            self._status.value = self._count_text()

    @staticmethod
    def _px_mpp(result: "Result") -> float | None:
        """The µm/px a result of unknown µm/px was segmented at (its scale estimate, else
        the model's): what its minimum area in pixels converts at; None when known."""
        if result.det.pixel_size.known:
            return None
        return result.det.segmented_mpp or result.model_mpp

    def _min_area_px(self) -> float:
        value = float(self._min_area.value)
        ps = self.result.det.pixel_size
        return value / ps.mpp**2 if ps.known else value

    def _restyle(self, *_) -> None:
        """Outlines or filled labels, boxes shown or hidden: the layers as they are."""
        if self.result is None:
            return
        labels = self._labels_layer()
        if labels is not None:
            labels.contour = OUTLINE_PX if self._outlines.value else 0
            labels.opacity = 0.9 if self._outlines.value else 0.5
        boxes = find_result_layer(self._viewer, {"role": "boxes", "source": self.result.source})
        if boxes is not None:
            boxes.visible = bool(self._show_boxes.value)

    def measure(self) -> None:
        """The per-nucleus table (µm at the result's own µm/px) and the boxes layer."""
        self._measure_timer.stop()
        if self.result is not None and self.result.seg is not None:
            self._put_layers(measure_nuclei(self.result.seg, self.result.hema), boxes=True)

    def _put_layers(self, features: dict, boxes: bool) -> None:
        r = self.result
        classes = r.det.classes
        meta = {
            "tissue_probs": None if r.det.tissue_probs is None else dict(zip(classes, map(float, r.det.tissue_probs))),
            "tissue_class_from_file": r.known,
            "model": "; ".join(r.info.status_parts(self._tissue_status())),
            "model_name": r.info.name,
            "score_threshold": float(self._score.value), "nms_iou": float(self._nms.value),
            "first_free_id": r.edits.first_free, **r.det.pixel_size.metadata(),
        }
        meta["min_area_px"] = self._min_area_px()
        labels, box_layer = result_layers(r.seg, r.source, r.placement, features, meta, boxes=boxes,
                                          outlines=bool(self._outlines.value), show_boxes=bool(self._show_boxes.value))
        put_result_layer(self._viewer, *labels)
        if box_layer is not None:
            put_result_layer(self._viewer, *box_layer)
        layer = self._labels_layer()
        if layer is not None and not getattr(layer, "_napari_bach_counted", False):  # edits anywhere: a fresh count
            layer._napari_bach_counted = True
            for event in (layer.events.data, layer.events.paint):
                event.connect(lambda *_: self._count_timer.start())

    def _show_tissue_map(self) -> None:
        """Images larger than one BACH field: their fields' classes as a layer (replaced on re-run)."""
        r = self.result
        old = find_result_layer(self._viewer, {"role": "tissue map", "source": r.source})
        if old is not None:
            self._viewer.layers.remove(old)
        if r.tissue is not None and len(r.tissue[0].windows) > 1:
            tmap = r.tissue[0]
            data, kwargs, kind = tissue_map_layer(tmap.cells(), tmap.probs, tmap.classes, r.source, r.placement)
            self._viewer.add_shapes(data, **kwargs)

    def _tissue_status(self) -> str | None:
        """The tissue classifier's status when it gave this result's class."""
        return self.result.tissue[1].status if self.result.tissue is not None else None

    def _recount(self) -> None:
        """After edits in the labels layer (this dock's sliders count as they go)."""
        layer = self._labels_layer()
        if self.result is not None and self.task.worker is None and layer is not None:
            self._absorb_edits()
            self._status.value = self._count_text(len(np.unique(np.asarray(layer.data))) - 1)

    def _count_text(self, shown: int | None = None) -> str:
        r = self.result
        shown = len(r.seg.ids) if shown is None else shown
        lines = [f"{shown} nuclei" + (f" (with your edits: {len(r.edits.drawn)} drawn, "
                                               f"{len(r.edits.removed)} model nuclei removed or redrawn)"
                                               if r.edits else "")]
        ps = r.det.pixel_size
        scale = scale_note(ps, r.det.scale_estimate, r.model_mpp)
        if scale:
            lines.append(scale + ("" if ps.known else "; sizes in pixels (set µm/px and run again for µm)"))
        lines += r.info.status_parts(self._tissue_status())
        if r.colours is not None and r.colours.warning:
            lines.append(f"WARNING: {r.colours.warning}")
        return "\n".join(lines)
