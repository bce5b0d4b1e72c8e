"""The data list: every labelled source, one way in.

A source is a folder in one of three layouts, told apart by what it holds:

- ``monuseg``: ``images/*.tif`` with ``masks/*.png`` and/or ``annotations/*.xml``;
- ``folder``: ``images/`` and ``labels/`` (or ``masks/``) paired by file stem (CoNSeP,
  CPM-15, any instance-label folder);
- ``exported``: samples written by napari-bach's *Correct, export & report*.

Each has a µm/px (a default for untagged files, and per-image overrides by name pattern,
as CPM-15 mixes 20× and 40× tiles), a sampling weight per image, and the images it holds
out for validation (name patterns, or ``organ:breast`` for TCGA-named images). Validation
is reported per source group, so an unseen hospital's numbers are never averaged away.

On the command line: ``--data NAME:PATH[:MPP[:WEIGHT]]`` (repeatable) or ``--data
list.toml``, a file of ``[[source]]`` tables with keys ``name``, ``path`` (relative to the
file), ``mpp``, ``mpp_by_name``, ``weight``, ``val`` and ``license``.
"""
from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from .datasets import Sample, load_exported, load_mask_folder, load_monuseg, organ_of


@dataclass
class Source:
    name: str
    path: Path
    mpp: float | None = None  # for images without resolution tags
    mpp_by_name: dict[str, float] = field(default_factory=dict)  # fnmatch pattern -> µm/px
    weight: float = 1.0  # per image
    val: list[str] = field(default_factory=list)  # name patterns, or "organ:NAME"
    license: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.name or ":" in self.name:
            raise ValueError(f"a source needs a name without ':' (got {self.name!r})")
        if self.weight <= 0:
            raise ValueError(f"source {self.name}: weight must be positive, got {self.weight:g}")
        if self.mpp is not None and not 0.05 <= self.mpp <= 5:
            raise ValueError(f"source {self.name}: µm/px {self.mpp:g} is not a microscope scale (0.05–5)")
        if isinstance(self.val, str):
            self.val = [self.val]

    def layout(self) -> str:
        if not self.path.is_dir():
            raise FileNotFoundError(f"source {self.name}: {self.path} is not a folder")
        if (self.path / "images").is_dir() and ((self.path / "annotations").is_dir() or
                                                 any((self.path / "masks").glob("*.png"))) \
                and any((self.path / "images").glob("*.tif")):
            return "monuseg"
        if (self.path / "images").is_dir() and ((self.path / "labels").is_dir() or (self.path / "masks").is_dir()):
            return "folder"
        return "exported"

    def load(self) -> list[Sample]:
        """Every image of the source, at its µm/px, weighted and tagged with its group."""
        kind = self.layout()
        if kind == "monuseg":
            samples = load_monuseg(self.path)
        elif kind == "folder":
            labels = self.path / "labels" if (self.path / "labels").is_dir() else self.path / "masks"
            samples = load_mask_folder(self.path / "images", labels, self.mpp or 0.0)
        else:
            samples = load_exported(self.path)
        if not samples:
            raise FileNotFoundError(f"source {self.name}: no labelled images in {self.path}")
        out = []
        for s in samples:
            mpp = next((v for pat, v in self.mpp_by_name.items() if fnmatch.fnmatch(s.name, pat)), None)
            mpp = mpp or (s.mpp if s.mpp else self.mpp)
            if not mpp:
                raise ValueError(f"source {self.name}: {s.name} has no µm/px; give the source an mpp")
            out.append(replace(s, mpp=mpp, weight=self.weight, group=self.name))
        return out

    def held_out(self, sample: Sample) -> bool:
        for pattern in self.val:
            if pattern.startswith("organ:"):
                if organ_of(sample.name) == pattern[len("organ:"):]:
                    return True
            elif fnmatch.fnmatch(sample.name, pattern):
                return True
        return False


def parse_data_arg(value: str) -> list[Source]:
    """``NAME:PATH[:MPP[:WEIGHT]]`` or a ``.toml`` data list."""
    if value.endswith(".toml"):
        return read_data_list(value)
    parts = value.split(":")
    if len(parts) < 2 or len(parts) > 4:
        raise ValueError(f"--data {value!r}: expected NAME:PATH[:MPP[:WEIGHT]] or a .toml file")
    try:
        mpp = float(parts[2]) if len(parts) > 2 and parts[2] else None
        weight = float(parts[3]) if len(parts) > 3 else 1.0
    except ValueError:
        raise ValueError(f"--data {value!r}: MPP and WEIGHT must be numbers") from None
    return [Source(parts[0], Path(parts[1]), mpp, weight=weight)]


def read_data_list(path: str | Path) -> list[Source]:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"data list {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"data list {path}: {exc}") from None
    known = {"name", "path", "mpp", "mpp_by_name", "weight", "val", "license"}
    sources = []
    for table in doc.get("source", []):
        unknown = set(table) - known
        if unknown:
            raise ValueError(f"data list {path}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        if "path" not in table or "name" not in table:
            raise ValueError(f"data list {path}: every [[source]] needs name and path")
        sources.append(Source(**{**table, "path": (path.parent / table["path"]).resolve()}))
    if not sources:
        raise ValueError(f"data list {path} has no [[source]] tables")
    return sources


@dataclass
class DataSplit:
    train: list[Sample]
    val: dict[str, list[Sample]]  # group -> exactly outlined held-out images
    notes: list[str]


def load_sources(sources: list[Source]) -> DataSplit:
    """Load every source; split off each one's held-out images (exact outlines only)."""
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"source names must differ: {names}")
    train, val, notes = [], {}, []
    for source in sources:
        samples = source.load()
        held = [s for s in samples if source.held_out(s)]
        train += [s for s in samples if not source.held_out(s)]
        exact = [s for s in held if s.exact]
        if exact:
            val[source.name] = exact
        licence = f", {source.license}" if source.license else ""
        notes.append(f"{source.name}: {len(samples) - len(held)} images ×{source.weight:g}{licence}"
                     + (f", {len(held)} held out" if held else ""))
    return DataSplit(train, val, notes)
