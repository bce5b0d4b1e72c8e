"""Fine-tune a model on a user's corrected nuclei, on a time budget, and measure whether it
helped: the same loop in napari (*Fine-tune on corrections*) and on the command line.

At least one whole exported image is held out. It judges what a few images can be
trusted with: whether the lab's scale helps (before training) and whether the run's final
weights beat the starting ones, one candidate against another, so its before/after is not
inflated by having chosen among many (``Recipe.keep``; picking the best of many checks, the
early stop and re-chosen thresholds are there when asked, and measured worse). The starting
and the fine-tuned model are both scored on it (F1@0.5, AJI, PQ), so "did it help?" is
measured, and a run that did not help says so. Training is the usual :class:`Trainer`
warm-started from the model, with a :class:`Recipe` measured on ``bench/finetune.py``
(light augmentation: one lab's stain) and a replay of the original training data (when it
is there) so other tissue is not forgotten.
The result is written only into the folder given, as a new file named with the date and
the dataset; the starting model is never touched, nor is anything in the dataset.

A lab whose nuclei are smaller or larger than the model's reference size (the corrections'
median says so, exactly: they are labels) gets a model that zooms its images until their
nuclei look like the reference (:func:`lab_mpp`), as a custom cellpose model keeps its
labels' diameter: each image by its own nuclei (its labels in training, a first pass in
use), when they are smaller (larger) as the lab's, so other tissue is left at its own
(``ModelConfig.lab_mpp``). The held-out corrections confirm it before training, or it is
not used.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

from napari_bach.atomic import atomic_write
from napari_bach.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

from .datasets import Sample, load_exported
from .metrics import pooled_nucleus_metrics
from .sources import Source, load_sources

METRICS = ("f1", "aji", "pq", "dice", "precision", "recall")
SHARED_DATA = Path(__file__).resolve().parent / "shared_data.toml"  # a source checkout's training data list


def default_replay() -> Path | None:
    """The original training data list, when this checkout has ../shared/data beside it:
    replayed by default, so other tissue is not forgotten."""
    from .sources import read_data_list

    try:
        return SHARED_DATA if all(s.path.is_dir() for s in read_data_list(SHARED_DATA)) else None
    except (ValueError, OSError):
        return None


class FinetuneError(ValueError):
    """Input that cannot be fine-tuned on (the message says why): exit code 2."""


def split_corrections(samples: list[Sample], held_out: float = 0.25) -> tuple[list[Sample], list[Sample]]:
    """Whole images only: the last ``held_out`` share by name (at least one) is held out."""
    usable = sorted((s for s in samples if s.labels is not None and s.labels.max() > 0), key=lambda s: s.name)
    if len(usable) < 2:
        raise FinetuneError(f"{len(usable)} usable sample(s) with nuclei: at least 2 are needed (one is held out "
                            "to measure the result); export more corrected images")
    n_val = min(len(usable) - 1, max(1, round(len(usable) * held_out)))
    return usable[:-n_val], usable[-n_val:]


def score(model, samples: list[Sample]) -> dict:
    """Pooled nucleus metrics at the model's own thresholds (minimum area included)."""
    from .evaluate import score_nuclei

    t = model.config.default_score_threshold
    return pooled_nucleus_metrics(score_nuclei(model.eval(), samples, [t], model.config.default_nms_iou)[t])


def output_name(dataset: str | Path, when: datetime | None = None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(dataset).resolve().name).strip("-") or "dataset"
    return f"napari-bach-finetuned-{(when or datetime.now()).strftime('%Y-%m-%d-%H%M')}-{stem}.pt"


KEEPS = ("last", "best")  # Recipe.keep


