"""Sparse anchor labelling gives torchvision's labels exactly, for less work."""
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from conftest import tiny_config
from napari_bach.model import build_model


def _boxes(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 8)
    wh = 3 + torch.rand(n, 2, generator=g) * 60
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
    return torch.cat([boxes, boxes[:3]])  # exact duplicates: ties broken as torchvision does


def test_sparse_matching_equals_torchvision_dense_matching():
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    rpn = model.rpn
    for size, n, seed in ((128, 40, 0), (160, 200, 1), (96, 1, 2)):
        x = torch.rand(1, 3, size, size)
        feats = model.backbone(x)
        images = ImageList(x, [(size, size)])
        rpn._grids, rpn._image_size = [f.shape[-2:] for f in feats.values()], x.shape[-2:]
        anchors = rpn.anchor_generator(images, list(feats.values()))[0]
        gt = _boxes(n, size, seed)
        pairs, _ = rpn._overlapping_pairs(gt, anchors)
        assert pairs is not None and len(pairs) < 0.5 * len(gt) * len(anchors)  # sparse, not the fallback
        sparse = rpn.match(gt, anchors)
        dense = rpn.proposal_matcher(box_iou(gt, anchors))
        assert torch.equal(sparse, dense)
        assert (sparse >= 0).sum() >= len(gt) - 3  # every nucleus has an anchor (its best one)


def test_training_losses_equal_torchvisions_rpn():
    from torchvision.models.detection.rpn import RegionProposalNetwork

    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    gt = _boxes(30, 128, 3)
    target = {"boxes": gt, "labels": torch.ones(len(gt), dtype=torch.int64),
              "masks": torch.zeros(len(gt), 128, 128, dtype=torch.uint8)}
    x = [torch.rand(3, 128, 128)]
    images, targets = model.transform(x, [target])
    feats = model.backbone(images.tensors)
    torch.manual_seed(5)
    _, ours = model.rpn(images, feats, targets)
    model.rpn.__class__ = RegionProposalNetwork  # torchvision's own labelling, same weights
    torch.manual_seed(5)
    _, theirs = model.rpn(images, feats, targets)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


def test_inference_proposals_equal_torchvisions_rpn():
    """Decoding only each level's top anchors gives torchvision's proposals exactly."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    model.rpn._pre_nms_top_n["testing"] = 50  # below a level's anchor count: the top-k matters
    x = [torch.rand(3, 160, 128), torch.rand(3, 150, 120)]
    with torch.no_grad():
        images, _ = model.transform(x)
        feats = model.backbone(images.tensors)
        ours, _ = model.rpn(images, feats)
        model.rpn.__class__ = RegionProposalNetwork
        theirs, _ = model.rpn(images, feats)
    assert len(ours[0]) > 20
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_chunked_sparse_matching_equals_dense_matching():
    """Nuclei matched a few at a time (bounded memory, a yield between chunks) give the
    same matches as all at once and as torchvision's dense matrix, ties included."""
    from napari_bach.rpn import iter_sparse_match

    model = build_model(tiny_config()).train()
    rpn = model.rpn
    size = 160
    x = torch.rand(1, 3, size, size)
    feats = model.backbone(x)
    anchors = rpn.anchor_generator(ImageList(x, [(size, size)]), list(feats.values()))[0]
    grids = [tuple(f.shape[-2:]) for f in feats.values()]
    strides = [(size // h, size // w) for h, w in grids]
    gt = _boxes(150, size, 4)
    gen = iter_sparse_match(rpn.proposal_matcher, gt, anchors, grids, strides,
                            rpn.anchor_generator.num_anchors_per_location(), chunk=7)
    steps = []
    while True:
        try:
            steps.append(next(gen))
        except StopIteration as end:
            matches, lonely = end.value
            break
    assert len(steps) == -(-len(gt) // 7) and (steps[-1].done, steps[-1].total) == (len(gt), len(gt)) and not lonely
    assert torch.equal(matches, rpn.proposal_matcher(box_iou(gt, anchors)))
