"""The "RPN anchors & proposals" dock widget: see what the detector's first stage sees.

Anchors are computed in the Qt-free core (:mod:`napari_bach.anchors`) with the model's
own torchvision anchor generator and matcher; proposals run the backbone and RPN. Both
run in a worker thread with progress and Cancel, so napari never freezes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import Container, FloatSpinBox, LineEdit, PushButton, Select, SpinBox, create_widget

from ..anchors import IGNORED, LEVELS, NEGATIVE, POSITIVE, iter_anchors_in_region, iter_proposals, make_generator
from ..checkpoint import cached_model
from ..edit import segmentation_from_labels
from .common import (EXPECTED_ERRORS, BackgroundTask, ModelPicker, RegionPicker, image_and_placement,
                      layer_pixel_size, layer_rgb, row, scrolling)
from .layers import box_corners

if TYPE_CHECKING:
    import napari

LABEL_COLOURS = {POSITIVE: "lime", NEGATIVE: "red", IGNORED: "gray"}
LEVEL_COLOURS = ("cyan", "magenta", "yellow", "orange", "white")


def _numbers(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a list of numbers") from None


def parse_sizes(text: str) -> tuple[tuple[float, ...], ...] | None:
    """``"8,11 16,23 …"``: one comma list per FPN level; blank keeps the model's."""
    text = text.strip()
    return tuple(_numbers(level, "anchor sizes") for level in text.split()) if text else None


def parse_ratios(text: str) -> tuple[float, ...] | None:
    text = text.strip()
    return _numbers(text.replace(" ", ","), "aspect ratios") if text else None


