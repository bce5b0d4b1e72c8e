"""Whole slides: streamed segmentation with flat memory (reading is :mod:`napari_bach.slideio`).

A slide is never read whole. :func:`iter_segment_slide` walks a grid of overlapping
blocks (``tiling.tile_grid``: cores partition the region, so a nucleus on a block border
is kept once, by the block whose core holds its box centre), segments each block with
the same :func:`~napari_bach.predict.iter_predict` as a plain image, and streams the
result to disk: labels into a chunked zarr array, one CSV row and one QuPath GeoJSON
detection per nucleus. Ids are unique across the slide. ``progress.json`` records the
finished blocks, so an interrupted slide resumes where it stopped.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generator

import numpy as np

from .atomic import atomic_write
from .config import Thresholds
from .detections import Segmentation
from .geojson import geojson_features, polygons
from .measure import hematoxylin, measure_nuclei
from .pixelsize import ESTIMATED, PixelSize
from .predict import Progress, iter_predict, plan_tiles, relayed
from .scale import MPP_LIMITS, iter_estimate_slide_mpp, needs_estimate, scale_note
from .slideio import Slide, open_slide, overview, tissue_mask
from .stain import estimate_stain
from .tiling import Tile, centre_in, tile_grid

CHUNK = 1024  # labels zarr chunk side
FORMAT = "napari-bach-slide"
VERSION = 5  # 2: balanced blocks; 3: the block halo is the tile margin; 4: unknown µm/px: scale estimate;
# 5: nuclei cut by a block edge are the neighbour's, and outputs hold the pixels the zarr holds


@dataclass
class SlideResult:
    labels: Path
    csv: Path
    geojson: Path
    nuclei: int
    blocks: int
    skipped: int  # blocks without tissue
    pixel_size: PixelSize
    region: tuple[int, int, int, int]  # y0 x0 y1 x1 in level-0 pixels
    resumed: int = 0  # blocks found finished from an earlier run
    finished_before: bool = False  # the whole run was found finished: nothing was redone or rewritten
    scale_estimate: float | None = None  # µm/px it was segmented at when not its own (napari_bach.scale)


def outputs(out_dir: str | Path, stem: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {"labels": out / f"{stem}_labels.zarr", "csv": out / f"{stem}_nuclei.csv",
            "geojson": out / f"{stem}_nuclei.geojson", "tissue": out / f"{stem}_tissue.geojson",
            "progress": out / f"{stem}_progress.json",
            "parts": out / f".{stem}_parts"}


class SlideOutputsExist(FileExistsError):
    """The output folder holds another run's results for this slide: refused, never mixed
    in or overwritten."""


def is_finished(out_dir: str | Path, stem: str) -> bool:
    """A slide whose outputs are complete."""
    files = outputs(out_dir, stem)
    if not files["progress"].is_file():
        return False
    return json.loads(files["progress"].read_text()).get("finished", False)


def slide_stem(path: str | Path) -> str:
    return Path(path).name.split(".")[0]


def block_halo(mpp: float | None, config) -> int:
    """Context around each block, in the slide's pixels: a tile's own margin (half the tile
    overlap), so a block border is one more tile border, and a nucleus the block owns is
    seen as whole as one a tile owns. A slide of unknown µm/px gets the margin at the
    finest scale its estimate may give (``scale.MPP_LIMITS``): blocks are laid out first."""
    return int(np.ceil(config.tile_overlap / 2 * config.mpp / (mpp or MPP_LIMITS[0])))


def run_settings(slide: Slide, config, region: tuple[int, int, int, int] | None, thresholds: Thresholds,
                 block_size: int, model_name: str) -> dict:
    """Everything that decides a slide run's results; a resumed run must match them.
    Raises ValueError for a region outside the slide or blocks too small for their halo."""
    h, w = slide.shape
    y0, x0, y1, x1 = region or (0, 0, h, w)
    y0, x0, y1, x1 = max(0, int(y0)), max(0, int(x0)), min(h, int(y1)), min(w, int(x1))
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"the region {region} holds no pixels of this {w}×{h} slide")
    limits = thresholds.resolve(config)
    halo = block_halo(slide.pixel_size.mpp, config)
    if block_size <= 4 * halo:
        raise ValueError(f"block size {block_size} px is too small: it must exceed 4× the {halo} px of context "
                         f"around each block, i.e. at least {4 * halo + 1} px")
    return {"format": FORMAT, "version": VERSION, "region": [y0, x0, y1, x1], "block_size": block_size,
            "halo": halo, "score": limits.score, "nms_iou": limits.nms_iou, "min_area": limits.min_area,
            "model": model_name, "mpp": slide.pixel_size.mpp}


def existing_run(out_dir: str | Path, stem: str, settings: dict) -> dict | None:
    """The saved state of this very run in ``out_dir`` (to resume or to reuse), None when
    the folder holds nothing for the slide. Raises :class:`SlideOutputsExist` when it holds
    another run's results (other region, thresholds, model …) or outputs of unknown origin."""
    files = outputs(out_dir, stem)
    if files["progress"].is_file():
        old = json.loads(files["progress"].read_text())
        if old.get("settings") != settings:
            was = old.get("settings", {})
            diff = [k for k in settings if was.get(k) != settings[k]]
            raise SlideOutputsExist(
                f"{Path(out_dir) / stem}_* belong to a run with other settings ({', '.join(diff)}); "
                "choose another output folder, or delete that slide's outputs to redo it")
        return old
    if any(files[k].exists() for k in ("labels", "csv", "geojson")):
        raise SlideOutputsExist(f"{out_dir} already holds outputs for {stem} with no record of how they were made; "
                                "choose another folder or delete them")
    return None


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data)))