@dataclass(frozen=True)
class Recipe:
    """How a model learns from a few corrected images. Each default was measured on
    ``bench/finetune.py`` (docs/training.md, "Fine-tuning")."""

    lr: float = 1e-3  # 2e-3 learnt no more and cost CPM-15 0.016 F1
    parts: str = "fpn+heads"  # train.PARTS: the trunk stays as trained on every source (all: CPM-15 -0.02..-0.04)
    ema: float = 0.99  # the averaged weights are checked and kept
    replay_share: float = 0.25  # share of crops from the original training data, when given
    # each replayed source drawn as often (else by its training weights, where CPM-15's 13
    # tiles are a few percent of the draws against CoNSeP's 600 patches, and drift)
    replay_even: bool = True
    # re-choose the score threshold on the held-out corrections: off, as measured, since a
    # few held-out images choose it by their noise (2 CoNSeP patches chose 0.45 for 0.3 and
    # halved the gain on the other patches of that image)
    choose_threshold: bool = False
    # re-choose the mask threshold for the kept weights on the held-out corrections (by
    # F1 + AJI + PQ, MASK_THRESHOLDS): off, as measured. Every move from the model's 0.6 that
    # two held-out CoNSeP patches chose (0.45, 0.5, 0.65) cost MoNuSeg PQ 0.012-0.025, and
    # 0.45 with a late check scored -0.007 F1 on the other patches (docs/training.md)
    choose_mask_threshold: bool = False
    # steps between checks on the held-out corrections, when something uses them
    # (checks_on_the_way, a caller's on_check); else the final weights alone are checked
    check_every: int = 25
    # checks without a better PQ before stopping; 0: the whole budget.
    # Stopping after 10 (250 steps) cut CoNSeP runs whose held-out corrections still rose
    # (best checks at 275-675 of ~720 steps): 15-min held-out F1 +0.022..+0.063 over 3 seeds
    # (mean +0.048) against +0.030..+0.055 (mean +0.038 over 4 runs) with 10
    patience: int = 0
    # the weights kept when they score better than the starting ones on the held-out
    # corrections (KEEPS): "last", the run's final weights (EMA at the end of the cosine);
    # "best", the best of ~40 checks. Picking the best of many checks by two held-out
    # patches picks their noise, and reports it as gain: over three CoNSeP runs of
    # 2026-12-04 the final weights scored +0.054..+0.083 F1 on the other held-out patches,
    # the best checks +0.044..+0.068 (seed 4 of 2026-12-03: best +0.104 on the held-out
    # corrections, -0.007 on the other patches). The held-out corrections then judge one
    # candidate, so their before/after is not inflated by the choice
    keep: str = "last"
    min_gain: float = 0.005  # PQ gain on the held-out corrections that counts as better
    # RoIs and anchors sampled per image and step, and the positive share of the RoIs: a
    # corrected image holds hundreds of nuclei, and the training defaults (128 RoIs and 128
    # anchors) let ~30 of them teach per step (overfitting two CoNSeP patches for 150 steps:
    # F1 0.61 -> 0.67 with those, 0.76 with 512 RoIs half positive and 256 anchors)
    box_batch: int = 512
    box_positive_fraction: float = 0.25  # as in training: a larger share inflates every score
    rpn_batch: int = 256
    # augment.AUGMENTS: "light" lets one lab's corrections teach (+0.02 F1 on CoNSeP against
    # +0.00 with the main training's wide colour range); "shipped" for corrections of many labs
    augment: str = "light"
    # segment images with nuclei like the corrections' at the scale where their median
    # nucleus is the model's reference size (cellpose's custom models keep their labels'
    # diameter alike), when the held-out corrections score better so before training:
    # CoNSeP's 4.45 µm nuclei (the model's 5.63 µm) are found better at 0.237 µm/px than at
    # 0.3 (+0.02 F1, start model); each image by its own nuclei, so MoNuSeg and CPM-15 keep theirs
    lab_scale: bool = True

    @property
    def checks_on_the_way(self) -> bool:
        """Whether anything of the recipe uses checks before the end (else only the final
        weights are checked, and the budget trains)."""
        return self.keep == "best" or self.patience > 0

    def __post_init__(self) -> None:
        from .train import PARTS

        if not self.lr > 0:
            raise FinetuneError(f"the learning rate must be above 0, got {self.lr:g}")
        if self.parts not in PARTS:
            raise FinetuneError(f"parts must be one of {', '.join(PARTS)}, got {self.parts!r}")
        from .augment import AUGMENTS

        if self.augment not in AUGMENTS:
            raise FinetuneError(f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.keep not in KEEPS:
            raise FinetuneError(f"keep must be one of {', '.join(KEEPS)}, got {self.keep!r}")
        if not 0 <= self.ema < 1:
            raise FinetuneError(f"ema must be from 0 to below 1, got {self.ema:g}")
        if not 0 < self.replay_share < 1:
            raise FinetuneError(f"the replay share must be between 0 and 1, got {self.replay_share:g}")
        if min(self.box_batch, self.rpn_batch, self.check_every) < 1 or not 0 < self.box_positive_fraction <= 1:
            raise FinetuneError("RoI and anchor batches and check_every must be at least 1, the positive share in (0, 1]")


def mix_replay(train: list[Sample], replay: list[Sample], share: float, even: bool) -> list[Sample]:
    """The corrections and the replayed training images, weighted so that ``share`` of the
    crops are replayed however many images each side has; ``even``: every replayed source
    (``Sample.group``) as often, so a source of two images is not drowned by one of hundreds."""
    if not replay:
        return list(train)
    if even:
        per_source: dict[str, float] = {}
        for s in replay:
            per_source[s.group] = per_source.get(s.group, 0.0) + s.weight
        replay = [replace(s, weight=s.weight / per_source[s.group]) for s in replay]
    weight = sum(s.weight for s in replay) * (1 - share) / share / len(train)
    return [replace(s, weight=weight) for s in train] + list(replay)


SCALE_TOLERANCE = 0.05  # a lab scale within 5% of the model's is the model's


def lab_mpp(samples: list[Sample], config) -> float:
    """The working µm/px at which the corrections' median nucleus (equivalent diameter,
    every nucleus of every image pooled) has the model's reference size
    (``config.nucleus_diameter_um``), within ``scale.ZOOM_LIMITS``; the model's own µm/px
    when it has no reference, the corrections have too few nuclei (``scale.MIN_NUCLEI``),
    or the two are within ``SCALE_TOLERANCE``."""
    from napari_bach.scale import MIN_NUCLEI, ZOOM_LIMITS, median_diameter

    if config.nucleus_diameter_um <= 0:
        return config.mpp
    diameter, n = median_diameter([s.labels for s in samples], [s.mpp for s in samples])
    if n < MIN_NUCLEI:
        return config.mpp
    ratio = diameter / config.nucleus_diameter_um
    ratio = min(max(ratio, ZOOM_LIMITS[0]), ZOOM_LIMITS[1])
    return config.mpp if abs(ratio - 1) < SCALE_TOLERANCE else round(config.mpp * ratio, 4)


def zoomed(sample: Sample, config) -> Sample:
    """A correction as the lab model of ``config`` (:func:`at_scale`) sees it in use: zoomed
    until its own median nucleus (its labels) has the reference size, when it is on the
    lab's side (``scale.lab_bounds``). The trainer rescales an image by its µm/px over the
    model's, so the µm/px it is given is the one its tiles are cut at in use."""
    from napari_bach.scale import lab_bounds

    working = sample.mpp * config.mpp / lab_mpp([sample], config)  # its nuclei at the reference size
    low, high = lab_bounds(sample.mpp, config)
    return replace(sample, mpp=min(max(working, low), high))


def at_scale(model, mpp: float):
    """``model`` as the model of a lab whose nuclei look like the reference at ``mpp``
    (``ModelConfig.lab_mpp``: an image with nuclei on the lab's side is zoomed by its own)."""
    from napari_bach.model import with_settings

    return model if mpp == model.config.mpp else with_settings(model, lab_mpp=mpp)


def zoom_phrase(start: float, lab: float) -> str:
    """How a lab model treats images, in words ("" when it is not one)."""
    if start == lab:
        return ""
    side = "smaller" if lab < start else "larger"
    return (f"images whose nuclei are {side} than the model's, as the corrections' are ({start / lab:.2f}× "
            "on the median), are zoomed until they look its size before segmenting; others keep their scale")


THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(14))  # 0.2–0.85, re-chosen on the held-out corrections
MASK_THRESHOLDS = tuple(round(0.4 + 0.05 * i, 2) for i in range(7))  # 0.4–0.7, one pass each


