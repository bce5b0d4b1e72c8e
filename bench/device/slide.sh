#!/bin/bash
# On the GPU machine: bench/slide.py on CUDA with the BACH crops (carried as JPEG q90 in
# .gpu/data, decoded to PNG beside the repo as ../shared/data/bach-wsi-crops) and the slide
# libraries as wheels in .whl (docs/device.md); JSON lines in $OUT/slide.jsonl.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 4; fi
if [ ! -d ../shared/data/bach-wsi-crops ]; then  # here the real crops; there the packed ones
  mkdir -p ../shared/data/bach-wsi-crops && python3 -c "
from pathlib import Path; from PIL import Image
for p in sorted(Path('.gpu/data/bach-wsi-crops').glob('*.jpg')): Image.open(p).convert('RGB').save(Path('../shared/data/bach-wsi-crops') / (p.stem + '.png'))
" || exit 3
fi
rm -rf /tmp/sb; mkdir -p /tmp/sb
for size in ${SIZES:-10000 20000}; do
  t0=$(date +%s)
  timeout ${BENCH_TIMEOUT:-200} python3 bench/slide.py --sizes $size --device ${DEVICE:-cuda} --threads ${THREADS:-8} --workdir /tmp/sb 2>&1 | tee -a $OUT/slide.jsonl | tail -c 3000
  echo "size $size took $(( $(date +%s) - t0 )) s"
done