class AnchorWidget(Container):
    """Anchors per FPN level, their training labels, and RPN proposals before/after NMS."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:  # napari injects the viewer by this annotation
        super().__init__(labels=True)
        self._viewer = viewer
        self._image = create_widget(label="Image", annotation="napari.layers.Image")
        self.model = ModelPicker()
        self._levels = Select(label="FPN levels", choices=LEVELS, value=["P2", "P3"])
        self._sizes = LineEdit(label="Anchor sizes", value="")
        self._sizes.native.setPlaceholderText("model's own, e.g. 8,11 16,23 32,45 64,91 128,181")
        self._ratios = LineEdit(label="Aspect ratios", value="")
        self._ratios.native.setPlaceholderText("model's own, e.g. 0.5 1 2")
        self.region = RegionPicker()
        self._region, self._region_layer = self.region.widgets
        self._nuclei = create_widget(label="Nuclei", annotation="napari.layers.Labels", options={"nullable": True})
        self._fg = FloatSpinBox(label="Positive IoU >", min=0.0, max=1.0, step=0.05, value=0.7)
        self._bg = FloatSpinBox(label="Negative IoU <", min=0.0, max=1.0, step=0.05, value=0.3)
        self._cap = SpinBox(label="Draw at most", min=100, max=100_000, step=500, value=5000)
        self._show_anchors = PushButton(text="Show anchors")
        self._k = SpinBox(label="Top-k proposals", min=1, max=5000, value=200)
        self._nms = FloatSpinBox(label="Proposal NMS IoU", min=0.05, max=1.0, step=0.05, value=0.7)
        self._show_proposals = PushButton(text="Show proposals")
        self.task = BackgroundTask(self, [self._show_anchors, self._show_proposals])
        self._cancel, self._progress, self._status = self.task.widgets
        self.extend([self._image, *self.model.widgets, self._levels, self._sizes, self._ratios, self._region,
                     self._region_layer, self._nuclei, self._fg, self._bg, self._cap, self._show_anchors, self._k,
                     self._nms, row(self._show_proposals, self._cancel), self._progress, self._status])
        scrolling(self)
        self._show_anchors.changed.connect(self.show_anchors)
        self._show_proposals.changed.connect(self.show_proposals)

    @property
    def worker(self):
        return self.task.worker

    def _regions(self, layer) -> list[tuple[float, float, float, float]]:
        return self.region.boxes(self._viewer, layer)

    def _put(self, name: str, data, **kwargs) -> None:
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        self._viewer.add_shapes(data, name=name, face_color="transparent", **kwargs)

    def _factor_and_model(self, layer):
        """The model (cached) and image-to-model scale; unknown µm/px runs at the model's own."""
        model, _ = self.model.load("cpu")  # anchors are geometry: no device needed
        return model, (layer_pixel_size(layer).mpp or model.config.mpp) / model.config.mpp

    def show_anchors(self) -> None:
        layer, placement = image_and_placement(self)
        if layer is None:
            return
        try:
            model, factor = self._factor_and_model(layer)
            cfg = model.config
            generator = make_generator(parse_sizes(self._sizes.value) or cfg.anchor_sizes,
                                       parse_ratios(self._ratios.value) or cfg.aspect_ratios)
            regions = self._regions(layer)
        except EXPECTED_ERRORS as exc:
            self.task.fail(exc)
            return
        levels = [LEVELS.index(v) for v in self._levels.value] or [0]
        nuclei = self._nuclei.value
        gt = segmentation_from_labels(np.asarray(nuclei.data)).boxes if nuclei is not None else None
        self.task.start(_anchors, generator, layer.data.shape[:2], factor, regions, levels, gt, float(self._fg.value),
                        float(self._bg.value), int(self._cap.value),
                        done=lambda out: self._on_anchors(out, placement, nuclei is not None))

    def _on_anchors(self, views: list, placement: dict, labelled: bool) -> None:
        boxes, colours, feats, counts, capped = [], [], {"level": [], "label": []}, {}, False
        shrunk = [view for view in views if view.shrunk]
        names = {POSITIVE: "positive", NEGATIVE: "negative", IGNORED: "ignored"}
        for view in views:
            capped |= view.capped
            for k, v in view.counts.items():
                counts[k] = counts.get(k, 0) + v
            boxes += box_corners(view.boxes)
            feats["level"] += [LEVELS[i] for i in view.levels]
            if view.labels is not None:
                feats["label"] += [names[int(l)] for l in view.labels]
                colours += [LABEL_COLOURS[int(l)] for l in view.labels]
            else:
                feats["label"] += ["unlabelled"] * len(view.boxes)
                colours += [LEVEL_COLOURS[i] for i in view.levels]
        self._put("anchors", [(b, "rectangle") for b in boxes], edge_color=colours or "cyan", edge_width=0.5,
                  features=feats, **placement)
        text = ", ".join(f"{v} {k}" for k, v in counts.items())
        if capped:
            text += f"\ndrawing {len(boxes)} of them:\nevery positive, then a random sample"
        if shrunk:
            x0, y0, x1, y1 = shrunk[0].region
            text += (f"\nthe view holds more than {shrunk[0].limit:,} anchors: only its centre\n"
                     f"({x1 - x0:.0f} × {y1 - y0:.0f} px) is shown; zoom in or draw a box for another part")
        if not labelled:
            text += "\nchoose a Nuclei labels layer to colour\nanchors by their training label"
        self._status.value = text

    def show_proposals(self) -> None:
        layer, placement = image_and_placement(self)
        if layer is None:
            return
        try:
            region = self._regions(layer)[0]
            rgb = layer_rgb(layer)
        except EXPECTED_ERRORS as exc:
            self.task.fail(exc)
            return
        self.task.start(_proposals, rgb, self.model.path(), self.model.device.value, layer_pixel_size(layer).mpp, region,
                        int(self._k.value), float(self._nms.value), done=lambda out: self._on_proposals(out, placement))

    def _on_proposals(self, out, placement: dict) -> None:
        before, after = out
        # magenta and cyan: apart from the yellow nucleus boxes and the green/red/grey anchors
        for name, p, colour in (("proposals before NMS", before, "magenta"), ("proposals after NMS", after, "cyan")):
            self._put(name, [(b, "rectangle") for b in box_corners(p.boxes)], edge_color=colour, edge_width=0.7,
                      features={"objectness": p.scores}, **placement)
        self._status.value = (f"NMS at IoU {self._nms.value:.2f} kept {after.count:,} of the {before.count:,} "
                              f"proposals in the region.\nShown: the {len(before.boxes)} best before NMS (magenta) "
                              f"and the {len(after.boxes)} best after it (cyan); objectness in the layers' features")


def _anchors(generator, image_hw, factor, regions, levels, gt, fg, bg, cap):
    """Every region's anchors in a worker: all FPN levels of a large view take a while."""
    per_region = max(1, cap // len(regions))
    views = []
    for region in regions:
        views.append((yield from iter_anchors_in_region(generator, image_hw, factor, region, levels, gt, fg, bg,
                                                        per_region)))
    return views


def _proposals(rgb, model_path, device, mpp, region, k, nms_iou):
    model, _ = cached_model(model_path, device)
    return (yield from iter_proposals(rgb, model, mpp, region, k, nms_iou))
