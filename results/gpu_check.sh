#!/usr/bin/env bash
# Every GPU-side check of the project, in two parts that each fit one 10-minute device call.
#   bash results/gpu_check.sh kernels OUTDIR   # kernel tests on CUDA (compiled Triton) + kernels.py --bench
#   bash results/gpu_check.sh paper OUTDIR     # the paper preset at real size, random weights, batch 16 and 32
# Figures and logs land in OUTDIR; results/<card>/ keeps them. Needs torch, triton, transformers,
# open_clip_torch and pytest (README, "Kernels", says how to add open_clip where it is missing).
set -u
part=${1:?usage: gpu_check.sh kernels|paper OUTDIR}
out=${2:?usage: gpu_check.sh kernels|paper OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=${PYTHON:-python3}

if [ "$part" = kernels ]; then
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
            'transformers', transformers.__version__)"; } > "$out/device.txt" 2>&1
  timeout 240 $py -m pytest -q -p no:cacheprovider test_kernels.py > "$out/test_kernels.log" 2>&1
  echo "pytest exit $?" >> "$out/test_kernels.log"
  timeout 240 $py kernels.py --bench --out "$out/kernels.json" > "$out/kernels_bench.log" 2>&1
  echo "bench exit $?" >> "$out/kernels_bench.log"
elif [ "$part" = paper ]; then
  models=$(mktemp -d)
  trap 'rm -rf "$models"' EXIT  # ~35 GB of models and checkpoints: a rerun on the same disk must fit
  timeout 150 $py bench_paper.py --out "$models" > "$out/paper.log" 2>&1 || { echo "bench_paper failed" >> "$out/paper.log"; exit 1; }
  # 16 steps: 4 of critic warm-up, then full iterations; metrics every 4 steps give steps/s and peak memory
  for b in 16 32; do
    timeout 180 $py vlrm.py --preset paper --policy "$models/blip2" --itm "$models/itm" --ref-lm "$models/opt" \
      --clip "$models/clip" --images "$models/images" --steps 16 --value-warmup 4 --log-every 4 \
      --batch-size $b --run-dir "$models/run$b" >> "$out/paper.log" 2>&1
    echo "vlrm batch $b exit $?" >> "$out/paper.log"
    cp "$models/run$b/metrics.jsonl" "$out/paper_batch$b.jsonl"
  done
fi
