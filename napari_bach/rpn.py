"""torchvision's region proposal network with sparse anchor labelling for training.

torchvision labels anchors from the dense IoU matrix of every nucleus with every anchor:
~74,000 anchors × ~300 nuclei per 384² crop, a third of a CPU training step, though a
nucleus overlaps only the few hundred anchors around it. Anchors lie on a grid per FPN
level, so the anchors that can overlap a box are a window of cells per anchor shape:
IoUs are computed for those pairs only, and the labels are torchvision's (same thresholds,
same low-quality matches, same ties broken towards the lowest index as ``max`` does).

At inference torchvision decodes a box for every anchor (~100,000 per tile) and then keeps
the top ``pre_nms_top_n`` per level: here each level's top anchors are chosen from the
objectness first and only their boxes are made, with torchvision's arithmetic.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou


class NucleusRPN(RegionProposalNetwork):
    """RegionProposalNetwork with sparse anchor labelling in training and boxes decoded
    for each level's top anchors only at inference; both give torchvision's results."""

    def forward(self, images, features, targets=None):
        if not self.training:
            return self._propose(images, list(features.values())), {}
        self._grids = [(f.shape[-2], f.shape[-1]) for f in features.values()]  # for the sparse matching
        self._image_size = images.tensors.shape[-2:]
        return super().forward(images, features, targets)

    def _propose(self, images, features: list[Tensor]) -> list[Tensor]:
        objectness, deltas = self.head(features)
        first = features[0]
        self.anchor_generator.set_cell_anchors(first.dtype, first.device)
        height, width = images.tensors.shape[-2:]
        n = first.shape[0]
        batch = torch.arange(n, device=first.device)[:, None]
        boxes, scores, counts = [], [], []
        for obj, delta, base in zip(objectness, deltas, self.anchor_generator.cell_anchors):
            _, a, h, w = obj.shape
            flat = obj.permute(0, 2, 3, 1).reshape(n, -1)  # anchor (y·w + x)·a + k, as torchvision orders them
            top, idx = flat.topk(min(self.pre_nms_top_n(), flat.shape[1]), dim=1)
            cell, k = idx // a, idx % a
            y, x = cell // w, cell % w
            codes = delta.view(n, a, 4, h, w).permute(0, 1, 3, 4, 2)[batch, k, y, x]
            sx, sy = x * (width // w), y * (height // h)  # int shifts, as grid_anchors makes them
            anchors = base[k] + torch.stack([sx, sy, sx, sy], -1)
            boxes.append(self.box_coder.decode_single(codes.reshape(-1, 4), anchors.reshape(-1, 4)).view(n, -1, 4))
            scores.append(top)
            counts.append(top.shape[1])
        kept, _ = self.filter_proposals(torch.cat(boxes, 1), torch.cat(scores, 1), images.image_sizes, counts)
        return kept

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]):
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            n = anchors_per_image.shape[0]
            if gt_boxes.numel() == 0:
                labels.append(torch.zeros(n, device=anchors_per_image.device))
                matched_gt_boxes.append(torch.zeros_like(anchors_per_image))
                continue
            matched = self.match(gt_boxes, anchors_per_image)
            matched_gt_boxes.append(gt_boxes[matched.clamp(min=0)])
            label = (matched >= 0).float()
            label[matched == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
            label[matched == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
        return labels, matched_gt_boxes

    def match(self, gt: Tensor, anchors: Tensor) -> Tensor:
        """torchvision's ``Matcher`` result, from the overlapping (nucleus, anchor) pairs only."""
        from .predict import drain

        layout = self._layout(anchors)
        if layout is None:  # grid unknown: torchvision's dense matching
            return self.proposal_matcher(box_iou(gt, anchors))
        matches, lonely = drain(iter_sparse_match(self.proposal_matcher, gt, anchors, *layout))
        if lonely:  # a box overlapping no anchor: torchvision's dense rule applies
            return self.proposal_matcher(box_iou(gt, anchors))
        return matches

    def _overlapping_pairs(self, gt: Tensor, anchors: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """(nucleus, anchor) index pairs whose boxes can overlap (None: grid unknown)."""
        layout = self._layout(anchors)
        return (None, None) if layout is None else overlapping_pairs(gt, anchors, *layout)

    def _layout(self, anchors: Tensor):
        """(grids, strides, anchors per cell) of this forward's anchors, or None if they are not its grid."""
        grids = getattr(self, "_grids", None)
        per_cell = self.anchor_generator.num_anchors_per_location()
        if grids is None or sum(h * w * a for (h, w), a in zip(grids, per_cell)) != anchors.shape[0]:
            return None
        return grids, [(self._image_size[0] // h, self._image_size[1] // w) for h, w in grids], per_cell


def overlapping_pairs(gt: Tensor, anchors: Tensor, grids, strides, per_cell) -> tuple[Tensor, Tensor]:
    """(nucleus, anchor) index pairs whose boxes can overlap. ``anchors`` are laid out as
    torchvision's grid anchors are, level after level, each an (h, w, a) grid of cells
    ``strides`` (sy, sx) apart; its first cell need not be the image's (a part of the grid)."""
    pairs_g, pairs_a = [gt.new_zeros(0, dtype=torch.long)], [gt.new_zeros(0, dtype=torch.long)]
    offset = 0
    for (h, w), (sy, sx), a in zip(grids, strides, per_cell):
        if h * w == 0:
            continue
        level = anchors[offset : offset + h * w * a].view(h, w, a, 4)
        base = level[0, 0]  # each shape's box at the first cell: a × 4
        # first and last cell, per nucleus and shape, whose anchor overlaps the box
        x_lo = (torch.floor((gt[:, None, 0] - base[None, :, 2]) / sx).long() + 1).clamp(0, w - 1)
        x_hi = (torch.ceil((gt[:, None, 2] - base[None, :, 0]) / sx).long() - 1).clamp(-1, w - 1)
        y_lo = (torch.floor((gt[:, None, 1] - base[None, :, 3]) / sy).long() + 1).clamp(0, h - 1)
        y_hi = (torch.ceil((gt[:, None, 3] - base[None, :, 1]) / sy).long() - 1).clamp(-1, h - 1)
        wx, wy = int((x_hi - x_lo + 1).max()), int((y_hi - y_lo + 1).max())
        if wx > 0 and wy > 0:
            steps_x = torch.arange(wx, device=gt.device)
            steps_y = torch.arange(wy, device=gt.device)
            valid = ((steps_x <= (x_hi - x_lo)[..., None])[:, :, None, :]
                     & (steps_y <= (y_hi - y_lo)[..., None])[:, :, :, None])  # G × a × wy × wx
            g, k, dy, dx = valid.nonzero(as_tuple=True)
            cell = (y_lo[g, k] + dy) * w + x_lo[g, k] + dx
            pairs_g.append(g)
            pairs_a.append(offset + cell * a + k)
        offset += h * w * a
    return torch.cat(pairs_g), torch.cat(pairs_a)


def iter_sparse_match(matcher, gt: Tensor, anchors: Tensor, grids, strides, per_cell, chunk: int = 0):
    """torchvision's ``Matcher(box_iou(gt, anchors))`` from the overlapping pairs only, ``chunk``
    nuclei at a time (0: all at once) with a yield between chunks, so memory stays bounded
    by the chunk and a caller can report progress or stop. Returns the matches and whether
    some box overlaps no anchor (it then has no low-quality match here; torchvision's dense
    rule would make every anchor it does not touch its match)."""
    from .predict import Progress  # predict imports the model, which imports this module

    n, m = anchors.shape[0], gt.shape[0]
    best = torch.zeros(n, dtype=anchors.dtype, device=anchors.device)
    first = torch.full((n,), m, dtype=torch.long, device=anchors.device)
    low_quality, lonely = [], False
    step = chunk or max(1, m)
    for start in range(0, m, step):
        g, a = overlapping_pairs(gt[start:start + step], anchors, grids, strides, per_cell)
        g = g + start
        iou = _paired_iou(gt[g], anchors[a])
        before = best[a]
        best.scatter_reduce_(0, a, iou, "amax")
        now = best[a]
        # the lowest nucleus index among ties, as a dense max over nuclei returns; an earlier
        # chunk's nuclei have lower indices, so only anchors this chunk raised change
        raised = (iou == now) & (now > before)
        first[a[raised]] = m
        first.scatter_reduce_(0, a[raised], g[raised], "amin")
        if matcher.allow_low_quality_matches:
            per_gt = torch.zeros(min(step, m - start), dtype=iou.dtype, device=iou.device).scatter_reduce_(
                0, g - start, iou, "amax")
            lonely |= bool((per_gt <= 0).any())
            low_quality.append(a[(iou == per_gt[g - start]) & (iou > 0)])
        yield Progress(min(start + step, m), m, "labelling anchors")
    all_matches = torch.where(first < m, first, torch.zeros_like(first))
    matches = all_matches.clone()
    matches[best < matcher.low_threshold] = matcher.BELOW_LOW_THRESHOLD
    matches[(best >= matcher.low_threshold) & (best < matcher.high_threshold)] = matcher.BETWEEN_THRESHOLDS
    if low_quality:
        top = torch.cat(low_quality)
        matches[top] = all_matches[top]
    return matches, lonely


def _paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of a[i] with b[i] (torchvision's ``box_iou`` arithmetic, pairwise)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area_a + area_b - inter)
