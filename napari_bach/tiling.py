"""Overlapping tiles whose 'cores' partition the image.

A detection belongs to the tile whose core contains its box centre, so an object that
crosses a tile border is kept exactly once, by the tile that sees it whole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# The network pads its input to a multiple of this (the FPN's coarsest stride): balanced
# tiles are cut to it, so no tile carries padding.
SIZE_DIVISIBLE = 32
Region = tuple[int, int, int, int]  # y0, x0, y1, x1: half-open, in one tile's or image's pixels


@dataclass(frozen=True)
class Tile:
    y0: int
    x0: int
    y1: int
    x1: int
    core: tuple[int, int, int, int]  # y0, x0, y1, x1 of the region this tile owns

    def owns(self, cy: float, cx: float) -> bool:
        y0, x0, y1, x1 = self.core
        return y0 <= cy < y1 and x0 <= cx < x1


def centre_in(boxes, region: Region):
    """Which ``x0 y0 x1 y1`` boxes (an N×4 tensor or array) have their centre in ``region``
    (``y0, x0, y1, x1``, half-open): the one ownership rule, so that the model can drop
    what its tile will not own before computing masks, and tiles and slide blocks keep
    each border object exactly once."""
    y0, x0, y1, x1 = region
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)


def _axis(length: int, size: int, overlap: int, balanced: bool) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) along one axis. ``balanced``: as few tiles as
    at ``size``, but shrunk and spread evenly so their overlaps are no larger than needed
    (a fixed grid's last tile often overlaps its neighbour by most of its width)."""
    if length <= size:
        return [(0, length, 0, length)]
    n = math.ceil((length - overlap) / (size - overlap))
    if balanced:
        size = min(size, math.ceil((length + (n - 1) * overlap) / n / SIZE_DIVISIBLE) * SIZE_DIVISIBLE)
        starts = [i * (length - size) // (n - 1) for i in range(n)]
    else:
        starts = list(range(0, length - size, size - overlap)) + [length - size]
    spans = [(s, s + size) for s in starts]
    out = []
    for i, (s, e) in enumerate(spans):
        lo = 0 if i == 0 else (spans[i - 1][1] + s) // 2
        hi = length if i == len(spans) - 1 else (e + spans[i + 1][0]) // 2
        out.append((s, e, lo, hi))
    return out


def tile_grid(height: int, width: int, size: int, overlap: int, balanced: bool = False) -> list[Tile]:
    """Tiles of ``size`` (at most, when ``balanced``) overlapping by at least ``overlap``
    pixels, cores disjoint. All tiles of a grid have one shape, so they batch."""
    return [
        Tile(ys, xs, ye, xe, (ylo, xlo, yhi, xhi))
        for ys, ye, ylo, yhi in _axis(height, size, overlap, balanced)
        for xs, xe, xlo, xhi in _axis(width, size, overlap, balanced)
    ]