def choose_mask_threshold(model, held: list[Sample], thresholds=MASK_THRESHOLDS) -> tuple[float, dict[float, dict]]:
    """The mask threshold with the highest F1 + AJI + PQ on the held-out corrections (the
    model's own on a tie), and the metrics at each: one network pass per candidate."""
    from napari_bach.model import with_settings

    own = model.config.mask_threshold
    scores = {m: score(with_settings(model, mask_threshold=m), held) for m in sorted({*thresholds, own})}
    best = max(scores, key=lambda m: (round(sum(scores[m][k] for k in ("f1", "aji", "pq")), 6), m == own))
    return best, scores


def candidates(model, held: list[Sample], thresholds) -> dict[float, dict]:
    """Pooled metrics on the held-out corrections at each score threshold (one network pass)."""
    from .evaluate import score_nuclei

    per_t = score_nuclei(model.eval(), held, list(thresholds), model.config.default_nms_iou)
    return {t: pooled_nucleus_metrics(per_image) for t, per_image in per_t.items()}


def better(before: dict, after: dict, min_gain: float) -> bool:
    """Better means PQ up by ``min_gain`` with neither F1 nor AJI lower."""
    return after["pq"] >= before["pq"] + min_gain and after["f1"] >= before["f1"] and after["aji"] >= before["aji"]


