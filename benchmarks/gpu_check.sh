#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one script for a short lease of one (see docs/training.md, "On a GPU").
#
# Run from the repository root on a CUDA machine: bash benchmarks/gpu_check.sh
#   DATA  NIH-layout folder (default ../shared/nih-cell-images; a subset of patients is enough)
#   OUT   where logs and results go (default runs/gpu-check); everything ends up in OUT/gpu-check.tar.gz too
#   .whl/ wheels of the pure-Python dependencies the machine lacks, installed to /tmp/site when present
#
# 1. the test suite with CUDA visible (training, predict and export tests then run their torch side on the GPU);
# 2. a real training run on CUDA in fp32 and in bf16 autocast, each evaluated and exported to ONNX, and ONNX on the
#    CPU compared with the torch model on the GPU;
# 3. training throughput on CUDA, fp32 vs bf16, 48 and 64 px, batch 64 and 256 (benchmarks/train_speed.py).
# Each step has its own time limit, so one that hangs leaves the others' results.
set -u
OUT=${OUT:-runs/gpu-check}
DATA=${DATA:-../shared/nih-cell-images}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 MALARIA_CELLS_QUIET=1 MALARIA_CELLS_CACHE=/tmp/mc-cache
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
mc() { python3 -m malaria_cells.cli "$@"; }
step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, malaria_cells; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
echo "data: $DATA ($(find "$DATA" -name '*.webp' | wc -l) cells)"

step "test suite with CUDA visible"
MALARIA_CELLS_SHARE="$DATA" timeout 200 python3 -m pytest -q -p no:cacheprovider -n 6 --timeout 150 \
    -o addopts="" tests/ >"$OUT/pytest.txt" 2>&1
echo "pytest exit $?"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -60

for prec in fp32 bf16; do
    step "train on CUDA, $prec"
    run="$OUT/run-$prec"
    timeout 150 python3 -m malaria_cells.cli train --data "$DATA" --model custom-cnn --input-size 48 --epochs 8 \
        --patience 8 --stain-jitter 1 --precision "$prec" --out "$run" >"$OUT/train-$prec.txt" 2>&1
    echo "train exit $?"
    python3 - "$run" <<'EOF'
import sys
from malaria_cells.run import Run
run = Run.open(sys.argv[1])
rows = run.history()
speeds = sorted(r["train_images_per_s"] for r in rows)
val = run.meta.val_metrics_at_threshold
print("epochs", len(rows), "train images/s (median)", round(speeds[len(speeds) // 2]), "precision", run.meta.precision,
      "best epoch", run.meta.best_epoch, "val accuracy", round(val["accuracy"], 4), "val AUC", round(val["roc_auc"], 4))
EOF
    timeout 60 python3 -m malaria_cells.cli evaluate "$run" --data "$DATA" >"$OUT/eval-$prec.txt" 2>&1
    echo "evaluate exit $?"; grep -iE "accuracy|auc" "$OUT/eval-$prec.txt" | head -4
    timeout 90 python3 -m malaria_cells.cli export "$run" --format onnx --out "$run/model.onnx" >/dev/null 2>&1
    echo "export exit $?"
    timeout 90 python3 - "$run" "$DATA" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from malaria_cells.backends import load_backend
from malaria_cells.preprocess import letterbox, load_image

run, data = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(data.glob("*/*.webp"))[::10][:512]
gpu = load_backend(run, device="cuda")
onnx = load_backend(run / "model.onnx")
x = np.stack([letterbox(load_image(f), gpu.prep.input_size) for f in files])
a, b = gpu(x), onnx(x)
print(f"parity torch-cuda vs onnx-cpu on {len(files)} cells: max |dp| {np.abs(a - b).max():.2e}, "
      f"label agreement {np.mean((a >= 0.5) == (b >= 0.5)):.4f}")
EOF
    echo "parity exit $?"
done

step "training throughput on CUDA"
for s in 48 64; do
    for b in 64 256; do
        timeout 90 python3 benchmarks/train_speed.py --model custom-cnn --size "$s" --batch "$b" --steps 30 \
            --device cuda --out "$OUT/train_speed_cuda_${s}px_b${b}.json"
    done
done

step done
tar -czf /tmp/gpu-check.tar.gz -C "$OUT" --exclude='*.safetensors' --exclude='split.csv' . && mv /tmp/gpu-check.tar.gz "$OUT/"
