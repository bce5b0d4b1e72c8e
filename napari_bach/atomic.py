"""Files appear whole or not at all: written under a temporary name beside the target,
then renamed (a crash, a full disk or a cancel never leaves half a file under the real
name), with the permissions the user's umask gives new files (``mkstemp``'s own 0600
would hide models and datasets from the other users of a shared server)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_folder(parent: Path, name: str) -> Path:
    """A temporary folder in ``parent`` to fill and rename to its final name, with the
    permissions of a folder made by ``mkdir``."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}."))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp
