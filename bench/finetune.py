"""Benchmark: does fine-tuning on a user's corrections help, on real tissue, on the CPU?

A lab's corrections stand in as exact labels of one source where the shipped model is
weak, exported with napari-bach's own ``export_sample`` into a temporary dataset; other
images of the *same* source are held out of the dataset and scored before and after, with
every other validation group of ``src_train/shared_data.toml`` (the replay must keep them).

- ``consep``: CoNSeP's held-out source image (``test_1``, colon, 16 patches of 256²): the
  first 8 patches are the corrections, the last 8 are held out.
- ``e2``: MoNuSeg breast hospital E2: TCGA-E2-A14V cut into four 500² corrections,
  TCGA-E2-A1B5 (another patient) held out.

Fine-tuning is the same ``finetune`` as the dock and ``python -m src_train finetune``
(replay of the training data on, as there by default), with ``--minutes`` of budget.

    python bench/finetune.py --source consep --minutes 15 [--threads 2] [--lr ... --parts ... --ema ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA_LIST = ROOT / "src_train" / "shared_data.toml"
E2_CORRECTIONS, E2_HELD = "TCGA-E2-A14V-01Z-00-DX1", "TCGA-E2-A1B5-01Z-00-DX1"


def quadrants(sample, size: int = 500) -> list:
    """A 1000² image as four exported-size corrections (labels relabelled per piece)."""
    from skimage.segmentation import relabel_sequential

    out = []
    for i, y in enumerate(range(0, sample.image.shape[0] - size + 1, size)):
        for j, x in enumerate(range(0, sample.image.shape[1] - size + 1, size)):
            labels = relabel_sequential(sample.labels[y:y + size, x:x + size])[0]
            out.append(replace(sample, image=sample.image[y:y + size, x:x + size].copy(), labels=labels,
                               name=f"{sample.name}_q{i}{j}"))
    return out


def lab(source: str, val: dict) -> tuple[list, list, dict]:
    """(corrections, same-source held-out images, the other validation groups)."""
    others = {k: list(v) for k, v in val.items()}
    if source == "consep":
        patches = sorted(others.pop("consep"), key=lambda s: s.name)
        return patches[:8], patches[8:], others
    breast = others.pop("monuseg")
    by_name = {s.name: s for s in breast}
    others["monuseg (A7, AR)"] = [s for s in breast if "-E2-" not in s.name]
    return quadrants(by_name[E2_CORRECTIONS]), [by_name[E2_HELD]], others


def main() -> None:
    from napari_bach.checkpoint import DEFAULT_MODEL, load_checkpoint
    from napari_bach.export import export_sample
    from napari_bach.model import with_settings
    from src_train.augment import AUGMENTS
    from src_train.finetune import KEEPS, Recipe, at_scale, finetune, format_table, score
    from src_train.sources import load_sources, read_data_list

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=["consep", "e2"], default="consep")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-replay", action="store_true")
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--parts", default=Recipe.parts)
    parser.add_argument("--ema", type=float, default=Recipe.ema)
    parser.add_argument("--patience", type=int, default=Recipe.patience)
    parser.add_argument("--keep", choices=KEEPS, default=Recipe.keep)
    parser.add_argument("--choose-threshold", action="store_true")
    parser.add_argument("--choose-mask-threshold", action="store_true",
                        help="re-choose the mask threshold on the held-out corrections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--track", action="store_true",
                        help="also score the same-source held-out images at every check (slower; diagnostics)")
    parser.add_argument("--check-every", type=int, default=Recipe.check_every)
    parser.add_argument("--replay-share", type=float, default=Recipe.replay_share)
    parser.add_argument("--box-batch", type=int, default=Recipe.box_batch)
    parser.add_argument("--box-positive", type=float, default=Recipe.box_positive_fraction)
    parser.add_argument("--rpn-batch", type=int, default=Recipe.rpn_batch)
    parser.add_argument("--augment", choices=list(AUGMENTS), default=Recipe.augment)
    parser.add_argument("--no-lab-scale", action="store_true", help="keep the model's µm/px")
    parser.add_argument("--replay-by-weight", action="store_true",
                        help="replay each source by its training weight instead of each as often")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--out", default=None, help="keep the fine-tuned model here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe(lr=args.lr, parts=args.parts, ema=args.ema, patience=args.patience, keep=args.keep,
                    choose_threshold=args.choose_threshold, choose_mask_threshold=args.choose_mask_threshold,
                    check_every=args.check_every,
                    replay_share=args.replay_share, box_batch=args.box_batch,
                    box_positive_fraction=args.box_positive, rpn_batch=args.rpn_batch,
                    augment=args.augment, replay_even=not args.replay_by_weight, lab_scale=not args.no_lab_scale)
    split = load_sources(read_data_list(DATA_LIST))
    corrections, held, others = lab(args.source, split.val)
    groups = {f"{args.source} held out (same source)": held, **others}
    start, _ = load_checkpoint(args.model)
    before = {name: score(start, samples) for name, samples in groups.items()}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / f"{args.source}-corrections"
        for s in corrections:
            export_sample(dataset, s.name, s.image, s.labels, s.mpp, None, {"source": "bench/finetune.py"})
        out = Path(args.out or Path(tmp) / "models")
        t0 = time.perf_counter()
        track = []  # the same-source held-out images at every check: how the run went (chooses nothing)

        # the checks on the way are the user's budget too: made only where something uses them
        checked = args.track or recipe.checks_on_the_way
        weights = {}  # the last check's and the best check's (by the held-out corrections' PQ) weights

        def on_check(model, step: int) -> None:
            weights["last"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if args.track:
                m, c = score(model, held), score(model, corrections)
                track.append({"step": step, **{k: m[k] for k in ("f1", "aji", "pq")},
                              "corrections": {k: c[k] for k in ("f1", "aji", "pq")}})
                print(f"step {step}: held out F1 {m['f1']:.3f} AJI {m['aji']:.3f} PQ {m['pq']:.3f} | "
                      f"corrections F1 {c['f1']:.3f} AJI {c['aji']:.3f}", flush=True)

        checks = []  # the held-out corrections' own scores at every check (what chooses)

        def on_event(event: dict) -> None:
            if event["event"] == "check":
                checks.append({k: event[k] for k in ("step", "f1", "aji", "pq")})
                if checked and event["best_step"] == event["step"]:
                    weights["best"], weights["best_step"] = weights["last"], event["step"]

        table = finetune(dataset, args.model, args.minutes, out, replay=None if args.no_replay else split.train,
                         recipe=recipe, seed=args.seed, threads=args.threads, on_check=on_check if checked else None,
                         on_event=on_event)
        wall = time.perf_counter() - t0
        tuned, _ = load_checkpoint(table["model"])
        after = {name: score(tuned, samples) for name, samples in groups.items()}
        # the new weights at the starting model's threshold and µm/px: what the weights did
        # (forgetting included), apart from the lab's settings
        kept = with_settings(tuned, default_score_threshold=start.config.default_score_threshold,
                             mask_threshold=start.config.mask_threshold, lab_mpp=start.config.lab_mpp)
        weights_only = {name: score(kept, samples) for name, samples in groups.items()}
        # the starting weights as the lab's model: what the zoom alone did
        scale_only = {name: score(at_scale(start, table["mpp"][1]), samples) for name, samples in groups.items()}
        # the other Recipe.keep (when the run checked on the way): the best check's weights
        # for "last", the last's for "best"
        other = "best" if args.keep == "last" else "last"
        other_keep = {}
        if checked:
            tuned.load_state_dict(weights.get(other, start.state_dict()))
            other_keep = {name: score(tuned, samples) for name, samples in groups.items()}
    print(" ".join(["python", *sys.argv]))
    print(f"fine-tuning: {wall / 60:.1f} min wall, {table['steps']} steps, weights of step {table['chosen_step']}, "
          f"score threshold {table['score_threshold'][0]:g} -> {table['score_threshold'][1]:g}, "
          f"mask threshold {table['mask_threshold'][0]:g} -> {table['mask_threshold'][1]:g}, "
          f"µm/px {table['mpp'][0]:g} -> {table['mpp'][1]:g}")
    print("in the dataset's own held-out corrections:\n" + format_table(table))
    print(f"\n{'group':<34}{'images':>7}   F1 before/after      AJI before/after     PQ before/after")
    for name in groups:
        b, a = before[name], after[name]
        print(f"{name:<34}{len(groups[name]):>7}   " + "   ".join(
            f"{b[k]:.3f} {a[k]:.3f} {a[k] - b[k]:+.3f}" for k in ("f1", "aji", "pq")))
    other_step = (checks[-1]["step"] if checks else 0) if other == "last" else weights.get("best_step", 0)
    views = [("the new weights at the starting thresholds and µm/px (forgetting):", weights_only),
             ("the starting weights as the lab's model (the zoom alone):", scale_only)]
    if other_keep:
        views.append((f"--keep {other} instead (step {other_step}):", other_keep))
    for title, figures in views:
        print(title)
        for name in groups:
            b, a = before[name], figures[name]
            print(f"{name:<34}{len(groups[name]):>7}   " + "   ".join(
                f"{b[k]:.3f} {a[k]:.3f} {a[k] - b[k]:+.3f}" for k in ("f1", "aji", "pq")))
    result = {"command": " ".join(["python", *sys.argv]), "wall_min": round(wall / 60, 2), "finetune": table,
              "track": track, "checks": checks,
              "groups": {name: {"images": [s.name for s in groups[name]], "before": before[name], "after": after[name],
                                "after_at_start_settings": weights_only[name],
                                "start_at_lab_mpp": scale_only[name],
                                **({f"keep_{other}": other_keep[name]} if other_keep else {})}
                         for name in groups}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
