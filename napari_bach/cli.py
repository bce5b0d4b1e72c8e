"""Command line: python -m napari_bach view|segment

view     open napari with an image (default: the built-in sample) and the Segment widget
segment  segment images headlessly with the same core as the widget
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .checkpoint import DEFAULT_MODEL
from .tissue import DEFAULT_TISSUE_MODEL
from .config import Thresholds
from .imageio import IMAGE_SUFFIXES, ImageReadError, read_image
from .pixelsize import FILE_TAGS, check_mpp, resolve_mpp
from .scale import scale_note

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class OutputClash(ValueError):
    """Two inputs would write the same output files, the output folder holds an earlier
    run's results for an input (without ``overwrite``) or cannot be written, or a slide's
    output folder holds another run's results: refused before any work, exit code 2."""


IMAGE_OUTPUTS = ("_labels.tif", "_nuclei.csv", "_nuclei.geojson", "_tissue.geojson")


def _check_outputs(jobs: list[Job], out: Path, overwrite: bool) -> None:
    """Before any work: the folder can be written, and no image's results from an earlier
    run would be silently replaced (slides have their own resume rules)."""
    if not overwrite:
        taken = [job.output(out, suffix) for job in jobs for suffix in IMAGE_OUTPUTS
                 if job.output(out, suffix).exists()]
        if taken:
            raise OutputClash(f"{len(taken)} result files of an earlier run are in {out} (e.g. {taken[0]}): "
                              "choose another --out, or --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise OutputClash(f"cannot write into {out}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Job:
    """One input image and where its outputs go (its path relative to the folder given,
    so ``a/x.png`` and ``b/x.png`` never write the same files)."""

    path: Path
    relative: Path

    def output(self, out: Path, suffix: str) -> Path:
        return out / self.relative.parent / f"{self.relative.name.split('.')[0]}{suffix}"


def find_jobs(inputs: list[str]) -> list[Job]:
    """Images and slides in the files and folders given (folders searched recursively), each once."""
    from .slideio import SLIDE_SUFFIXES

    suffixes = IMAGE_SUFFIXES + SLIDE_SUFFIXES
    jobs, seen = [], set()
    for item in map(Path, inputs):
        found = ([Job(p, p.relative_to(item)) for p in sorted(item.rglob("*")) if p.suffix.lower() in suffixes]
                 if item.is_dir() else [Job(item, Path(item.name))])
        for job in found:
            key = job.path.resolve()
            if key not in seen:
                seen.add(key)
                jobs.append(job)
    return jobs


def output_collisions(jobs: list[Job]) -> list[list[Path]]:
    """Groups of inputs that would write the same output files (same folder and stem)."""
    by_output: dict[Path, list[Path]] = {}
    for job in jobs:
        by_output.setdefault(job.relative.parent / job.relative.name.split(".")[0], []).append(job.path)
    return [paths for paths in by_output.values() if len(paths) > 1]


@dataclass(frozen=True)
class SlideOptions:
    """How slides are segmented: region, block size, and where (this process or dask)."""

    region: tuple[int, int, int, int] | None = None  # y0 x0 y1 x1, level-0 pixels
    block_size: int = 4096
    workers: int = 0  # > 0: a dask LocalCluster with this many workers
    scheduler: str | None = None  # address of an existing dask scheduler


def segment_slides(jobs: list[Job], out: Path, model_path, mpp, thresholds, device, options: SlideOptions,
                   log: Callable[[str], None], tissue_model: str | Path | None = None) -> tuple[list[dict], int]:
    """Every slide streamed to disk, here or one task per slide on a dask cluster (each
    worker loads the model once; results are written by the workers)."""
    from .slide import segment_slide_file

    def args(job: Job) -> tuple:
        folder = job.output(out, "").parent
        folder.mkdir(parents=True, exist_ok=True)
        return (str(job.path), str(folder), str(model_path), mpp, thresholds, device, options.region, True,
                options.block_size, None, tissue_model)

    rows, failed = [], 0
    if not (options.workers or options.scheduler):
        from tqdm import tqdm

        for n, job in enumerate(jobs, start=1):
            # a bar per slide, in tiles, with tqdm's rate and time left (in a log too, every 10 s)
            bar = tqdm(desc=f"[slide {n}/{len(jobs)}] {job.path.name}", unit="tile", file=sys.stderr,
                       mininterval=0.5 if sys.stderr.isatty() else 10)

            def report(step, bar=bar):
                bar.total = step.total
                bar.n = step.done
                bar.set_postfix_str(step.message.split(",")[0], refresh=False)
                bar.refresh() if sys.stderr.isatty() else bar.update(0)
            try:
                rows.append(segment_slide_file(*args(job)[:9], progress=report, tissue_model=tissue_model))
            except Exception as exc:  # one bad slide must not stop the others
                rows.append({"image": str(job.path), "error": f"{exc.__class__.__name__}: {exc}"})
                log(f"{job.path.name}: failed: {exc}")
                failed += 1
            finally:
                bar.close()
            if "error" not in rows[-1]:
                log(f"[slide {n}/{len(jobs)}] {job.path.name}: {rows[-1]['nuclei']} nuclei ({rows[-1]['note']})")
        return rows, failed
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None if options.scheduler else LocalCluster(n_workers=options.workers, threads_per_worker=1)
    with cluster or nullcontext(), Client(options.scheduler or cluster) as client:
        where = options.scheduler or f"a local cluster of {options.workers} workers"
        log(f"dask: {len(jobs)} slides on {where}")
        futures = {client.submit(segment_slide_file, *args(job), pure=False): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                rows.append(future.result())
                log(f"{job.path.name}: {rows[-1]['nuclei']} nuclei ({rows[-1].get('note', '')})")
            except Exception as exc:
                rows.append({"image": str(job.path), "error": f"{exc.__class__.__name__}: {exc}"})
                log(f"{job.path.name}: failed: {exc}")
                failed += 1
    return rows, failed


def _check_slides(jobs: list[Job], out: Path, config, model_name: str, mpp, thresholds: Thresholds,
                  options: SlideOptions) -> None:
    """Refuse, before any work, slides whose outputs would mix with another run's or whose
    block size cannot hold the context around it (a slide that cannot be opened fails
    later, on its own, as any unreadable input)."""
    from .slide import SlideOutputsExist, check_slide_outputs

    problems = []
    for job in jobs:
        try:
            check_slide_outputs(job.path, job.output(out, "").parent, config, model_name, mpp, thresholds,
                                options.region, options.block_size)
        except (SlideOutputsExist, ValueError) as exc:
            problems.append(f"{job.path.name}: {exc}")
        except Exception:  # unreadable: reported with the other failed inputs
            continue
    if problems:
        raise OutputClash("; ".join(problems))


def segment_files(inputs: list[str], out: str | Path, model_path: str | Path = DEFAULT_MODEL,
                  mpp: float | None = None, thresholds: Thresholds = Thresholds(), device: str = "cpu",
                  log: Callable[[str], None] = print, progress: bool = False,
                  slides: SlideOptions = SlideOptions(), tta: bool = False,
                  tissue_model: str | Path | None = DEFAULT_TISSUE_MODEL, overwrite: bool = False,
                  gray_pass: bool = True) -> tuple[Path, int]:
    """Segment every image and slide; write ``<stem>_labels.tif``, ``<stem>_nuclei.csv`` and
    ``<stem>_nuclei.geojson`` (QuPath; slides: ``_labels.zarr`` instead of the TIFF) beside the input's
    relative path under ``out``, and ``summary.csv`` with each image's tissue class (from
    ``tissue_model``; images larger than one BACH field also get ``<stem>_tissue.geojson``,
    the map's fields as QuPath annotations) and a warning for colours unlike the training
    images'. ``mpp`` is used for files that do not say. Returns the summary path and the
    number of inputs that failed. Raises :class:`OutputClash` before any work when two
    inputs would write the same files, ``out`` cannot be written, or it holds earlier
    results for these images (unless ``overwrite``). Every file is written under a
    temporary name and renamed: a full disk leaves no half file, that image is reported
    failed and the others are still tried. ``summary.csv`` keeps the rows of images of
    earlier runs into ``out`` that this run did not redo."""
    from tqdm import tqdm

    from .atomic import atomic_write
    from .checkpoint import cached_model
    from .colour import check_colours, model_input
    from .geojson import write_tissue_geojson
    from .tissue import cached_tissue_model, tissue_map
    from .export import write_labels_tiff
    from .geojson import write_geojson
    from .measure import hematoxylin, measure_nuclei
    from .predict import predict
    from .report import write_nuclei_csv
    from .slideio import is_slide

    jobs = find_jobs(inputs)
    clashes = output_collisions(jobs)
    if clashes:
        names = "; ".join(" and ".join(map(str, group)) for group in clashes)
        raise OutputClash(f"these inputs would write the same output files: {names}. Rename one, or segment them "
                         "into different --out folders")
    model, info = cached_model(model_path, device)  # a wrong model stops here, before anything is written
    tissue = cached_tissue_model(tissue_model, required=Path(tissue_model) != DEFAULT_TISSUE_MODEL) if tissue_model else None
    cfg = model.config
    limits = thresholds.resolve(cfg)
    log(f"model: {'; '.join(info.status_parts(tissue[1].status if tissue else None))}; score ≥ {limits.score:g}, "
        f"NMS IoU {limits.nms_iou:g}, nuclei ≥ {limits.min_area:g} µm²")
    out = Path(out)
    slide_jobs = [job for job in jobs if is_slide(job.path)]
    jobs = [job for job in jobs if job not in slide_jobs]
    _check_slides(slide_jobs, out, cfg, info.name, mpp, thresholds, slides)
    _check_outputs(jobs, out, overwrite)
    slide_rows, slide_failed = (segment_slides(slide_jobs, out, model_path, mpp, thresholds, device, slides, log,
                                               tissue_model if tissue else None) if slide_jobs else ([], 0))
    classes = list(tissue[0].config.classes if tissue else cfg.tissue_classes)
    rows, failed = [], 0
    images = tqdm(jobs, desc="images", unit="image", disable=not progress, position=0)
    for n, job in enumerate(images, start=1):
        try:
            data = read_image(job.path)
        except ImageReadError as exc:
            log(f"[{n}/{len(jobs)}] skipped: {exc}")
            rows.append({"image": str(job.path), "error": str(exc)})
            failed += 1
            continue
        for note in data.notices:
            log(f"[{n}/{len(jobs)}] {job.path.name}: {note}")
        # the file's own tags win; a given --mpp beats the guess from a BACH-style name or folder
        pixel_size = (data.pixel_size if data.pixel_size.source == FILE_TAGS or mpp is None and data.pixel_size.known
                      else resolve_mpp(fallback=mpp))
        tiles = tqdm(desc=job.path.name, unit="tile", disable=not progress, position=1, leave=False)

        def tick(step, bar=tiles):
            bar.total = step.total
            bar.n = step.done
            bar.refresh()

        colours = check_colours(data.rgb)
        pixels, grayed = model_input(data.rgb, colours, gray_pass)  # unfamiliar colours: a grayscale pass
        det = predict(pixels, model, pixel_size, tissue_trained=info.tissue_trained, progress=tick, tta=tta,
                      score_floor=limits.score)  # masks only for nuclei the threshold keeps
        tiles.close()
        scale = scale_note(pixel_size, det.scale_estimate, cfg.mpp)
        if scale:
            log(f"[{n}/{len(jobs)}] {job.path.name}: {scale}"
                + ("" if pixel_size.known else "; sizes in pixels only (give --mpp)"))
        seg = det.refilter(limits.score, limits.nms_iou, min_area=limits.min_area_px(det.segmented_mpp, cfg)).consecutive()
        table = measure_nuclei(seg, hematoxylin(data.rgb, seg.labels > 0))
        probs, tmap = det.tissue_probs, None
        if tissue is not None:  # at the µm/px the nuclei were segmented at (the estimate when unknown)
            tmap = tissue_map(data.rgb, pixel_size.mpp or det.segmented_mpp or cfg.mpp, tissue[0])
            probs = tmap.image_probs()
        try:
            job.output(out, "").parent.mkdir(parents=True, exist_ok=True)
            atomic_write(job.output(out, "_labels.tif"), lambda p: write_labels_tiff(p, seg.labels, pixel_size.mpp))
            atomic_write(job.output(out, "_nuclei.csv"), lambda p: write_nuclei_csv(p, table))
            atomic_write(job.output(out, "_nuclei.geojson"), lambda p: write_geojson(p, seg, table, info.name))
            if tmap is not None and len(tmap.windows) > 1:
                atomic_write(job.output(out, "_tissue.geojson"),
                             lambda p: write_tissue_geojson(p, tmap.windows, tmap.probs, tmap.classes))
        except OSError as exc:  # a full disk, a folder made read-only meanwhile: this image fails, not the run
            log(f"[{n}/{len(jobs)}] {job.path.name}: could not write its results ({exc.strerror or exc})")
            rows.append({"image": str(job.path), "error": f"could not write results: {exc.strerror or exc}"})
            failed += 1
            continue
        row = {"image": str(job.path), "mpp": round(pixel_size.mpp, 4) if pixel_size.mpp else "",
               "mpp_source": pixel_size.source, "nuclei": len(seg.ids), "tissue_class": "not trained",
               "tissue_class_from_file": data.tissue_class or ""}
        if scale:
            row["note"] = scale
        if probs is not None:
            row["tissue_class"] = classes[int(np.argmax(probs))]
            row.update({f"p_{c}": round(float(p), 4) for c, p in zip(classes, probs)})
        row["colour_warning"] = colours.warning + ("; segmented as grayscale" if grayed else "")
        rows.append(row)
        log(f"[{n}/{len(jobs)}] {job.path.name}: {len(seg.ids)} nuclei, {pixel_size.describe()}, "
            f"tissue class {row['tissue_class']}" + (f"; WARNING: {colours.warning}" if colours.warning else ""))
    rows += slide_rows
    failed += slide_failed
    total = len(jobs) + len(slide_jobs)
    fields = ["image", "mpp", "mpp_source", "nuclei", "tissue_class", *[f"p_{c}" for c in classes],
              "tissue_class_from_file", "colour_warning", "note", "error"]
    rows = _earlier_rows(out / "summary.csv", {r["image"] for r in rows}, fields) + rows

    def write_summary(path: Path) -> None:
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(out / "summary.csv", write_summary)
    log(f"{total - failed} of {total} images segmented, {failed} failed; summary: {out / 'summary.csv'}")
    return out / "summary.csv", failed


def _earlier_rows(path: Path, redone: set[str], fields: list[str]) -> list[dict]:
    """Rows of an existing ``summary.csv`` for images this run did not redo (kept, so a
    folder's summary covers every image segmented into it)."""
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("image") not in redone]


def display_problem() -> str | None:
    """Why napari cannot open a window here (Linux without an X or Wayland display), or None."""
    import os

    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM", "").startswith(("offscreen", "vnc")):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    return ("napari needs a display and none is set (no DISPLAY or WAYLAND_DISPLAY). Run it from a desktop "
            "session, over ssh -X, or on a virtual screen: xvfb-run -a python -m napari_bach view ... "
            "(for results without a window, use python -m napari_bach segment)")


