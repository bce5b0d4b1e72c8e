"""``--baseline REV`` for the benchmarks: the same measurement with REV's library and
shipped model, in the same session on the same machine, so old and new figures compare.

REV's tree is extracted with ``git archive`` into a temporary folder and the calling
benchmark script (this working tree's harness, so both sides measure the same thing) runs
again with that tree first on ``sys.path``: ``napari_bach`` and its default model are REV's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]


def run_baseline(rev: str, script: str, args: list[str]) -> Iterator[dict]:
    """Run ``script`` with ``args`` against REV's ``napari_bach``; yields each JSON line it
    prints with ``"rev"`` set. Exits with a clear message when REV is not a commit here."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of {ROOT} ({commit.stderr.strip()})")
    label = f"{rev} ({commit.stdout.strip()})"
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "napari_bach"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"--baseline {rev}: the benchmark failed on its code:\n{proc.stderr[-2000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                yield {**json.loads(line), "rev": label}

