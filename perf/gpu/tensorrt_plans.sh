#!/usr/bin/env bash
# TensorRT plans of swin_tiny on a GPU host, in stages. Needs: PYTHON (default python3) with torch, timm, onnx,
# onnxruntime; TRT_PYTHON (default $PYTHON), a Python >= 3.9 with tensorrt (8.6 to 11) and numpy.
# Run from the checkout root:
#   bash perf/gpu/tensorrt_plans.sh export   # ONNX + reference/calibration data + PyTorch bare timings
#   bash perf/gpu/tensorrt_plans.sh build fp16|fp32|int8
#   bash perf/gpu/tensorrt_plans.sh measure  # validate every plan against PyTorch FP32, time batch 1..256
# IMAGES (default builder/parity_images) feeds reference and calibration data; TACTICS the tactic sources
# (the measured runs used edge_mask_convolutions,jit_convolutions: that host had no cuBLAS/cuDNN for TensorRT).
# Results go to $OUT (or ./build/gpu) and are committed under perf/results/.
set -euo pipefail
W=/tmp/swin-work
OUT=${OUT:-build/gpu}
mkdir -p "$W" "$OUT"
source "$(dirname "$0")/gpu_repo.sh"  # the shared preamble: PYTHON, SERVE_PYTHON, NAME, PYTHONPATH
TRT=${TRT_PYTHON:-$PYTHON}
IMAGES=${IMAGES:-builder/parity_images}
BATCHES=1,2,4,8,16,32,64,128,256
TACTICS=${TACTICS:-edge_mask_convolutions,jit_convolutions}
stage=${1:?stage}
case "$stage" in
  export)
    $PYTHON -m builder export --output "$W/model.onnx" --images "$IMAGES" --reference "$W/reference.npz" \
      --calibration "$W/calibration.npy" --reference-batch 256 2>&1 | tail -4
    [ -n "${SKIP_TORCH:-}" ] || $PYTHON -m perf bare --engines torch --device cuda --batches $BATCHES \
      --warmup 10 --iterations 30 --output "$OUT/bare-torch.json" 2>&1 | tail -2
    ;;
  build)
    precision=${2:?precision}
    extra=()
    [ "$precision" = int8 ] && extra=(--calibration "$W/calibration.npy")
    mkdir -p "$W/$precision"
    PYTHONPATH=$PWD $TRT -m builder.engines.trt build --onnx "$W/model.onnx" --plan "$W/$precision/model.plan" \
      --precision "$precision" --min-batch 1 --opt-batch 64 --max-batch 256 --workspace-gib 8 \
      --timing-cache "$W/timing.cache" --tactic-sources $TACTICS --reference "$W/reference.npz" --max-abs 1.0 \
      --min-cosine 0.99 --min-top1 0.9 "${extra[@]}"
    cp "$W/$precision/plan.json" "$OUT/plan-$precision.json"
    ;;
  measure)
    for precision in ${2:-fp32 fp16 int8}; do
      plan=$W/$precision/model.plan
      [ -f "$plan" ] || continue
      PYTHONPATH=$PWD $TRT -m builder.engines.trt validate --plan "$plan" --reference "$W/reference.npz" \
        --max-abs 1.0 --min-cosine 0.99 --min-top1 0.9 > "$OUT/parity-$precision.json" || true
      cat "$OUT/parity-$precision.json"
      PYTHONPATH=$PWD $TRT -m perf bare --engines tensorrt --plans "$plan" --batches $BATCHES \
        --warmup 20 --iterations 100 --output "$OUT/bare-trt-$precision.json" 2>&1 | tail -1
    done
    ;;
esac