def check_readable(image: str) -> None:
    """Raises ImageReadError (or SlideReadError) for a file napari-bach cannot open."""
    from .slideio import is_slide, open_slide

    if is_slide(image):
        open_slide(image).close()
    else:
        read_image(image)


def view(image: str | None, segment: bool, screenshot: str | None = None) -> int:
    """Open napari with the image (or the sample) and the docked widget; returns the exit
    code (a screenshot run fails when the image or the segmentation does)."""
    import napari

    from . import model  # noqa: F401  torch before napari's OpenGL canvas (see napari_bach/__init__.py)

    viewer = napari.Viewer()
    if image:
        viewer.open(image, plugin="napari-bach")
    else:
        viewer.open_sample("napari-bach", "synthetic_he")
    _, widget = viewer.window.add_plugin_dock_widget("napari-bach", "Segment nuclei")
    viewer.window._qt_window.resize(1500, 950)
    if segment or screenshot:
        widget.run()
    if screenshot:
        from qtpy.QtWidgets import QApplication

        while widget.worker is not None:
            QApplication.processEvents()
        for _ in range(5):  # let the dock re-layout its wrapped status lines
            QApplication.processEvents()
        for toast in _notification_toasts(viewer):  # they would cover the scale bar and the image
            toast.close()
        QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False)
        ok = widget.result is not None
        viewer.close()
        if not ok:
            print(f"error: segmentation failed: {widget._status.value}", file=sys.stderr)
        return EXIT_OK if ok else EXIT_FAILED
    napari.run()
    return EXIT_OK


