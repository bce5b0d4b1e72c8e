"""Shared fixtures: tiny models and checkpoints, synthetic images. No ../shared data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_bach.checkpoint import ModelInfo, save_checkpoint
from napari_bach.config import ModelConfig
from napari_bach.model import build_model

torch.set_num_threads(2)


def tiny_config(**kw) -> ModelConfig:
    """The light architecture, small tiles and few candidates: fast on 2 CPU cores."""
    base = dict(tile_size=128, tile_overlap=32, rpn_post_nms_test=100, max_candidates_per_tile=50,
                rpn_post_nms_train=200, rpn_batch_size=64, box_batch_size=64)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_checkpoint(path, build_model(tiny_config()), ModelInfo(name="tiny-untrained"))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
