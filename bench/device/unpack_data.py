"""On the GPU machine: rebuild ../shared/data from pack_data.py's folder (JPEG -> .tif/.png),
so src_train/shared_data.toml and bench/slide.py find it where they look."""
import shutil, sys
from pathlib import Path
import numpy as np, tifffile
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.jpg"))
shutil.copytree(src / "consep", dst / "consep", dirs_exist_ok=True)
for p in sorted((src / "monuseg-train/images").glob("*.jpg")):
    tifffile.imwrite(dst / "monuseg-train/images" / (p.stem + ".tif"), np.asarray(Image.open(p).convert("RGB")))
for d in ("cpm15/images", "bach-wsi-crops"):
    for p in sorted((src / d).glob("*.jpg")):
        (dst / d).mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("RGB").save(dst / d / (p.stem + ".png"))
print("unpacked", sum(1 for _ in dst.rglob("*") if _.is_file()), "files")
