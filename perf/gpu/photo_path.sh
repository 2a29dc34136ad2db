#!/usr/bin/env bash
# The GPU photo path, three designs side by side on one GPU host, one server: `bls` (one Python model under
# the ensemble's name: GPU decode of the batch, one BLS request to the classifier per batch, top-k on the GPU),
# `fused` (the same model with the inductor engine in its own process, as <name>_fused) and `ensemble`
# (preprocess -> classifier -> postprocess chained by Triton, as <name>_ensemble3). GPU_PHOTO_PATH=hybrid: the
# hybrid design (the engine in the process up to HYBRID_LOCAL_BATCH images, BLS above) in bls's place.
# Needs: an NVIDIA driver; PYTHON with torch (CUDA) + torchvision, timm, onnx, onnxruntime, tritonclient==2.51.0;
# SERVE_PYTHON: a Python whose numpy is < 2 (tritonserver 2.51's Python backend breaks BYTES inputs under numpy 2)
# with torch and nvidia-pytriton==0.7.0; perf_analyzer on PATH. Run from the checkout root:
#   bash perf/gpu/photo_path.sh repo     # Swin-T, inductor FP16 + CUDA graphs, --preprocess gpu, three designs
#   bash perf/gpu/photo_path.sh sweep    # serve it; perf_analyzer over the designs, 1 and 8 images per request
# Images: builder/parity_images/*_640x480.jpg (the bundled photos, 640x480 JPEGs).
set -euo pipefail
source "$(dirname "$0")/gpu_repo.sh"
OUT=${OUT:-build/gpu-photo-path}
REPO=${REPO:-/tmp/swin-photo-repo}
WORK=${WORK:-/tmp/swin-photo-server}
IMAGES=${IMAGES:-/tmp/swin-photo-images}
BASE=${GPU_PHOTO_PATH:-bls}  # the design under the model's own name (`repo` builds it; `sweep` names it so)
mkdir -p "$OUT"
gpu_photos "$IMAGES"
case "${1:?stage}" in
  repo)
    # GPU_PHOTO_PATH: the design under the model's own name (bls; hybrid with HYBRID_LOCAL_BATCH).
    gpu_repo --engine inductor --gpu-photo-path "$BASE" \
      ${HYBRID_LOCAL_BATCH:+--hybrid-local-batch "$HYBRID_LOCAL_BATCH"} 2>&1 | grep -v "^\s*$" | tail -8
    # The other designs beside it, on the same classifier: `fused` (the photo-path model with the inductor
    # engine in its own process) as <name>_fused, and the ensemble (three models chained by Triton) as
    # <name>_ensemble3. WRITE_DESIGNS=0: that design alone (MPS takes at most 48 model processes a GPU).
    [ "${WRITE_DESIGNS:-1}" = 0 ] || $PYTHON perf/gpu/photo_designs.py write "$REPO" "$NAME"
    cp "$REPO/manifest.json" "$OUT/manifest.json"
    ;;
  sweep)
    # DECODER / THREADS / DESIGN_INSTANCES: serve the photo-path and fused models with another decoder, torch CPU
    # pool or GPU instance count; PROFILE=N: their per-phase profile every N batches in the server log, and a
    # torch profiler trace of 3 batches (in $OUT). MPS=1: serve under the server's own CUDA MPS daemon.
    # CLIENT_THREADS: perf_analyzer's asynchronous client on that many threads (16); 0: its synchronous client,
    # which failed some rows at concurrency 256 on an H200 (perf/results/h200-photo-mps).
    if [ -n "${DECODER:-}${THREADS:-}${PROFILE:-}${DESIGN_INSTANCES:-}" ]; then
      $PYTHON perf/gpu/photo_designs.py set "$REPO" "$NAME" --decoder "${DECODER:-}" --threads "${THREADS:-}" \
        --instances "${DESIGN_INSTANCES:-}" --profile "${PROFILE:-}" --trace-dir "$(realpath "$OUT")"
    fi
    TAG=${TAG:-}
    $SERVE_PYTHON -m builder serve --repository "$REPO" --workdir "$WORK" --detach --timeout 600 \
      --cuda-memory-pool-mb 4096 $([ "${MPS:-0}" = 1 ] && echo --mps || echo --no-mps)
    trap '$SERVE_PYTHON -m builder stop --workdir "$WORK"; cp "$WORK/tritonserver.log" "$OUT/tritonserver$TAG.log" || true' EXIT
    common=(--protocols grpc --shared-memory none --measurement-interval-ms "${INTERVAL_MS:-3000}"
            --stability-percent 15 --max-trials 5 --images "$IMAGES" --client-threads "${CLIENT_THREADS:-16}")
    for batch in ${BATCH_SIZES:-1 8}; do
      for design in ${DESIGNS:-$BASE fused ensemble3}; do
        name=$NAME; [ "$design" != "$BASE" ] && name=${NAME}_$design
        $PYTHON -m perf sweep --name "$name" --models ensemble --batch-sizes "$batch" \
          --concurrency "${CONCURRENCY:-1,16,64,128,256}" "${common[@]}" \
          --label "$design$TAG, $batch x 640x480 JPEG per request" --output "$OUT/sweep-$design$TAG-b$batch.json"
      done
    done
    ;;
  *) echo "stages: repo, sweep" >&2; exit 2 ;;
esac