def finetune(dataset: str | Path, model_path: str | Path, minutes: float, out: str | Path, device: str = "cpu",
             replay: list[Sample] | list[Source] | None = None, recipe: Recipe = Recipe(), seed: int = 0, threads: int = 0,
             on_event: Callable[[dict], None] | None = None, on_check: Callable[[object, int], None] | None = None
             ) -> dict:
    """Fine-tune ``model_path`` on the exported ``dataset`` for ``minutes`` (checks on the
    held-out corrections included); returns (and writes beside the new model) the
    before/after table, whose ``better`` says whether to use it.

    ``on_event`` receives ``{"event": "step"|"check"|"phase"|"done", ...}`` dicts: progress
    for the widget; ``on_check(model, step)`` sees the weights at each check (a benchmark's
    own images; nothing it does is chosen by). Raises :class:`FinetuneError` or
    :class:`CheckpointError` for unusable input."""
    import copy
    import time

    from napari_bach.model import with_settings

    from .augment import AUGMENTS
    from .train import Trainer, TrainConfig

    if not minutes > 0:
        raise FinetuneError(f"the time budget must be above 0 minutes, got {minutes:g}")
    emit = on_event or (lambda event: None)
    try:
        samples = load_exported(dataset)
    except FileNotFoundError as exc:
        raise FinetuneError(str(exc)) from None
    read_checkpoint(model_path)  # CheckpointError (a clear message) for anything that is not one
    start_model, start_info = load_checkpoint(model_path)
    cfg = start_model.config
    samples = [s if s.mpp else replace(s, mpp=cfg.mpp) for s in samples]  # unknown µm/px: as the plugin ran it
    train, held = split_corrections(samples)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    name = output_name(dataset)  # one name for the run folder, the model and its table
    run_dir = out / (name.removesuffix(".pt") + "-run")
    thresholds = sorted({*THRESHOLDS, cfg.default_score_threshold}) if recipe.choose_threshold \
        else [cfg.default_score_threshold]

    if replay and isinstance(replay[0], Source):  # the training images of these sources, not their held-out ones
        emit({"event": "phase", "message": "loading the original training data to replay"})
        replay = load_sources(replay).train
    emit({"event": "phase", "message": f"scoring the starting model on {len(held)} held-out image(s)"})
    t0 = time.perf_counter()
    start_scores = candidates(start_model, held, thresholds)
    # the final mask-threshold choice is one pass per candidate: its time is kept aside
    reserve_s = (time.perf_counter() - t0) * len(MASK_THRESHOLDS) if recipe.choose_mask_threshold else 0.0
    before = start_scores[cfg.default_score_threshold]
    scale = lab_mpp(train, cfg) if recipe.lab_scale else cfg.mpp
    if scale != cfg.mpp:  # kept only when the held-out corrections say so
        emit({"event": "phase", "message": f"scoring the starting model at {scale:g} µm/px (the corrections' "
                                           "nucleus size)"})
        lab_scores = candidates(at_scale(start_model, scale), held, thresholds)
        if better(before, lab_scores[cfg.default_score_threshold], recipe.min_gain):
            start_scores = lab_scores
        else:
            scale = cfg.mpp
    check_s = time.perf_counter() - t0
    best_t = max(thresholds, key=lambda t: start_scores[t]["pq"])
    best = {"step": 0, "threshold": best_t, "metrics": start_scores[best_t], "state": None}
    start, last = dict(best), {}  # the starting weights; the last check's
    total_s = minutes * 60
    steps_guess = max(10, int(total_s / 2))
    tcfg = TrainConfig(out=str(run_dir), max_hours=minutes / 60, max_steps=0, lr=recipe.lr, ema=recipe.ema,
                       train_parts=recipe.parts, warmup_steps=min(20, steps_guess // 5), checkpoint_every=50,
                       val_every_steps=10**9, seed=seed, device=device, threads=threads, patience=10**9,
                       augment=copy.deepcopy(AUGMENTS[recipe.augment]))
    lab_train = [zoomed(s, replace(cfg, lab_mpp=scale)) for s in train] if scale != cfg.mpp else train
    train_mix = mix_replay(lab_train, replay or [], recipe.replay_share, recipe.replay_even)
    sampling = replace(cfg, box_batch_size=recipe.box_batch, box_positive_fraction=recipe.box_positive_fraction,
                       rpn_batch_size=recipe.rpn_batch)  # training only: the saved model keeps cfg
    trainer = Trainer(sampling, tcfg, train_mix, {}, data_note=f"fine-tuned on {Path(dataset).name}",
                      license=start_info.license)
    trainer.init_from(model_path)
    trainer.seconds = check_s + reserve_s  # the budget is the user's clock: checks count
    emit({"event": "phase", "message": f"training on {len(train)} image(s) for {minutes:g} min"})
    stale = [0]
    checking = recipe.checks_on_the_way or on_check is not None

    def weights() -> dict:
        return {k: v.detach().clone() for k, v in trainer.shipped_model().state_dict().items()}

    def on_step(row: dict) -> bool:
        emit({"event": "step", "step": trainer.step, "loss": row["loss"], "elapsed_s": round(trainer.seconds, 1),
              "total_s": total_s})
        if (trainer.step % recipe.check_every or not checking) and trainer.progress() < 1.0:
            return False
        t0 = time.perf_counter()
        checked = at_scale(trainer.shipped_model(), scale)
        scores = candidates(checked, held, thresholds)
        trainer.shipped_model().train()
        t = max(thresholds, key=lambda t: scores[t]["pq"])
        last.update(step=trainer.step, threshold=t, metrics=scores[t])
        if scores[t]["pq"] > best["metrics"]["pq"]:
            best.update(step=trainer.step, threshold=t, metrics=scores[t],
                        state=weights() if recipe.keep == "best" else None)
            stale[0] = 0
        else:
            stale[0] += 1
        trainer.seconds += time.perf_counter() - t0
        if on_check is not None:
            on_check(checked, trainer.step)
            trainer.shipped_model().train()
        emit({"event": "check", "step": trainer.step, **{k: scores[t][k] for k in ("f1", "aji", "pq")},
              "best_pq": best["metrics"]["pq"], "best_step": best["step"]})
        return bool(recipe.patience) and stale[0] >= recipe.patience

    result = trainer.run(progress=False, on_step=on_step)
    if recipe.keep == "last":  # the final weights (the last check's), else the starting ones
        best = {**last, "state": weights()} if last and last["metrics"]["pq"] > start["metrics"]["pq"] else start
    tuned = copy.deepcopy(start_model)
    if best["state"] is not None:
        tuned.load_state_dict(best["state"])
    tuned = at_scale(with_settings(tuned, default_score_threshold=best["threshold"]), scale)
    after, mask_t = best["metrics"], cfg.mask_threshold
    if recipe.choose_mask_threshold:
        emit({"event": "phase", "message": "choosing the mask threshold on the held-out corrections"})
        t0 = time.perf_counter()
        mask_t, by_mask = choose_mask_threshold(tuned, held)
        tuned, after = with_settings(tuned, mask_threshold=mask_t), by_mask[mask_t]
        trainer.seconds += time.perf_counter() - t0 - reserve_s
    improved = better(before, after, recipe.min_gain)
    table = {"dataset": str(Path(dataset).resolve()), "start_model": str(Path(model_path).resolve()),
             "train_images": [s.name for s in train], "held_out_images": [s.name for s in held],
             "replay_images": len(replay or []),
             "steps": trainer.step, "minutes": round(trainer.seconds / 60, 2), "stopped_early": result["stopped_early"],
             "chosen_step": best["step"], "score_threshold": [cfg.default_score_threshold, best["threshold"]],
             "mask_threshold": [cfg.mask_threshold, mask_t], "mpp": [cfg.mpp, scale],
             "better": improved, "recipe": asdict(recipe),
             "before": {k: before[k] for k in METRICS}, "after": {k: after[k] for k in METRICS}}
    info = replace(start_info, name=f"{start_info.name} fine-tuned on {Path(dataset).name}",
                   steps=start_info.steps + best["step"],
                   hours=start_info.hours + trainer.seconds / 3600,
                   data=f"{start_info.data}; fine-tuned on {len(train)} corrected image(s) of {Path(dataset).name}",
                   notes=f"{start_info.notes}; fine-tuned from {Path(model_path).name}: weights of step "
                         f"{best['step']} of {trainer.step} ({trainer.seconds / 60:.1f} min, lr {recipe.lr:g}, "
                         f"{recipe.parts}), score threshold {best['threshold']:g}, mask threshold {mask_t:g}"
                         + (f"; {zoom_phrase(cfg.mpp, scale)}" if scale != cfg.mpp else "")
                         + ("" if improved else "; NOT better than the starting model on the held-out corrections"),
                   metrics={"finetune": table}, created=datetime.now().astimezone().isoformat(timespec="seconds"))
    path = save_checkpoint(out / name, tuned, info, half=True)
    table["model"] = str(path)
    atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(table, indent=1)))
    emit({"event": "done", **table})
    return table


