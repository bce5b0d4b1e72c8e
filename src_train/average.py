"""Average the weights of checkpoints along one run (stochastic weight averaging, a
"uniform soup").

Late in a cosine schedule the weights wander around a wide minimum; their mean usually
sits nearer its centre and generalises better than any one of them (Izmailov et al. 2018,
Wortsman et al. 2022). Frozen BatchNorm keeps the ImageNet statistics, so the mean needs
no BatchNorm re-estimation. Whether it helps is measured like any checkpoint, with
``evaluate`` on the held-out images.
"""
from __future__ import annotations

from pathlib import Path

from napari_bach.checkpoint import CheckpointError, ModelInfo, load_checkpoint
from napari_bach.config import INFERENCE_SETTINGS
from napari_bach.model import BachMaskRCNN


def _architecture(model: BachMaskRCNN) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in INFERENCE_SETTINGS}


def average_checkpoints(paths: list[str | Path]) -> tuple[BachMaskRCNN, ModelInfo]:
    """The mean of the checkpoints' floating-point weights, in the first one's model (its
    inference settings too) and with the provenance of the one trained longest. Raises
    :class:`CheckpointError` unless all share one architecture."""
    if len(paths) < 2:
        raise CheckpointError("averaging needs at least two checkpoints")
    model, info = load_checkpoint(paths[0])
    arch = _architecture(model)
    total = {k: v.double().clone() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    infos = [info]
    for path in paths[1:]:
        other, other_info = load_checkpoint(path)
        diff = sorted(k for k, v in _architecture(other).items() if arch.get(k) != v)
        if diff:
            raise CheckpointError(f"{Path(path).name} is another architecture than {Path(paths[0]).name} "
                                  f"({', '.join(diff)} differ): only checkpoints of one model average")
        for k, v in other.state_dict().items():
            if v.is_floating_point():
                total[k] += v.double()
        infos.append(other_info)
    model.load_state_dict({k: (v / len(paths)).float() if v.is_floating_point() else v for k, v in total.items()})
    latest = max(infos, key=lambda i: i.steps)
    steps = sorted(i.steps for i in infos)
    notes = f"{latest.notes}; " if latest.notes else ""
    averaged = ModelInfo(**{**latest.__dict__,
                            "notes": notes + f"weights averaged over {len(paths)} checkpoints "
                                             f"(steps {', '.join(map(str, steps))})"})
    return model, averaged
