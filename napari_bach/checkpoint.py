"""One checkpoint format: weights + config + provenance (+ optional training state).

Metadata says plainly what a model was trained on and whether its heads are trained at
all, so the plugin never presents random weights or an untrained tissue head as results.
"""
from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .atomic import atomic_write
from .config import ModelConfig
from .model import BachMaskRCNN, build_model

FORMAT = "napari-bach-checkpoint"
VERSION = 1
DEFAULT_MODEL = Path(__file__).parent / "models" / "default.pt"


class CheckpointError(ValueError):
    """A file that is not a usable napari-bach checkpoint; the message says why."""


@dataclass
class ModelInfo:
    """Provenance stored with the weights."""

    name: str = "untrained"
    nuclei_trained: bool = False
    tissue_trained: bool = False
    data: str = ""
    license: str = ""
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    steps: int = 0  # every training step behind these weights, warm starts included
    metrics: dict = field(default_factory=dict)
    notes: str = ""
    hours: float = 0.0  # training time behind these weights, warm starts included (0: not recorded)

    @property
    def status(self) -> str:
        """One line for the UI: what this model can and cannot be trusted for."""
        return ", ".join(self.status_parts())

    def status_parts(self, tissue_status: str | None = None) -> list[str]:
        """The nuclei's status and the tissue class's: ``tissue_status`` (a separate tissue
        classifier's) replaces this model's own tissue head's."""
        if not self.nuclei_trained:
            return [f"{self.name}: UNTRAINED weights, masks are meaningless", *([tissue_status] if tissue_status else [])]
        trained = f"{self.steps} steps" + (f" in {self.hours:.1f} h" if self.hours else "")
        own = "tissue class trained" if self.tissue_trained else "tissue class not trained"
        return [f"{self.name}: nuclei trained ({trained})", tissue_status or own]


def save_checkpoint(path: str | Path, model: BachMaskRCNN, info: ModelInfo, half: bool = False,
                    train_state: dict | None = None) -> Path:
    """Write atomically (temporary name, then rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
             for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
               "info": info.__dict__.copy(), "state_dict": state}
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load and validate the raw payload; raises :class:`CheckpointError` with the reason.
    ``mmap`` leaves the tensors on disk until touched (for reading the config only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path.name}: not a PyTorch checkpoint (truncated or another file type)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise CheckpointError(f"{path.name}: cannot be loaded ({exc.__class__.__name__}: {str(exc)[:200]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path.name}: not a napari-bach checkpoint (a plain state_dict or another tool's model?); "
            "train or convert one with `python -m src_train`"
        )
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"{path.name}: checkpoint version {payload['version']} is newer than this plugin")
    return payload


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[BachMaskRCNN, ModelInfo]:
    """Build the model from the stored config and load its weights (fp16 files become fp32)."""
    payload = read_checkpoint(path)
    name = Path(path).name
    try:
        config = ModelConfig.from_dict(payload["config"])
        info = ModelInfo(**payload["info"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: invalid config or metadata ({exc})") from exc
    model = build_model(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        raise CheckpointError(f"{name}: weights do not match the stored config ({str(exc).splitlines()[1].strip()})") from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{name}: weights do not match the stored config "
            f"(missing {len(result.missing_keys)}, unexpected {len(result.unexpected_keys)}: "
            f"{(result.missing_keys + result.unexpected_keys)[:3]})"
        )
    return model.to(device).eval(), info


def read_config(path: str | Path) -> ModelConfig:
    """A checkpoint's config without reading its weights (memory-mapped load)."""
    payload = read_checkpoint(path, mmap=True)
    try:
        return ModelConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{Path(path).name}: invalid config ({exc})") from exc


def cached_model(path: str | Path, device: str = "cpu") -> tuple[BachMaskRCNN, ModelInfo]:
    """One loaded copy per checkpoint file and device, shared by every widget and run (as
    stardist-napari's ``get_model``); a file rewritten on disk is loaded afresh."""
    path = Path(path).resolve()
    stamp = path.stat().st_mtime_ns if path.is_file() else 0
    return _cached(str(path), stamp, device)


@functools.lru_cache(maxsize=4)
def _cached(path: str, stamp: int, device: str) -> tuple[BachMaskRCNN, ModelInfo]:
    return load_checkpoint(path, device)
