#!/usr/bin/env bash
# TensorRT plans of swin_tiny on the lent H100 with the GPU kit (TensorRT 8.6, Python 3.9), in stages that
# each fit one 10-minute device call. Run from the checkout root after the kit is unpacked (../shared/gpu-kit):
#   bash perf/gpu/h100_trt.sh export   # ONNX + reference/calibration data + PyTorch bare timings
#   bash perf/gpu/h100_trt.sh build fp16|fp32|int8
#   bash perf/gpu/h100_trt.sh measure  # validate every plan against PyTorch FP32, time batch 1..256
# Results go to $OUT (or ./build/gpu) and are committed under perf/results/.
set -euo pipefail
W=/tmp/swin-work
OUT=${OUT:-build/gpu}
mkdir -p "$W" "$OUT"
PY39=/tmp/gpukit/py39
BATCHES=1,2,4,8,16,32,64,128,256
# TensorRT 8.6 enables cuBLAS/cuDNN tactics by default; the kit has stand-ins for them.
TACTICS=edge_mask_convolutions,jit_convolutions
stage=${1:?stage}
case "$stage" in
  export)
    python3 -m builder export --output "$W/model.onnx" --images .gpurun/images --reference "$W/reference.npz" \
      --calibration "$W/calibration.npy" --reference-batch 256 2>&1 | tail -4
    [ -n "${SKIP_TORCH:-}" ] || python3 -m perf bare --engines torch --device cuda --batches $BATCHES \
      --warmup 10 --iterations 30 --output "$OUT/bare-torch.json" 2>&1 | tail -2
    ;;
  build)
    precision=${2:?precision}
    extra=()
    [ "$precision" = int8 ] && extra=(--calibration "$W/calibration.npy")
    mkdir -p "$W/$precision"
    PYTHONPATH=$PWD $PY39 -m builder.trt build --onnx "$W/model.onnx" --plan "$W/$precision/model.plan" \
      --precision "$precision" --min-batch 1 --opt-batch 64 --max-batch 256 --workspace-gib 8 \
      --timing-cache "$W/timing.cache" --tactic-sources $TACTICS --reference "$W/reference.npz" --max-abs 1.0 \
      --min-cosine 0.99 --min-top1 0.9 "${extra[@]}"
    cp "$W/$precision/plan.json" "$OUT/plan-$precision.json"
    ;;
  measure)
    for precision in ${2:-fp32 fp16 int8}; do
      plan=$W/$precision/model.plan
      [ -f "$plan" ] || continue
      PYTHONPATH=$PWD $PY39 -m builder.trt validate --plan "$plan" --reference "$W/reference.npz" \
        --max-abs 1.0 --min-cosine 0.99 --min-top1 0.9 > "$OUT/parity-$precision.json" || true
      cat "$OUT/parity-$precision.json"
      PYTHONPATH=$PWD $PY39 -m perf bare --engines tensorrt --plans "$plan" --batches $BATCHES \
        --warmup 20 --iterations 100 --output "$OUT/bare-trt-$precision.json" 2>&1 | tail -1
    done
    ;;
esac
