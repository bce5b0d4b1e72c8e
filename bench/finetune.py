"""Benchmark: fine-tuning on a user's corrections, on real tissue, on the CPU.

Three MoNuSeg breast images from ../shared/data stand for a pathologist's corrected
exports (written with napari-bach's own export, in a temporary folder): two train, the
last by name is held out. The model is fine-tuned for ``--minutes`` (the same
``finetune`` as the dock and ``python -m src_train finetune``), then both models are scored
on the held-out breast image and on a held-out image of another organ and source
(CPM-15 image12, brain/head-and-neck, not used by the shipped model's training), to show
nothing else got worse.

    python bench/finetune.py [--minutes 10] [--model napari_bach/models/default.pt] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BREAST = ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-A7-A13F-01Z-00-DX1", "TCGA-AR-A1AK-01Z-00-DX1")


def main() -> None:
    from napari_bach.checkpoint import DEFAULT_MODEL, load_checkpoint
    from napari_bach.export import export_sample
    from src_train.datasets import load_monuseg
    from src_train.finetune import finetune, format_table, score
    from src_train.sources import Source

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="keep the fine-tuned model here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    monuseg = {s.name: s for s in load_monuseg(SHARED / "monuseg-train")}
    other = next(s for s in Source("cpm15", SHARED / "cpm15", 0.25, {"image0[1-7]": 0.5}).load() if s.name == "image12")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "breast-corrections"
        for name in BREAST:
            s = monuseg[name]
            export_sample(dataset, name, s.image, s.labels, s.mpp, None, {"source": "MoNuSeg (bench/finetune.py)"})
        out = Path(args.out or Path(tmp) / "models")
        table = finetune(dataset, args.model, args.minutes, out, threads=args.threads)
        start, _ = load_checkpoint(args.model)
        tuned, _ = load_checkpoint(table["model"])
        other_before, other_after = score(start, [other]), score(tuned, [other])
    print(format_table(table))
    print(f"other organ (CPM-15 image12): F1 {other_before['f1']:.3f} -> {other_after['f1']:.3f}, "
          f"AJI {other_before['aji']:.3f} -> {other_after['aji']:.3f}, PQ {other_before['pq']:.3f} -> {other_after['pq']:.3f}")
    print(json.dumps({"held_out": {"before": table["before"], "after": table["after"]},
                      "other_organ": {"before": other_before, "after": other_after},
                      "steps": table["steps"], "minutes": table["minutes"]}))


if __name__ == "__main__":
    main()
