#!/bin/bash
# On the GPU machine: unpack the data beside the repo, then a short warm-started run of the
# shipped recipe on CUDA (batch 16, loader workers); results in $OUT/gpu.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, skimage, tifffile; print('torch', torch.__version__, 'tv', torchvision.__version__, 'skimage', skimage.__version__, 'tifffile', tifffile.__version__, torch.cuda.is_available())"
nproc
t0=$(date +%s)
# the real ../shared/data where it exists (here); the packed copy on the GPU machine
[ -d ../shared/data/monuseg-train ] || { mkdir -p ../shared && python3 bench/device/unpack_data.py .gpu/data ../shared/data; } || exit 3
echo "unpacked in $(( $(date +%s) - t0 )) s"
mkdir -p $OUT/gpu
timeout ${TRAIN_TIMEOUT:-420} python3 -m src_train train --data src_train/shared_data.toml \
  --init napari_bach/models/default.pt --mosaic --mpp 0.3 --lr 1e-4 --ema 0.999 \
  --max-hours ${HOURS:-0.08} --batch-size ${BATCH:-16} --workers ${WORKERS:-14} --device ${DEVICE:-cuda} --no-amp \
  --val-every-steps ${VAL:-1000} --checkpoint-every 100000 --no-progress ${EXTRA} --out $OUT/gpu 2>&1 | tee $OUT/gpu/train.log | tail -c 6000
echo "train rc ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
python3 - <<'PY'
import os, json
from pathlib import Path
from napari_bach.checkpoint import read_checkpoint
import torch
out = Path(os.environ["OUT"]) / "gpu"
if (out / "last.pt").exists():
    p = read_checkpoint(out / "last.pt"); p.pop("train_state", None)
    torch.save(p, out / "last-weights.pt"); (out / "last.pt").unlink()
    print("last-weights.pt", (out / "last-weights.pt").stat().st_size)
rows = (out / "log.csv").read_text().splitlines()[1:] if (out / "log.csv").exists() else []
if rows:
    s = [float(r.split(",")[-1]) for r in rows]
    n = len(s); tail = s[n // 5:]
    print(json.dumps({"steps": n, "train_s": round(sum(s), 1), "steady_step_s": round(sum(tail) / len(tail), 4),
                      "crops_per_s": round(int(os.environ.get("BATCH", 16)) * len(tail) / sum(tail), 1)}))
PY
ls -la $OUT/gpu
