"""The "Segment slide" dock widget: stream a whole slide (or a region) to disk.

The Qt-free :func:`napari_bach.slide.iter_segment_slide` does the work in a worker; the
result comes back as a lazy labels layer read from the zarr store it wrote, so nothing
slide-sized is ever held in memory. A cancelled or interrupted slide resumes where it
stopped when run again into the same folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import Container, FileEdit, PushButton, SpinBox, create_widget

from ..checkpoint import cached_model
from ..pixelsize import EXPLICIT, PixelSize
from ..predict import available_devices
from ..slide import SlideResult, iter_segment_slide, slide_tissue
from ..tissue import DEFAULT_TISSUE_MODEL
from ..slideio import open_slide
from .common import BackgroundTask, ModelPicker, RegionPicker, layer_pixel_size, row, scrolling
from .layers import ROLE_KEY, tissue_map_layer

if TYPE_CHECKING:
    import napari



def _segment_slide(path: str, out: str, model_path: Path, device: str, pixel_size: PixelSize,
                   region: tuple[int, int, int, int] | None, block_size: int,
                   tissue_path: Path | None = DEFAULT_TISSUE_MODEL):
    yield "loading model"
    model, info = cached_model(model_path, device)
    slide = open_slide(path, pixel_size.mpp if pixel_size.source == EXPLICIT else None)
    try:
        result = yield from iter_segment_slide(slide, model, out, region, tissue_only=region is None,
                                               block_size=block_size, model_name=info.name,
                                               tissue_trained=info.tissue_trained)
        yield "tissue map"
        tmap = slide_tissue(slide, tissue_path, Path(out), result) if tissue_path else None
        return result, tmap
    finally:
        slide.close()


class SlideWidget(Container):
    """Nuclei of a whole slide or a region, streamed to zarr, CSV and QuPath GeoJSON, and
    its tissue map (fields of BACH's size classified, as QuPath annotations too)."""

    tissue_model: Path | None = DEFAULT_TISSUE_MODEL  # None: no tissue map

    def __init__(self, viewer: napari.viewer.Viewer) -> None:  # napari injects the viewer by this annotation
        super().__init__(labels=True)
        self._viewer = viewer
        self._image = create_widget(label="Slide", annotation="napari.layers.Image")
        self.model = ModelPicker(device=available_devices()[-1])  # a slide wants the GPU when there is one
        self.region = RegionPicker(whole=True)  # boxes: their common extent
        self._region, self._region_layer = self.region.widgets
        self._out = FileEdit(label="Output folder", mode="d")
        self._block = SpinBox(label="Block px", min=512, max=16384, step=512, value=4096)
        self._run = PushButton(text="Segment slide")
        self.task = BackgroundTask(self, [self._run], "Open a slide (.svs, .ndpi, pyramidal .tif) with napari-bach.")
        self._cancel, self._progress, self._status = self.task.widgets
        self.extend([self._image, *self.model.widgets, self._region, self._region_layer, self._out,
                     self._block, row(self._run, self._cancel), self._progress, self._status])
        scrolling(self)
        self._run.changed.connect(self.run)
        self.result: SlideResult | None = None

    @property
    def worker(self):
        return self.task.worker

    def _region_px(self, layer) -> tuple[int, int, int, int] | None:
        """y0 x0 y1 x1 in level-0 pixels, or None for every tissue block of the slide."""
        boxes = self.region.boxes(self._viewer, layer)
        if boxes is None:
            return None
        x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x1, y1 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise ValueError("the region is empty: pan or zoom so the slide is in view")
        return int(y0), int(x0), int(round(y1)), int(round(x1))

    def run(self) -> None:
        layer = self._image.value
        path = (layer.metadata or {}).get("path") if layer is not None else None
        if not path:
            self._status.value = "Open a slide with napari-bach's reader first (File > Open, choose napari-bach)."
            return
        out = str(self._out.value)
        if not out or out == ".":
            self._status.value = "Choose an output folder (labels, CSV and GeoJSON are written there)."
            return
        if Path(out).exists() and not Path(out).is_dir():
            self._status.value = f"{out} exists and is not a folder: choose a folder for the results."
            return
        try:
            region = self._region_px(layer)
        except ValueError as exc:
            self.task.fail(exc)
            return
        pixel_size = layer_pixel_size(layer)
        self.task.start(_segment_slide, path, out, self.model.path(), self.model.device.value, pixel_size, region,
                        int(self._block.value), self.tissue_model, done=lambda out: self._on_done(*out, layer))

    def _on_done(self, result: SlideResult, tmap, layer) -> None:
        import dask.array as da

        self.result = result
        y0, x0, _, _ = result.region
        scale = tuple(layer.scale[-2:])
        labels = da.from_zarr(str(result.labels))
        role = {"role": "slide nuclei", "source": layer.name}
        name = f"{layer.name} nuclei"
        for existing in list(self._viewer.layers):
            if (existing.metadata or {}).get(ROLE_KEY) == role:
                self._viewer.layers.remove(existing)
        self._viewer.add_labels(labels, name=name, scale=scale, translate=(y0 * scale[0], x0 * scale[1]),
                                units=tuple(layer.units[-2:]), opacity=0.5,
                                metadata={ROLE_KEY: role, **result.pixel_size.metadata(),
                                          "geojson": str(result.geojson), "csv": str(result.csv)})
        if result.finished_before:
            head = f"Already segmented into this folder with these settings: {result.nuclei} nuclei (files unchanged)"
        else:
            head = (f"{result.nuclei} nuclei in {result.blocks} blocks ({result.skipped} without tissue"
                    + (f", {result.resumed} done before" if result.resumed else "") + ")")
        tissue_line = ""
        if tmap is not None:
            source = layer.name
            for existing in list(self._viewer.layers):
                if (existing.metadata or {}).get(ROLE_KEY) == {"role": "tissue map", "source": source}:
                    self._viewer.layers.remove(existing)
            data, kwargs, _ = tissue_map_layer(tmap.cells(), tmap.probs, tmap.classes, source,
                                               {"scale": scale, "units": tuple(layer.units[-2:])})
            self._viewer.add_shapes(data, **kwargs)
            probs = tmap.image_probs()
            best = tmap.classes[int(probs.argmax())]
            tissue_line = (f"\ntissue map: {len(tmap.windows)} fields, mostly {best} ({probs.max():.0%}); "
                           f"QuPath annotations: {result.geojson.name.replace('_nuclei', '_tissue')}")
        self._status.value = (head + "\n"
                              f"QuPath: File › Import objects › {result.geojson.name}\n"
                              f"table: {result.csv.name}, labels: {result.labels.name}" + tissue_line)
