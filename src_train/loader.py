"""Training data as a ``torch.utils.data`` pipeline that keeps a GPU fed.

:class:`CropStream` is an endless, indexable stream of augmented crops: crop ``i`` of
rank ``r`` is a pure function of ``(seed, r, i)``. Loader workers can therefore run in any
number and order, each rank of a DistributedDataParallel run sees its own crops, and a
resumed run continues at crop ``step × batch`` with exactly the crops it would have seen.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import AugmentConfig, augment, to_tensor
from .datasets import Sample, instances_from_labels


def make_target(labels: np.ndarray, tissue: int = -1) -> dict[str, torch.Tensor]:
    boxes, masks, _ = instances_from_labels(labels)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64),
            "masks": torch.from_numpy(masks), "tissue": torch.tensor(tissue)}


def crop_seed(seed: int, rank: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, rank, index]).generate_state(1, np.uint64)[0] >> 1)


class CropStream(Dataset):
    """Augmented crops drawn from ``samples``: images with nucleus labels, or tissue-only
    images (``labels`` None), which yield a tissue class and no boxes."""

    def __init__(self, samples: list[Sample], augment_cfg: AugmentConfig, seed: int = 0, rank: int = 0) -> None:
        self.images = [torch.from_numpy(np.ascontiguousarray(s.image)) for s in samples]  # uint8, shared by workers
        self.labels = [None if s.labels is None else torch.from_numpy(s.labels.astype(np.int32)) for s in samples]
        self.tissue = [s.tissue for s in samples]
        self.weights = torch.tensor([s.weight for s in samples], dtype=torch.float64)
        self.uniform = bool((self.weights == self.weights[:1]).all()) if samples else True
        self.cfg, self.seed, self.rank = augment_cfg, seed, rank
        if augment_cfg.mosaic and augment_cfg.crop % 2:
            raise ValueError(f"a mosaic needs an even crop size, got {augment_cfg.crop}")
        small = [lab is not None and min(lab.shape) < 0.75 * augment_cfg.crop for lab in self.labels]
        self.small = torch.tensor(small) if augment_cfg.mosaic else torch.zeros(len(samples), dtype=torch.bool)
        self.small_weights = self.weights * self.small
        if self.small.any():  # a mosaic shows four: each image is still drawn as often as its weight says
            self.weights = torch.where(self.small, self.weights / 4, self.weights)
            self.uniform = False

    def __len__(self) -> int:
        return 2**62  # endless: the sampler decides where to start and when to stop

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(crop_seed(self.seed, self.rank, index))
        if self.uniform:  # the draw of runs before weights existed: they resume with the same crops
            k = int(torch.randint(len(self.images), (1,), generator=gen))
        else:  # images drawn by their sources' weights
            k = int(torch.multinomial(self.weights, 1, generator=gen))
        if self.small[k]:
            return self._mosaic(k, gen)
        image = to_tensor(self.images[k].numpy())
        labels = self.labels[k] if self.labels[k] is not None else torch.zeros(image.shape[1:], dtype=torch.int32)
        img, lab = augment(image, labels, gen, self.cfg)
        if self.labels[k] is None:
            return img, {"tissue": torch.tensor(self.tissue[k])}
        return img, make_target(lab.numpy().astype(np.int32), self.tissue[k])


    def _mosaic(self, first: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A crop of four small labelled images (``first`` and three more drawn by weight),
        each augmented at half the crop size; instance ids kept apart."""
        picks = [first] + torch.multinomial(self.small_weights, 3, replacement=True, generator=gen).tolist()
        half = replace(self.cfg, crop=self.cfg.crop // 2)
        quads, ids = [], 0
        for k in picks:
            img, lab = augment(to_tensor(self.images[k].numpy()), self.labels[k], gen, half)
            lab = torch.where(lab > 0, lab + ids, lab)
            ids = max(ids, int(lab.max()))
            quads.append((img, lab))
        img = torch.cat([torch.cat([quads[0][0], quads[1][0]], 2), torch.cat([quads[2][0], quads[3][0]], 2)], 1)
        lab = torch.cat([torch.cat([quads[0][1], quads[1][1]], 1), torch.cat([quads[2][1], quads[3][1]], 1)], 0)
        return img, make_target(lab.numpy().astype(np.int32))


class FromIndex(Sampler):
    """``start, start + 1, …``: where a (resumed) run is in its stream of crops."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def __iter__(self):
        i = self.start
        while True:
            yield i
            i += 1

    def __len__(self) -> int:
        return 2**62


def collate(batch):
    return tuple(zip(*batch))


def make_loader(stream: CropStream, batch_size: int, start: int = 0, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """Workers augment in parallel (persistent, so they start once); pinned memory lets
    host-to-GPU copies overlap compute."""
    # Its own generator: creating a loader must not draw from the global torch RNG, which
    # the model's RPN/ROI samplers use and a resume restores.
    return DataLoader(stream, batch_size=batch_size, sampler=FromIndex(start), num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(0))
