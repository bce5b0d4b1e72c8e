"""Pack ../shared/data for a lent GPU machine (docs/device.md): what travels there must stay
under 64 MiB with the repository, so the large RGB images go as JPEG q90 (4:2:0) and come
back as .tif/.png there (unpack_data.py); label maps and CoNSeP's JPEGs travel as they are.

    python bench/device/pack_data.py .gpu/data      # ~33 MiB; carry .gpu there
"""
import shutil, sys
from pathlib import Path
import numpy as np, tifffile
from PIL import Image
src = Path(__file__).resolve().parents[2].parent / "shared" / "data"
dst = Path(sys.argv[1])
if dst.exists(): shutil.rmtree(dst)
def jpg(rgb, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=90)
for p in sorted((src / "monuseg-train/images").glob("*.tif")):
    jpg(tifffile.imread(p)[..., :3], dst / "monuseg-train/images" / (p.stem + ".jpg"))
shutil.copytree(src / "monuseg-train/masks", dst / "monuseg-train/masks")
for p in sorted((src / "cpm15/images").glob("*.png")):
    jpg(np.asarray(Image.open(p).convert("RGB")), dst / "cpm15/images" / (p.stem + ".jpg"))
shutil.copytree(src / "cpm15/labels", dst / "cpm15/labels")
shutil.copytree(src / "consep", dst / "consep")
for p in sorted((src / "bach-wsi-crops").glob("*.png")):
    jpg(np.asarray(Image.open(p).convert("RGB")), dst / "bach-wsi-crops" / (p.stem + ".jpg"))
for d in ("monuseg-train", "cpm15", "bach-wsi-crops"):
    shutil.copy(src / d / "SOURCE.md", dst / d / "SOURCE.md")
