"""Overlapping tiles whose 'cores' partition the image.

A detection belongs to the tile whose core contains its box centre, so an object that
crosses a tile border is kept exactly once, by the tile that sees it whole.
"""
from __future__ import annotations

from dataclasses import dataclass


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


def _axis(length: int, size: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """(start, stop, core_start, core_stop) along one axis."""
    if length <= size:
        return [(0, length, 0, length)]
    step = size - overlap
    starts = list(range(0, length - size, step)) + [length - size]
    spans = [(s, s + size) for s in starts]
    out = []
    for i, (s, e) in enumerate(spans):
        lo = 0 if i == 0 else (spans[i - 1][1] + s) // 2
        hi = length if i == len(spans) - 1 else (e + spans[i + 1][0]) // 2
        out.append((s, e, lo, hi))
    return out


def tile_grid(height: int, width: int, size: int, overlap: int) -> list[Tile]:
    """Tiles of ``size`` overlapping by at least ``overlap`` pixels, cores disjoint."""
    return [
        Tile(ys, xs, ye, xe, (ylo, xlo, yhi, xhi))
        for ys, ye, ylo, yhi in _axis(height, size, overlap)
        for xs, xe, xlo, xhi in _axis(width, size, overlap)
    ]
