"""The grid-sample RoIAlign gives torchvision's values, forward and backward (to float
rounding: grid_sample normalises coordinates to [-1, 1] and back)."""
from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align

from napari_bach.roi_align import GridRoIAlign, roi_align


def _rois(n: int, size: float, images: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * size * 1.1 - size * 0.05  # some past the borders
    wh = torch.rand(n, 2, generator=gen) * size * 0.3 + torch.rand(n, 1, generator=gen) * 2  # some under a pixel
    index = torch.randint(0, images, (n, 1), generator=gen).float()
    return torch.cat([index, xy, xy + wh], 1)


@pytest.mark.parametrize("sampling_ratio", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_matches_torchvision(sampling_ratio, channels_last):
    gen = torch.Generator().manual_seed(sampling_ratio)
    features = torch.randn(2, 8, 24, 20, generator=gen)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_(True)
    rois = _rois(60, 80, 2, gen)
    ours = roi_align(features, rois, (7, 7), 0.25, sampling_ratio)
    theirs = tv_roi_align(features, rois, (7, 7), 0.25, sampling_ratio, aligned=False)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    weights = torch.randn(theirs.shape, generator=gen)
    grad_ours, = torch.autograd.grad((ours * weights).sum(), features)
    grad_theirs, = torch.autograd.grad((theirs * weights).sum(), features)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-4, rtol=1e-4)


def test_roi_align_refuses_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 2, 2]]), (2, 2), 1.0, 0)


def test_multiscale_pooler_matches_torchvision():
    gen = torch.Generator().manual_seed(0)
    features = OrderedDict((str(i), torch.randn(2, 4, 64 >> i, 48 >> i, generator=gen)) for i in range(4))
    features["pool"] = torch.randn(2, 4, 4, 3, generator=gen)
    boxes = [_rois(40, 180, 1, gen)[:, 1:].clamp(0, 190) for _ in range(2)]
    for b in boxes:
        b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 0.5)
    shapes = [(256, 192)] * 2
    names = ["0", "1", "2", "3"]
    theirs = MultiScaleRoIAlign(names, 14, 2)(features, boxes, shapes)
    ours = GridRoIAlign(names, 14, 2)(features, boxes, shapes)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
