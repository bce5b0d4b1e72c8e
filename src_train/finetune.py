"""Fine-tune a model on a user's corrected nuclei, on a time budget, and measure whether it
helped: the same loop in napari (*Fine-tune on corrections*) and on the command line.

At least one whole exported image is held out. The starting model and the fine-tuned one
are both scored on it (F1@0.5, AJI, PQ at the model's own thresholds), so the answer to
"did it help?" is measured, not claimed. Training is the usual :class:`Trainer` warm-started
from the model (``init_from``): same augmentation, a small learning rate, an optional
replay of the original training data so other tissue is not forgotten. The result is
written only into the folder given, as a new file named with the date and the dataset;
the starting model is never touched, nor is anything in the dataset.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable

from napari_bach.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

from .datasets import Sample, load_exported
from .metrics import pooled_nucleus_metrics

METRICS = ("f1", "aji", "pq", "dice", "precision", "recall")


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


def finetune(dataset: str | Path, model_path: str | Path, minutes: float, out: str | Path, device: str = "cpu",
             replay: list[Sample] | None = None, lr: float = 1e-4, seed: int = 0, threads: int = 0,
             on_event: Callable[[dict], None] | None = None) -> dict:
    """Fine-tune ``model_path`` on the exported ``dataset`` for ``minutes`` of training;
    returns (and writes beside the new model) the before/after table.

    ``on_event`` receives ``{"event": "step"|"phase"|"done", ...}`` dicts: progress for the
    widget. Raises :class:`FinetuneError` or :class:`CheckpointError` for unusable input."""
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

    emit({"event": "phase", "message": f"scoring the starting model on {len(held)} held-out image(s)"})
    before = score(start_model, held)
    steps_guess = max(10, int(minutes * 60 / 2))
    tcfg = TrainConfig(out=str(run_dir), max_hours=minutes / 60, max_steps=0, lr=lr, warmup_steps=min(20, steps_guess // 5),
                       checkpoint_every=25, val_every_steps=10**9, seed=seed, device=device, threads=threads,
                       patience=10**9)
    if replay:  # half the crops from the corrections, half from the original data, however many images each
        share = sum(s.weight for s in replay) / len(train)
        train_mix = [replace(s, weight=share) for s in train] + list(replay)
    else:
        train_mix = train
    trainer = Trainer(cfg, tcfg, train_mix, {}, data_note=f"fine-tuned on {Path(dataset).name}",
                      license=start_info.license)
    trainer.init_from(model_path)
    emit({"event": "phase", "message": f"training on {len(train)} image(s) for {minutes:g} min"})
    total_s = minutes * 60

    def on_step(row: dict) -> None:
        emit({"event": "step", "step": trainer.step, "loss": row["loss"], "elapsed_s": round(trainer.seconds, 1),
              "total_s": total_s})

    trainer.run(progress=False, on_step=on_step)
    tuned = trainer.shipped_model().eval()
    emit({"event": "phase", "message": "scoring the fine-tuned model on the held-out image(s)"})
    after = score(tuned, held)
    table = {"dataset": str(Path(dataset).resolve()), "start_model": str(Path(model_path).resolve()),
             "train_images": [s.name for s in train], "held_out_images": [s.name for s in held],
             "steps": trainer.step, "minutes": round(trainer.seconds / 60, 2),
             "before": {k: before[k] for k in METRICS}, "after": {k: after[k] for k in METRICS}}
    info = replace(start_info, name=f"{start_info.name} fine-tuned on {Path(dataset).name}",
                   steps=start_info.steps + trainer.step,
                   data=f"{start_info.data}; fine-tuned on {len(train)} corrected image(s) of {Path(dataset).name}",
                   notes=f"{start_info.notes}; fine-tuned {trainer.step} steps in {trainer.seconds / 60:.1f} min "
                         f"(lr {lr:g}) from {Path(model_path).name}",
                   metrics={"finetune": table}, created=datetime.now().astimezone().isoformat(timespec="seconds"))
    path = save_checkpoint(out / name, tuned, info, half=True)
    table["model"] = str(path)
    path.with_suffix(".json").write_text(json.dumps(table, indent=1))
    emit({"event": "done", **table})
    return table


def format_table(table: dict) -> str:
    rows = [f"{'':<10}{'F1@0.5':>8}{'AJI':>8}{'PQ':>8}{'Dice':>8}",
            *(f"{name:<10}" + "".join(f"{table[key][k]:>8.3f}" for k in ("f1", "aji", "pq", "dice"))
              for name, key in (("before", "before"), ("after", "after")))]
    delta = {k: table["after"][k] - table["before"][k] for k in ("f1", "aji", "pq", "dice")}
    rows.append(f"{'change':<10}" + "".join(f"{delta[k]:>+8.3f}" for k in ("f1", "aji", "pq", "dice")))
    return "\n".join(rows) + (f"\non {len(table['held_out_images'])} held-out image(s) "
                              f"({', '.join(table['held_out_images'])}); {table['steps']} steps in "
                              f"{table['minutes']:g} min; model: {table.get('model', '')}")
