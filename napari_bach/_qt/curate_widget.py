"""The "Correct, export & report" dock widget, working on a Segment nuclei result.

Correction helpers edit the nuclei Labels layer and keep its box layer and per-nucleus
table in sync; export writes a training sample that ``src_train --exported`` reads;
figure and report write what a pathologist puts in a report.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (ComboBox, Container, FileEdit, FloatSpinBox, Label, LineEdit, PushButton,
                              create_widget)

from ..config import BACH_CLASSES
from ..edit import delete_label, next_free_label, relabel_consecutive, remove_small, segmentation_from_labels
from ..export import SampleExistsError, export_sample
from ..geojson import write_geojson
from ..measure import hematoxylin, measure_nuclei
from ..report import report_numbers, write_nuclei_csv, write_report
from .common import (check_output_file, layer_rgb, layer_tissue_class, put_result_layer, recent, result_pixel_size,
                      row, scrolling, wrap)
from .layers import ROLE_KEY, result_layers

if TYPE_CHECKING:
    import napari

FROM_MODEL = "(as predicted)"
FULL, VIEW = "Full image resolution", "Current view"


class CurateWidget(Container):
    def __init__(self, viewer: napari.viewer.Viewer) -> None:  # napari injects the viewer by this annotation
        super().__init__(labels=True)
        self._viewer = viewer
        self._image = create_widget(label="Image", annotation="napari.layers.Image")
        self._nuclei = create_widget(label="Nuclei", annotation="napari.layers.Labels")
        self._new = PushButton(text="Paint new nucleus")
        self._delete = PushButton(text="Delete selected")
        self._min_area = FloatSpinBox(label="Min area µm²", min=0.0, max=1000.0, step=1.0, value=10.0)
        self._remove_small = PushButton(text="Remove smaller")
        self._relabel = PushButton(text="Relabel 1…N")
        self._tissue = ComboBox(label="Tissue class", choices=[FROM_MODEL, *BACH_CLASSES], value=FROM_MODEL)
        self._dataset = FileEdit(label="Dataset folder", mode="d")
        self._sample = LineEdit(label="Sample name", value="")
        self._on_exists = ComboBox(label="If it exists", choices=["ask", "version", "replace"], value="ask")
        self._export = PushButton(text="Export training labels")
        self._figure_mode = ComboBox(label="Figure", choices=[FULL, VIEW], value=FULL)
        self._figure = FileEdit(label="Figure file", mode="w", filter="*.png")
        self._save_figure = PushButton(text="Save figure")
        self._report = FileEdit(label="Report file", mode="w", filter="*.pdf")
        self._save_report = PushButton(text="Save report, CSV, GeoJSON",
                                       tooltip="the PDF report, the per-nucleus table and QuPath detections "
                                               "(File › Import objects) beside it")
        self._status = Label(label="Status", value="")
        wrap(self._status)
        self.extend([self._image, self._nuclei, row(self._new, self._delete, self._relabel),
                     row(self._min_area, self._remove_small, label="Min area µm²"), self._tissue, self._dataset,
                     self._sample, self._on_exists, self._export, self._figure_mode, self._figure, self._report,
                     row(self._save_figure, self._save_report), self._status])
        scrolling(self)
        self.numbers: dict | None = None
        self._new.changed.connect(self.paint_new)
        self._delete.changed.connect(self.delete_selected)
        self._remove_small.changed.connect(self.remove_small)
        self._relabel.changed.connect(self.relabel)
        self._export.changed.connect(self.export)
        self._save_figure.changed.connect(self.save_figure)
        self._save_report.changed.connect(self.save_report)
        self._nuclei.changed.connect(self._watch)
        self._watch(self._nuclei.value)

    # -- helpers --------------------------------------------------------------------------
    def _layers(self):
        image, nuclei = self._image.value, self._nuclei.value
        if image is None or nuclei is None:
            raise ValueError("choose an image and its nuclei layer (run Segment nuclei, or add a Labels layer)")
        if nuclei.data.shape[-2:] != image.data.shape[:2]:
            raise ValueError(f"nuclei layer shape {nuclei.data.shape} does not match the image {image.data.shape[:2]}")
        return image, nuclei

    def _watch(self, layer) -> None:
        """Re-sync boxes and table after every paint stroke."""
        if layer is not None and not getattr(layer, "_napari_bach_watched", False):
            layer.events.paint.connect(lambda e: self.sync())
            # Segment nuclei's sliders rewrite the table: the count here follows, never stale
            layer.events.features.connect(lambda e, layer=layer: self._show_count(layer))
            layer._napari_bach_watched = True
        if layer is not None:
            self._show_count(layer)

    def _show_count(self, layer) -> None:
        if layer is self._nuclei.value and "index" in layer.features:
            self._say(f"{len(layer.features)} nuclei in {layer.name}")

    def _say(self, text: str) -> None:
        self._status.value = text

    def pixel_size(self):
        """The µm/px the result was made at (Segment nuclei stores it on the labels layer)."""
        return result_pixel_size(self._nuclei.value, self._image.value)

    def sync(self) -> None:
        """Rebuild boxes, scores and measurements from the edited labels."""
        try:
            image, nuclei = self._layers()
        except ValueError as exc:
            self._say(str(exc))
            return
        features = nuclei.features
        scores = dict(zip(features["index"], features["score"])) if "score" in features else {}
        seg = segmentation_from_labels(np.asarray(nuclei.data), scores, self.pixel_size())
        table = measure_nuclei(seg, hematoxylin(layer_rgb(image), seg.labels > 0))
        source = (nuclei.metadata.get(ROLE_KEY) or {}).get("source", image.name)
        placement = {"scale": tuple(nuclei.scale[-2:]), "units": tuple(nuclei.units[-2:])}
        labels_t, boxes_t = result_layers(seg, source, placement, table, nuclei.metadata)
        nuclei.features = labels_t[1]["features"]  # its pixels are the user's edits: keep them
        nuclei.metadata = labels_t[1]["metadata"]
        put_result_layer(self._viewer, *boxes_t)
        self._say(f"{len(seg.ids)} nuclei")

    def paint_new(self) -> None:
        try:
            _, nuclei = self._layers()
        except ValueError as exc:
            return self._say(str(exc))
        floor = (nuclei.metadata or {}).get("first_free_id", 1)  # ids below belong to the model's candidates
        nuclei.selected_label = next_free_label(np.asarray(nuclei.data), floor)
        nuclei.mode = "paint"
        self._viewer.layers.selection.active = nuclei
        self._say(f"painting nucleus {nuclei.selected_label}")

    def _edit(self, action) -> None:
        try:
            _, nuclei = self._layers()
            data = np.asarray(nuclei.data)
            message = action(nuclei, data)
        except ValueError as exc:
            return self._say(str(exc))
        nuclei.data = data
        self.sync()
        self._say(message + f"; {self._status.value}")

    def delete_selected(self) -> None:
        def act(nuclei, data):
            label = int(nuclei.selected_label)
            if delete_label(data, label) == 0:
                raise ValueError(f"nucleus {label} is not in the image")
            return f"deleted nucleus {label}"
        self._edit(act)

    def remove_small(self) -> None:
        def act(nuclei, data):
            mpp = self.pixel_size().mpp
            if mpp is None:
                raise ValueError("µm/px unknown: set it in Segment nuclei and run again to remove by µm²")
            gone = remove_small(data, int(np.ceil(self._min_area.value / mpp**2)))
            return f"removed {len(gone)} nuclei under {self._min_area.value:g} µm²"
        self._edit(act)

    def relabel(self) -> None:
        def act(nuclei, data):
            mapping = relabel_consecutive(data)
            f = nuclei.features
            if "index" in f and "score" in f:  # carry scores to the new ids
                nuclei.features = {"index": [mapping.get(int(i), 0) for i in f["index"]], "score": f["score"]}
            return "relabelled to consecutive ids"
        self._edit(act)

    # -- export and reports --------------------------------------------------------------
    def tissue_class(self) -> tuple[str | None, dict | None]:
        probs = self._nuclei.value.metadata.get("tissue_probs") if self._nuclei.value is not None else None
        if self._tissue.value != FROM_MODEL:
            return self._tissue.value, probs
        known = layer_tissue_class(self._image.value) if self._image.value is not None else None
        return (max(probs, key=probs.get) if probs else known), probs

    def export(self) -> Path | None:
        try:
            image, nuclei = self._layers()
        except ValueError as exc:
            return self._say(str(exc))
        if not str(self._dataset.value) or str(self._dataset.value) == ".":
            return self._say("choose a dataset folder")
        name = self._sample.value.strip() or image.name
        cls, _ = self.tissue_class()
        pixel_size = self.pixel_size()
        meta = {"source": (image.metadata or {}).get("path"), "image_layer": image.name,
                **{k: nuclei.metadata.get(k) for k in ("model", "model_name", "score_threshold", "nms_iou")},
                **pixel_size.metadata()}
        mode = self._on_exists.value
        args = (self._dataset.value, name, layer_rgb(image), np.asarray(nuclei.data), pixel_size.mpp, cls, meta)
        try:
            folder = export_sample(*args, on_exists="error" if mode == "ask" else mode)
        except SampleExistsError:
            from qtpy.QtWidgets import QMessageBox

            box = QMessageBox(QMessageBox.Icon.Question, "Sample exists",
                              f"'{name}' is already in this dataset.", parent=self.native)
            version = box.addButton("Save as new version", QMessageBox.ButtonRole.AcceptRole)
            replace = box.addButton("Replace", QMessageBox.ButtonRole.DestructiveRole)
            box.addButton(QMessageBox.StandardButton.Cancel)
            box.exec()
            if box.clickedButton() not in (version, replace):
                return self._say("export cancelled; nothing written")
            folder = export_sample(*args, on_exists="version" if box.clickedButton() is version else "replace")
        except (ValueError, OSError) as exc:  # a read-only or full dataset folder too: said here
            return self._say(f"not exported: {exc}")
        self._say(f"exported {folder}")
        recent["dataset"] = str(Path(self._dataset.value))  # Fine-tune on corrections starts from it
        return folder

    def save_figure(self) -> Path | None:
        try:
            path = check_output_file(Path(self._figure.value), ".png")
        except ValueError as exc:
            return self._say(str(exc))
        if not self._may_replace([path]):
            return self._say("not saved: the file exists and you kept it")
        self._viewer.scale_bar.visible = True
        hidden = []
        image = self._image.value
        if self._figure_mode.value == FULL and image is not None:
            # layers in other units (pixels beside µm) would stretch the figure's extent:
            # the image would fill a corner of a black page, the scale bar lose its unit
            units = tuple(str(u) for u in image.units[-2:])
            hidden = [(i, layer) for i, layer in enumerate(self._viewer.layers)
                      if tuple(str(u) for u in layer.units[-2:]) != units]
        for _, layer in reversed(hidden):  # the figure's extent counts every layer, shown or not
            self._viewer.layers.remove(layer)
        try:
            if self._figure_mode.value == FULL:
                self._viewer.export_figure(str(path))
            else:
                self._viewer.screenshot(str(path), canvas_only=True)
        except OSError as exc:
            return self._say(f"figure not saved: {exc}")
        finally:
            for i, layer in hidden:
                self._viewer.layers.insert(i, layer)
        self._say(f"saved {path}" + (f" (left out, in other units: {', '.join(l.name for _, l in hidden)})"
                                     if hidden else ""))
        return path

    def _may_replace(self, paths: list[Path]) -> bool:
        """Existing files are replaced only when the user says so (issue 28.6)."""
        existing = [p for p in paths if p.exists()]
        if not existing:
            return True
        from qtpy.QtWidgets import QMessageBox

        box = QMessageBox(QMessageBox.Icon.Question, "Replace files?",
                          "These files exist and would be replaced:\n" + "\n".join(p.name for p in existing),
                          parent=self.native)
        replace = box.addButton("Replace", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.exec()
        return box.clickedButton() is replace

    def save_report(self) -> Path | None:
        try:
            image, nuclei = self._layers()
        except ValueError as exc:
            return self._say(str(exc))
        try:
            path = check_output_file(Path(self._report.value), ".pdf")
        except ValueError as exc:
            return self._say(str(exc))
        outputs = [path, path.with_name(f"{path.stem}_nuclei.csv"), path.with_name(f"{path.stem}_nuclei.geojson")]
        if not self._may_replace(outputs):
            return self._say("report not saved: its files exist and you kept them")
        self.sync()
        rgb = layer_rgb(image)
        table = {c: np.asarray(nuclei.features[c]) for c in nuclei.features.columns}
        _, probs = self.tissue_class()
        self.numbers = report_numbers(rgb, table, self.pixel_size().mpp, probs)
        m = nuclei.metadata
        mpp = self.pixel_size().mpp
        min_area = m.get("min_area_px")
        settings = {"Model": m.get("model", "unknown"), "Score threshold": m.get("score_threshold"),
                    "NMS IoU": m.get("nms_iou"),
                    "Minimum nucleus area": "not recorded" if min_area is None else
                    (f"{min_area * mpp**2:.3g} µm² ({min_area:.0f} px)" if mpp else f"{min_area:.0f} px"),
                    "Tissue class chosen by user": self._tissue.value if self._tissue.value != FROM_MODEL else "no"}
        try:
            write_report(path, image.name, rgb, np.asarray(nuclei.data), self.numbers, settings)
            csv_path = write_nuclei_csv(outputs[1], table)
            seg = segmentation_from_labels(np.asarray(nuclei.data), pixel_size=self.pixel_size())
            geojson = write_geojson(outputs[2], seg, table, m.get("model_name", ""))
        except OSError as exc:  # a read-only or full folder: said in this dock, nothing else changes
            return self._say(f"report not saved: {exc}")
        n = self.numbers
        self._say(f"saved {path.name}, {csv_path.name} and {geojson.name} (QuPath): {n['nuclei']} nuclei"
                  + (f", {n['density_per_tissue_mm2']:.0f}/mm² tissue" if n.get("mpp") else ""))
        return path
