#!/usr/bin/env bash
# Every GPU of a host: the photo path served on 1, 2, 4, 8 GPUs (as many as the host has), same images per
# request, with the host CPU's load (`python -m perf scaling`: JSON, table, PNG per images-per-request).
# Needs: an NVIDIA driver; PYTHON with torch (CUDA) + torchvision, timm, onnx, onnxruntime, tritonclient==2.51.0;
# SERVE_PYTHON: a Python whose numpy is < 2 (tritonserver 2.51's Python backend breaks BYTES inputs under numpy 2)
# with torch and nvidia-pytriton==0.7.0; perf_analyzer on PATH. Run from the checkout root:
#   bash perf/gpu/scaling.sh repo     # Swin-T, inductor, --preprocess gpu (fused photo path), no --gpus: every GPU
#   bash perf/gpu/scaling.sh run      # one fresh server per GPU count (CUDA_VISIBLE_DEVICES = the first N)
# Images: builder/parity_images/*_640x480.jpg (the bundled photos, 640x480 JPEGs). perf_analyzer runs on the same
# host, so the CPU load includes the client's.
set -euo pipefail
source "$(dirname "$0")/gpu_repo.sh"
OUT=${OUT:-build/gpu-scaling}
REPO=${REPO:-/tmp/swin-scaling-repo}
IMAGES=${IMAGES:-/tmp/swin-scaling-images}
mkdir -p "$OUT"
gpu_photos "$IMAGES"
case "${1:?stage}" in
  repo)
    gpu_repo --engine inductor --inductor-precision "${PRECISION:-auto}" 2>&1 | grep -v "^\s*$" | tail -8
    cp "$REPO/manifest.json" "$OUT/manifest.json"
    ;;
  run)
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
    counts=$(for n in 1 2 4 8; do if [ "$n" -le "$gpus" ]; then echo -n "$n,"; fi; done)
    for batch in ${BATCH_SIZES:-1 8}; do
      $SERVE_PYTHON -m perf scaling --repository "$REPO" --name "$NAME" --gpu-counts "${GPU_COUNTS:-${counts%,}}" \
        --batch-size "$batch" --concurrency-per-gpu "${CONCURRENCY_PER_GPU:-128}" --images "$IMAGES" \
        --measurement-interval-ms "${INTERVAL_MS:-3000}" --cuda-memory-pool-mb 4096 \
        --workdir "${WORK:-/tmp/swin-scaling-server}" --output "$OUT/scaling-b$batch.json"
    done
    ;;
  *) echo "stages: repo, run" >&2; exit 2 ;;
esac
