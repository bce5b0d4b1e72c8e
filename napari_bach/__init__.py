"""napari-bach: nucleus segmentation and BACH tissue class for H&E histology in napari."""
import sys

__version__ = "0.1.0"


def _keep_triton_away_from_mesa() -> None:
    """Stop torch from importing triton once Mesa's LLVM is in the process.

    torch imports triton whenever it is installed (the CUDA wheels bring it), and triton's
    own LLVM segfaults in a process that has already mapped Mesa's libLLVM, which is the
    case once napari has opened its canvas on software OpenGL (Xvfb, VMs, remote
    desktops). napari-bach never uses triton (no torch.compile), so torch is told it is
    absent. Nothing changes when torch is already imported or Mesa's LLVM is not loaded.
    """
    if "triton" in sys.modules or "torch" in sys.modules or not sys.platform.startswith("linux"):
        return
    try:
        with open("/proc/self/maps") as fh:
            mesa_llvm = any("libLLVM" in line for line in fh)
    except OSError:
        return
    if mesa_llvm:
        sys.modules["triton"] = None  # makes `import triton` raise ImportError, which torch handles


_keep_triton_away_from_mesa()