def iter_segment_slide(slide: Slide, model, out_dir: str | Path, region: tuple[int, int, int, int] | None = None,
                       thresholds: Thresholds = Thresholds(), tissue_only: bool = True, block_size: int = 4096,
                       model_name: str = "", tissue_trained: bool = False
                       ) -> Generator[Progress, None, SlideResult]:
    """Segment ``region`` (y0 x0 y1 x1 level-0 px; default the whole slide) block by block,
    streaming labels, CSV and GeoJSON to ``out_dir``; yields progress per block.

    Memory holds one block (and the next, read ahead), never the slide. Rerunning with
    the same settings resumes after the last finished block; a finished run is returned
    as it is, its files untouched. Progress is per tile, with an estimate of the time left."""
    import zarr

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    stem = slide_stem(slide.path)
    files = outputs(out_dir, stem)
    settings = run_settings(slide, model.config, region, thresholds, block_size, model_name)
    y0, x0, y1, x1 = settings["region"]
    limits = thresholds.resolve(model.config)
    blocks = tile_grid(y1 - y0, x1 - x0, block_size, 2 * settings["halo"], balanced=True)
    state = existing_run(out_dir, stem, settings)
    if state is not None and state.get("finished"):
        yield Progress(len(blocks), len(blocks), "already finished: nothing to do")
        return SlideResult(files["labels"], files["csv"], files["geojson"], state["nuclei"], len(blocks),
                           state.get("skipped", 0), slide.pixel_size, (y0, x0, y1, x1), len(state["done"]), True,
                           state.get("scale_estimate"))
    state = state or {"settings": settings, "done": [], "next_id": 1, "nuclei": 0, "finished": False,
                      "mpp_source": slide.pixel_size.source}
    if "scale_estimate" not in state:  # once per slide: a resumed run keeps its first estimate
        state["scale_estimate"] = None
        if needs_estimate(slide.pixel_size, model.config):
            state["scale_estimate"] = yield from iter_estimate_slide_mpp(slide, model)
    estimate = state["scale_estimate"]
    working = PixelSize(estimate, ESTIMATED) if estimate else slide.pixel_size  # the µm/px tiles are cut at
    min_area_px = limits.min_area_px(slide.pixel_size.mpp or estimate, model.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    files["parts"].mkdir(exist_ok=True)
    labels = zarr.open_array(str(files["labels"]), mode="a", shape=(y1 - y0, x1 - x0), dtype="int32",
                             chunks=(CHUNK, CHUNK), fill_value=0)
    labels.attrs.update({"napari_bach": {**settings, "offset_yx": [y0, x0]}})
    _write_json(files["progress"], state)
    mask, mask_factor = tissue_mask(slide) if tissue_only else (None, 1.0)
    # a model with stain normalisation maps every block from the slide's one stain
    stain = estimate_stain(overview(slide)[0]) if model.config.stain_norm != "none" else None

    def has_tissue(b: Tile) -> bool:
        if mask is None:
            return True
        cy0, cx0, cy1, cx1 = b.core
        sl = mask[int((y0 + cy0) / mask_factor):int(np.ceil((y0 + cy1) / mask_factor)),
                  int((x0 + cx0) / mask_factor):int(np.ceil((x0 + cx1) / mask_factor))]
        return bool(sl.any())

    done = set(state["done"])
    todo = [k for k, b in enumerate(blocks) if k not in done]
    work = [k for k in todo if has_tissue(blocks[k])]
    skipped = len(todo) - len(work)
    state["skipped"] = skipped  # blocks without tissue are never "done": counted afresh each run
    resumed = len(done)
    # progress counts tiles of the blocks still to do, so the bar moves every few seconds
    tiles = [len(plan_tiles((b.y1 - b.y0, b.x1 - b.x0), model.config, working).tiles)
             for b in (blocks[k] for k in work)]
    total = max(1, sum(tiles))
    clock = _Clock(total)
    scale = scale_note(slide.pixel_size, estimate, model.config.mpp)
    yield Progress(0, total, f"{len(blocks)} blocks, {len(work)} with tissue to do ({total} tiles)"
                   + (f", {resumed} done before" if resumed else "")
                   + (f"; {scale}" if scale else ""))

    def read(k: int) -> np.ndarray:
        b = blocks[k]
        return slide.read(y0 + b.y0, x0 + b.x0, y0 + b.y1, x0 + b.x1)

    with ThreadPoolExecutor(max_workers=1) as reader:  # the next block is read while this one runs
        ahead = reader.submit(read, work[0]) if work else None
        for n, k in enumerate(work):
            rgb = ahead.result()
            ahead = reader.submit(read, work[n + 1]) if n + 1 < len(work) else None
            b = blocks[k]
            det = yield from _within_block(iter_predict(rgb, model, slide.pixel_size, tissue_trained,
                                                        score_floor=limits.score, stain=stain,
                                                        estimate_scale=estimate or False),  # one for all blocks
                                           sum(tiles[:n]), clock, f"block {n + 1}/{len(work)}")
            seg = det.refilter(limits.score, limits.nms_iou, min_area=min_area_px)
            owned = _paste_owned(labels, seg, _owned(seg, b), b, state["next_id"], slide.pixel_size)
            _write_part(files["parts"], k, owned, rgb, (y0 + b.y0, x0 + b.x0), model_name)
            state["next_id"] += len(owned.ids)
            state["nuclei"] += len(owned.ids)
            state["done"].append(k)
            _write_json(files["progress"], state)
            yield Progress(sum(tiles[: n + 1]), total, f"block {n + 1}/{len(work)}: {state['nuclei']} nuclei so far"
                           + clock.eta(sum(tiles[: n + 1])))
    _assemble(files, len(blocks))
    state["finished"] = True
    _write_json(files["progress"], state)
    return SlideResult(files["labels"], files["csv"], files["geojson"], state["nuclei"], len(blocks), skipped,
                       slide.pixel_size, (y0, x0, y1, x1), resumed, scale_estimate=estimate)


class _Clock:
    """Time left, from the pace of the tiles done so far in this run."""

    def __init__(self, total: int) -> None:
        self.total, self.start = total, time.monotonic()

    def eta(self, done: int) -> str:
        if done <= 0:
            return ""
        left = (time.monotonic() - self.start) / done * (self.total - done)
        return f", about {_duration(left)} left"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _within_block(gen, done: int, clock: _Clock, name: str):
    """A block's tile loop, reported as tiles through the slide (Cancel works between tiles)."""
    return (yield from relayed(gen, lambda step: Progress(
        done + step.done, clock.total, f"{name}: tile {step.done}/{step.total}{clock.eta(done + step.done)}")))


def _owned(seg: Segmentation, block: Tile) -> np.ndarray:
    """Ids of nuclei whose box centre lies in the block's core (block-local coordinates),
    leaving out those cut by the block's edge where a neighbouring block goes on: that
    block sees them whole (any nucleus up to twice the halo wide), and a cut one's box
    centre can fall in this core although the nucleus is the neighbour's."""
    cy0, cx0, cy1, cx1 = block.core
    inside = centre_in(seg.boxes, (cy0 - block.y0, cx0 - block.x0, cy1 - block.y0, cx1 - block.x0))
    h, w = block.y1 - block.y0, block.x1 - block.x0
    x0, y0, x1, y1 = (np.asarray(seg.boxes, float).reshape(-1, 4)[:, k] for k in range(4))
    cut = (((y0 <= 0.5) & (cy0 > block.y0)) | ((x0 <= 0.5) & (cx0 > block.x0))
           | ((y1 >= h - 1.5) & (cy1 < block.y1)) | ((x1 >= w - 1.5) & (cx1 < block.x1)))
    return seg.ids[np.asarray(inside) & ~cut]


def _paste_owned(labels, seg: Segmentation, kept: np.ndarray, b: Tile, first: int,
                 pixel_size: PixelSize) -> Segmentation:
    """Write a block's owned nuclei into the slide's labels where they are still empty and
    return them as written, numbered from ``first``: the zarr, the CSV and the GeoJSON then
    hold the same nuclei with the same pixels. Earlier blocks keep contested pixels (as
    earlier nuclei do within an image); a nucleus left with under half its pixels is the
    same nucleus an earlier block already wrote, seen cut at that block's edge, and is
    dropped rather than kept as a sliver."""
    region = labels[b.y0:b.y1, b.x0:b.x1]
    taken = region > 0
    n = int(seg.labels.max(initial=0)) + 1
    mine = np.isin(seg.labels, kept)
    total = np.bincount(seg.labels[mine], minlength=n)
    free = np.bincount(seg.labels[mine & ~taken], minlength=n)
    survive = kept[(free[kept] > 0) & (2 * free[kept] >= total[kept])]
    new_ids = np.arange(first, first + len(survive), dtype=np.int64)
    lut = np.zeros(n, np.int32)
    lut[survive] = new_ids
    block = lut[seg.labels]
    block[taken] = 0
    if block.any():
        region[block > 0] = block[block > 0]
        labels[b.y0:b.y1, b.x0:b.x1] = region
    rows = np.isin(seg.ids, survive)
    return Segmentation(block, new_ids, seg.boxes[rows], seg.scores[rows], pixel_size)


def _write_part(parts: Path, k: int, seg: Segmentation, rgb: np.ndarray, offset: tuple[int, int],
                model_name: str) -> None:
    """One block's CSV rows and GeoJSON features, in level-0 coordinates."""
    table = measure_nuclei(seg, hematoxylin(rgb, seg.labels > 0))
    table["centroid_y"] = table["centroid_y"] + offset[0]
    table["centroid_x"] = table["centroid_x"] + offset[1]
    for c, o in (("box_x0", 1), ("box_x1", 1), ("box_y0", 0), ("box_y1", 0)):
        table[c] = np.asarray(table[c]) + offset[o]
    from .report import write_nuclei_csv

    write_nuclei_csv(parts / f"{k}.csv", table)
    rings = polygons(seg.labels, seg.ids, offset)
    with open(parts / f"{k}.geojsonl", "w") as fh:
        for feature in geojson_features(rings, table, seg.ids, model_name):
            fh.write(json.dumps(feature) + "\n")


def _assemble(files: dict, n_blocks: int) -> None:
    """Concatenate the blocks' parts, in block order, into the final CSV and GeoJSON."""
    parts = files["parts"]
    with open(files["csv"], "w", newline="") as out_csv:
        header_written = False
        for k in range(n_blocks):
            path = parts / f"{k}.csv"
            if not path.is_file():
                continue
            with open(path, newline="") as fh:
                rows = list(csv.reader(fh))
            if rows and not header_written:
                out_csv.write(",".join(rows[0]) + "\n")
                header_written = True
            csv.writer(out_csv).writerows(rows[1:])
    with open(files["geojson"], "w") as out:
        out.write('{"type": "FeatureCollection", "features": [\n')
        first = True
        for k in range(n_blocks):
            path = parts / f"{k}.geojsonl"
            if not path.is_file():
                continue
            with open(path) as fh:
                for line in fh:
                    out.write(("" if first else ",\n") + line.rstrip("\n"))
                    first = False
        out.write("\n]}\n")
    shutil.rmtree(parts, ignore_errors=True)


def segment_slide_file(path: str | Path, out_dir: str | Path, model_path: str | Path, mpp: float | None = None,
                       thresholds: Thresholds = Thresholds(), device: str = "cpu",
                       region: tuple[int, int, int, int] | None = None, tissue_only: bool = True,
                       block_size: int = 4096, progress=None, tissue_model: str | Path | None = None) -> dict:
    """One slide, start to finish (or resumed, or found finished), as a ``summary.csv``
    row; the unit of work a dask worker runs. The model is loaded once per process
    (``cached_model``). With ``tissue_model`` the slide's tissue map is written too
    (``<stem>_tissue.geojson``, QuPath annotations) and the row gets its class."""
    from .checkpoint import cached_model
    from .predict import drain

    path = Path(path)
    model, info = cached_model(model_path, device)
    tissue = None
    slide = open_slide(path, mpp)
    try:
        result = drain(iter_segment_slide(slide, model, out_dir, region, thresholds, tissue_only, block_size,
                                          info.name, info.tissue_trained), progress)
        if tissue_model:
            tissue = slide_tissue(slide, tissue_model, Path(out_dir), result)
    finally:
        slide.close()
    note = f"{result.blocks} blocks, {result.skipped} without tissue"
    if result.finished_before:
        note = "already finished: skipped"
    elif result.resumed:
        note += f", {result.resumed} resumed"
    scale = scale_note(result.pixel_size, result.scale_estimate, model.config.mpp)
    note += f"; {scale}" if scale else ""
    row = {"image": str(path), "nuclei": result.nuclei, "mpp": round(result.pixel_size.mpp, 4) if result.pixel_size.mpp else "",
           "mpp_source": result.pixel_size.source, "tissue_class": "not trained", "note": note}
    if tissue is not None:
        probs = tissue.image_probs()
        row["tissue_class"] = tissue.classes[int(np.argmax(probs))]
        row.update({f"p_{c}": round(float(p), 4) for c, p in zip(tissue.classes, probs)})
    return row


def slide_tissue(slide: Slide, tissue_model: str | Path, out_dir: Path, result: SlideResult):
    """The tissue map of a segmented slide's region at its µm/px (or its estimate), written
    as ``<stem>_tissue.geojson``; None without a tissue model."""
    from .geojson import write_tissue_geojson
    from .predict import drain
    from .tissue import cached_tissue_model, iter_slide_tissue_map

    loaded = cached_tissue_model(tissue_model)
    mpp = result.pixel_size.mpp or result.scale_estimate
    if loaded is None or not mpp:
        return None
    tmap = drain(iter_slide_tissue_map(slide, loaded[0], result.region, mpp))
    write_tissue_geojson(outputs(out_dir, slide_stem(slide.path))["tissue"], tmap.windows, tmap.probs, tmap.classes)
    return tmap


def check_slide_outputs(path: str | Path, out_dir: str | Path, config, model_name: str, mpp: float | None,
                        thresholds: Thresholds, region: tuple[int, int, int, int] | None, block_size: int) -> None:
    """Before any work: raises ValueError (impossible block size or region) or
    :class:`SlideOutputsExist` (the folder holds another run's results for this slide)."""
    slide = open_slide(path, mpp)
    try:
        settings = run_settings(slide, config, region, thresholds, block_size, model_name)
    finally:
        slide.close()
    existing_run(out_dir, slide_stem(path), settings)
