"""RoIAlign through ``grid_sample``: torchvision's numbers, ~3× faster on CPU features.

torchvision's CPU ``roi_align`` kernel copies channels-last feature maps to NCHW on every
call and then walks them channel by channel; ``torch.nn.functional.grid_sample`` reads
channels-last maps as they are. With a fixed number of samples per bin (``sampling_ratio``
≥ 1, which the config enforces) RoIAlign *is* bilinear sampling at a regular grid of points
per RoI followed by a mean per bin, so the two give the same values (float rounding aside;
a test holds them together). The pyramid level of each RoI is torchvision's own rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _setup_scales


def roi_align(features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float,
              sampling_ratio: int) -> Tensor:
    """``torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
    aligned=False)`` for ``sampling_ratio`` ≥ 1: ``rois`` is K×5 (image index, x0 y0 x1 y1);
    returns K×C×oh×ow."""
    if sampling_ratio < 1:
        raise ValueError("grid RoIAlign needs a fixed number of samples per bin (sampling_ratio ≥ 1)")
    (oh, ow), s = output_size, sampling_ratio
    _, channels, height, width = features.shape
    out = features.new_zeros((len(rois), channels, oh, ow))
    start = rois[:, 1:3] * spatial_scale
    size = (rois[:, 3:5] * spatial_scale - start).clamp(min=1.0)  # aligned=False: at least one pixel
    # sample k of an axis sits at start + bin * (k + 0.5) / s, bins and samples in order
    ys = start[:, 1, None] + size[:, 1, None] / oh * ((torch.arange(oh * s, device=rois.device) + 0.5) / s)
    xs = start[:, 0, None] + size[:, 0, None] / ow * ((torch.arange(ow * s, device=rois.device) + 0.5) / s)
    # outside [-1, H] a sample is 0; inside, coordinates clamp to the border pixels
    valid = ((ys >= -1) & (ys <= height))[:, :, None] & ((xs >= -1) & (xs <= width))[:, None, :]
    gy = ys.clamp(0, height - 1) * (2 / max(height - 1, 1)) - 1
    gx = xs.clamp(0, width - 1) * (2 / max(width - 1, 1)) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1).to(features.dtype)
    index = rois[:, 0].long()
    for b in index.unique().tolist():
        sel = torch.where(index == b)[0]
        k = len(sel)
        samples = F.grid_sample(features[b:b + 1], grid[sel].reshape(1, k * oh * s, ow * s, 2),
                                mode="bilinear", padding_mode="border", align_corners=True)
        samples = samples.reshape(channels, k, oh * s, ow * s) * valid[sel].to(samples.dtype)
        if s > 1:
            samples = samples.reshape(channels, k, oh, s, ow, s).mean((3, 5))
        out[sel] = samples.permute(1, 0, 2, 3).to(out.dtype)
    return out


class GridRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same levels, scales and output) pooling each
    level with :func:`roi_align`."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                result[idx] = roi_align(feature, rois[idx], self.output_size, scale, self.sampling_ratio)
        return result
