"""``--baseline REV`` for the benchmarks: the same measurement with REV's library and
shipped model, in the same session on the same machine, so old and new figures compare.

REV's ``napari_bach`` and ``src_train`` are extracted with ``git archive`` into a temporary
folder and the calling benchmark script (this working tree's harness, so both sides
measure the same thing) runs again with that folder first on ``sys.path``: the library,
the training code and the default model are REV's.
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


def run_baseline(rev: str, script: str, args: list[str]) -> Iterator[dict | str]:
    """Run ``script`` with ``args`` against REV's ``napari_bach`` and ``src_train``; yields
    each JSON line it prints as a dict with ``"rev"`` set, other lines as text prefixed
    with REV. Exits with a clear message when REV is not a commit here."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"--baseline {rev}: not a commit of {ROOT} ({commit.stderr.strip()})")
    short = commit.stdout.strip()
    label = short if short.startswith(rev) or rev.startswith(short) else f"{rev} ({short})"
    with tempfile.TemporaryDirectory(prefix="bench-baseline-") as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "napari_bach", "src_train"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)}
        proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"--baseline {rev}: the benchmark failed on its code:\n{proc.stderr[-2000:]}")
        for line in proc.stdout.splitlines():
            yield {**json.loads(line), "rev": label} if line.startswith("{") else f"[{label}] {line}"



def without_baseline(argv: list[str]) -> list[str]:
    """The command line minus its ``--baseline REV`` (or ``--baseline=REV``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--baseline":
            skip = True
        elif not arg.startswith("--baseline="):
            out.append(arg)
    return out