def verdict(table: dict) -> str:
    """One plain sentence: use the new model, or keep the starting one."""
    if table["better"]:
        return "Better than the starting model on the held-out corrections: use the fine-tuned model."
    return (f"NOT better than the starting model on the held-out corrections: keep using "
            f"{Path(table['start_model']).name} (the fine-tuned model is saved, if you want to look at it).")


def format_table(table: dict) -> str:
    """The before/after table as the CLI prints it, with the held-out images named."""
    keys = ("f1", "aji", "pq", "dice")
    (t0, t1), (m0, m1) = table["score_threshold"], table["mask_threshold"]
    zoom = zoom_phrase(*table.get("mpp", (0, 0)))
    rows = [f"{'':<10}{'F1@0.5':>8}{'AJI':>8}{'PQ':>8}{'Dice':>8}   score / mask threshold",
            f"{'before':<10}" + "".join(f"{table['before'][k]:>8.3f}" for k in keys) + f"   {t0:g} / {m0:g}",
            f"{'after':<10}" + "".join(f"{table['after'][k]:>8.3f}" for k in keys) + f"   {t1:g} / {m1:g}",
            f"{'change':<10}" + "".join(f"{table['after'][k] - table['before'][k]:>+8.3f}" for k in keys)]
    return "\n".join(rows) + (f"\non {len(table['held_out_images'])} held-out image(s) "
                              f"({', '.join(table['held_out_images'])}); weights of step {table['chosen_step']} "
                              f"of {table['steps']} in {table['minutes']:g} min; model: {table.get('model', '')}\n"
                              + (f"Lab scale: {zoom}.\n" if zoom else "")
                              + verdict(table))
