"""Shared fixtures: tiny models and checkpoints, synthetic images. No ../shared data."""
from __future__ import annotations

from types import SimpleNamespace

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


@pytest.fixture(scope="session")
def random_tissue_model(tmp_path_factory):
    """A tissue classifier with a random head (and trunk): for the wiring, not the answers."""
    from napari_bach.tissue import TissueConfig, TissueInfo, TissueNet, save_tissue_model

    torch.manual_seed(0)
    net = TissueNet(TissueConfig.for_backbone("efficientnet_lite0", scales=(8.0,)))
    torch.nn.init.normal_(net.head.weight, std=0.5)
    return save_tissue_model(tmp_path_factory.mktemp("tissue") / "tissue.pt", net,
                             TissueInfo(name="test tissue", trained=True))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


class OracleModel(torch.nn.Module):
    """Stands in for the network: finds the bright squares in whatever tile it is given,
    including the cut-off parts at tile edges, exactly like a detector would."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transform = SimpleNamespace(channels_last=False)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0
        self.batches = []

    def forward(self, images, score_floor=None, regions=None):  # owns nothing: run_tiled filters
        self.calls += 1
        self.batches.append(len(images))
        self.seen = images[-1]
        return [self._one(image) for image in images]

    @staticmethod
    def _one(image):
        from skimage.measure import label, regionprops

        tile = image[0].numpy() < 0.5  # dark objects on white
        boxes, masks = [], []
        for r in regionprops(label(tile)):
            y0, x0, y1, x1 = r.bbox
            boxes.append([x0, y0, x1 - 1, y1 - 1])
            masks.append(torch.ones(1, 28, 28))
        n = len(boxes)
        return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4), "scores": torch.full((n,), 0.9),
                "masks": torch.stack(masks) if n else torch.zeros(0, 1, 28, 28),
                "tissue_logits": torch.tensor([0.0, 0.0, 3.0, 0.0])}


def image_with_squares(shape, squares):
    rgb = np.full((*shape, 3), 255, np.uint8)
    for y, x, s in squares:
        rgb[y:y + s, x:x + s] = 60
    return rgb
