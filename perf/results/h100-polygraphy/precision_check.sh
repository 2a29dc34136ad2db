#!/usr/bin/env bash
# The Polygraphy build's precision paths on one GPU host, on the tiny Swin: strict FP32 (TF32 cleared), TF32, and
# implicit INT8 with Polygraphy's calibrator over the bundled photos (calibration cache beside the plan), all
# sharing one timing cache and gated against PyTorch FP32 on the photos (loose thresholds: this reports figures).
# Needs: PYTHON with torch, timm and onnx; TRT_PYTHON with tensorrt < 11, numpy and polygraphy. From the checkout root.
set -u
source perf/gpu/gpu_repo.sh  # the shared preamble: PYTHON, SERVE_PYTHON, NAME, PYTHONPATH
TRT=${TRT_PYTHON:?a Python with tensorrt and polygraphy}
W=${OUT:-build/precision-check}
mkdir -p "$W"
export PYTHONUNBUFFERED=1
TINY='{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}'
$PYTHON -m builder export --output "$W/model.onnx" --model-kwargs "$TINY" --images builder/parity_images \
  --reference "$W/reference.npz" --calibration "$W/calib.npy" --reference-batch 64 2>&1 | tail -1
for p in fp32 tf32 int8; do
  extra=(); [ $p = int8 ] && extra=(--calibration "$W/calib.npy")
  $TRT -m builder.engines.trt build --onnx "$W/model.onnx" --plan "$W/$p/model.plan" --precision $p \
    --max-batch 8 --opt-batch 8 --timing-batches 1,8 --tactic-sources "${TACTICS:-edge_mask_convolutions,jit_convolutions}" \
    --timing-cache "$W/timing.cache" --reference "$W/reference.npz" --max-abs 5 --min-cosine 0.5 --min-top1 0.0 \
    "${extra[@]}" > "$W/$p.json" 2> "$W/$p.log" && echo "$p: $(cat "$W/$p.json")" || { echo "$p failed"; tail -8 "$W/$p.log"; }
done
ls -la "$W/int8/" "$W/timing.cache"
