#!/usr/bin/env bash
# Serve swin_tiny with the pip tritonserver (2.51, nvidia-pytriton==0.7.0) and measure it with perf_analyzer
# 2.51: the `local` flavor with a TensorRT FP16 plan in the Python backend, the preprocess and postprocess
# models as in production. Needs: PYTHON (default python3) with torch, timm, onnx, onnxruntime and
# tritonclient==2.51.0 for building the repository; SERVE_PYTHON, a Python >= 3.9 with tensorrt, numpy<2,
# Pillow, tritonclient==2.51.0 and nvidia-pytriton==0.7.0 (the Python-backend stub takes the `python3`
# beside it); perf_analyzer (tritonclient's wheel) on PATH. Stages, from the checkout root, after
# `tensorrt_plans.sh export` and `build fp16`:
#   bash perf/gpu/serve_tensorrt.sh repo     # python -m builder repo --flavor local --plan ...
#   bash perf/gpu/serve_tensorrt.sh sweep    # start the server, perf sweep, stop
#   bash perf/gpu/serve_tensorrt.sh cudashm  # clients with none/system/cuda shared memory agree; transports compared
set -euo pipefail
W=/tmp/swin-work
OUT=${OUT:-build/gpu}
source "$(dirname "$0")/gpu_repo.sh"  # the shared preamble: PYTHON, SERVE_PYTHON, NAME, PYTHONPATH
SERVE=${SERVE_PYTHON:-$PYTHON}
IMAGES=${IMAGES:-builder/parity_images}
mkdir -p "$OUT"
stage=${1:?stage}
case "$stage" in
  repo)
    $PYTHON -m builder repo --flavor local --plan "$W/fp16/model.plan" --output /tmp/swin-repo \
      --max-batch-size 64 --preferred-batch-sizes 16,32,64 --max-queue-delay-us 2000 \
      --instance-kind KIND_GPU --instance-count 2 --preprocess-instances 2 2>&1 | tail -3
    cp /tmp/swin-repo/manifest.json "$OUT/manifest.json"
    ;;
  sweep)
    $SERVE -m builder serve --repository /tmp/swin-repo --workdir /tmp/swin-server --detach --timeout 300
    trap '$SERVE -m builder stop --workdir /tmp/swin-server; cp /tmp/swin-server/tritonserver.log "$OUT/" || true' EXIT
    $SERVE -m perf sweep --models ${MODELS:-classifier,ensemble} --protocols grpc --shared-memory ${SHM:-none,system} \
      --concurrency ${CONCURRENCY:-1,8,32,64} --batch-sizes 1 --images "$IMAGES" \
      --measurement-interval-ms 3000 --stability-percent 15 --max-trials 6 \
      --label "local flavor, TensorRT FP16 plan in the Python backend" --output "$OUT/sweep.json"
    ;;
  cudashm)
    $SERVE -m builder serve --repository /tmp/swin-repo --workdir /tmp/swin-server --detach --timeout 300
    trap '$SERVE -m builder stop --workdir /tmp/swin-server' EXIT
    for mode in ensemble classifier; do
      for shm in none system cuda; do
        $SERVE -m clients classify --url 127.0.0.1:8001 --json --top-k 3 --mode $mode --shared-memory $shm \
          "$IMAGES" | sort > "$OUT/client-$mode-$shm.jsonl"
      done
      cmp "$OUT/client-$mode-none.jsonl" "$OUT/client-$mode-system.jsonl"
      cmp "$OUT/client-$mode-none.jsonl" "$OUT/client-$mode-cuda.jsonl" && echo "clients $mode: none/system/cuda agree"
    done
    $SERVE -m perf sweep --models classifier --protocols grpc --shared-memory none,system,cuda \
      --concurrency 16,64 --batch-sizes 1,8 --measurement-interval-ms 3000 --stability-percent 15 --max-trials 6 \
      --label "transports for the TensorRT FP16 classifier" --output "$OUT/sweep-transport.json"
    ;;
  *) echo "stages: repo, sweep, cudashm" >&2; exit 2 ;;
esac