def _notification_toasts(viewer) -> list:
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    return viewer.window._qt_window.findChildren(NapariQtNotification)


# -- argument types: a bad value is an argparse error (exit 2, one line), not a traceback --
def _mpp(text: str) -> float:
    try:
        return check_mpp(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _score(text: str) -> float:
    try:
        return Thresholds(score=float(text)).score
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _iou(text: str) -> float:
    try:
        return Thresholds(nms_iou=float(text)).nms_iou
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _min_area(text: str) -> float:
    try:
        return Thresholds(min_area=float(text)).min_area
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MIN_BLOCK, MAX_BLOCK = 1024, 32768


def _block_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of pixels") from None
    if not MIN_BLOCK <= value <= MAX_BLOCK:
        raise argparse.ArgumentTypeError(f"{value} px: blocks are {MIN_BLOCK}–{MAX_BLOCK} px (each carries a tile's "
                                         "margin of context on every side, 14 µm for the shipped model; memory "
                                         "grows with the block)")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more workers, or leave --workers out to run here")
    return value


def _device(text: str) -> str:
    from .predict import available_devices

    devices = available_devices()
    if text not in devices:
        known = "a device name such as cpu, cuda or mps" if text not in ("cuda", "mps") else "not available here"
        raise argparse.ArgumentTypeError(f"{text!r} is {known}; this machine has: {', '.join(devices)}")
    return text


def _roi(text: str) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(float(v)) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give the box as X0,Y0,X1,Y1 in level-0 pixels") from None
    if x1 <= x0 or y1 <= y0 or min(x0, y0) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: X1 > X0 ≥ 0 and Y1 > Y0 ≥ 0 are needed")
    return y0, x0, y1, x1


def _out_folder(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m napari_bach", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("view", help="open napari with an image (default: the sample) and the widget")
    v.add_argument("image", nargs="?", help="image file to open (default: the built-in synthetic sample)")
    v.add_argument("--segment", action="store_true", help="segment right away with the default model")
    v.add_argument("--screenshot", metavar="PNG", help="segment, save a window screenshot to this PNG and quit")
    s = sub.add_parser("segment", help="segment images headlessly",
                       description="Writes OUT/<relative path>_labels.tif (int32 labels with µm/px tags), "
                                   "OUT/<relative path>_nuclei.csv, OUT/<relative path>_nuclei.geojson (QuPath "
                                   "detections: File > Import objects) and OUT/summary.csv. Exit code 1 when any "
                                   "input could not be read, 2 for wrong arguments or model.")
    s.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and folders (searched recursively)")
    s.add_argument("--out", required=True, type=_out_folder, help="output folder (created if missing)")
    s.add_argument("--model", default=str(DEFAULT_MODEL), help="napari-bach checkpoint (default: the shipped model)")
    s.add_argument("--tissue-model", default=str(DEFAULT_TISSUE_MODEL),
                   help="tissue classifier (default: the shipped one; 'none': no tissue class)")
    s.add_argument("--mpp", type=_mpp, default=None,
                   help="µm/px for images whose file does not record it (TIFF tags win; it beats the 0.42 "
                        "guessed from a BACH name or class folder; default: none, such images are measured in pixels)")
    s.add_argument("--score-threshold", type=_score, default=None,
                   help="keep nuclei scoring at least this, 0–1 (default: the model's own)")
    s.add_argument("--nms-iou", type=_iou, default=None,
                   help="overlap above which the weaker of two nuclei is dropped (default: the model's own)")
    s.add_argument("--min-area", type=_min_area, default=None, metavar="UM2",
                   help="drop nuclei smaller than this many µm² (pixels at the model's µm/px when the image's "
                        "µm/px is unknown; default: the model's own, 3 µm² for the shipped model)")
    s.add_argument("--device", type=_device, default="cpu", help="cpu, or cuda/mps where present (default: %(default)s)")
    s.add_argument("--tta", action="store_true", help="flip test-time augmentation: 4 passes per tile (images)")
    s.add_argument("--gray-pass", choices=["auto", "off"], default="auto",
                   help="auto: an image whose colours are unlike the training images' (colour_warning) is "
                        "segmented as a grayscale copy, which measured better on such images (default: auto)")
    s.add_argument("--overwrite", action="store_true",
                   help="replace results of an earlier run into --out for the same images (default: refuse)")
    w = s.add_argument_group("whole slides (.svs, .ndpi, .scn, pyramidal or very large TIFF)")
    w.add_argument("--roi", type=_roi, default=None, metavar="X0,Y0,X1,Y1",
                   help="segment only this box of each slide (level-0 pixels; default: all tissue)")
    w.add_argument("--block-size", type=_block_size, default=4096,
                   help="level-0 pixels per streamed block; memory grows with it, not with the slide "
                        "(default: %(default)s)")
    w.add_argument("--workers", type=_positive, default=0, metavar="N",
                   help="segment slides on a dask LocalCluster of N (1 or more) worker processes "
                        "(default: in this process)")
    w.add_argument("--dask-scheduler", default=None, metavar="ADDRESS",
                   help="submit one task per slide to this dask.distributed scheduler (e.g. tcp://host:8786)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "view":
        if args.image and not Path(args.image).is_file():
            print(f"error: {args.image}: no such file", file=sys.stderr)
            return EXIT_FAILED  # as any image that cannot be read (README)
        problem = display_problem()
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_USAGE
        if args.image:
            from .slideio import SlideReadError

            try:
                check_readable(args.image)
            except (ImageReadError, SlideReadError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_FAILED
        return view(args.image, args.segment, args.screenshot)
    from .checkpoint import CheckpointError
    from .tissue import TissueModelError

    try:
        slides = SlideOptions(args.roi, args.block_size, args.workers, args.dask_scheduler)
        _, failed = segment_files(args.inputs, args.out, args.model, args.mpp,
                                  Thresholds(args.score_threshold, args.nms_iou, args.min_area), args.device,
                                  log=lambda m: print(m, file=sys.stderr), progress=sys.stderr.isatty(), slides=slides,
                                  tta=args.tta, tissue_model=None if args.tissue_model == "none" else args.tissue_model,
                                  overwrite=args.overwrite, gray_pass=args.gray_pass == "auto")
    except (CheckpointError, TissueModelError, OutputClash) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # summary.csv could not be written after all (the disk filled meanwhile)
        print(f"error: could not write {exc.filename or 'the summary'}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if failed else EXIT_OK
