#!/usr/bin/env bash
# The GPU data path on one GPU host: JPEG bytes in, labels out, on the GPU end to end.
# Needs: an NVIDIA driver; PYTHON (default python3) with torch + torchvision, timm, onnx, onnxruntime,
# tritonclient==2.51.0 and, optionally, nvidia-nvimgcodec-cu13 + nvidia-nvjpeg (hardware JPEG decoder);
# SERVE_PYTHON: a Python whose `python3` the Python-backend stub may use: the same packages plus
# nvidia-pytriton==0.7.0 and numpy<2 (tritonserver 2.51's Python backend breaks BYTES inputs under numpy 2).
# perf_analyzer (tritonclient's wheel) on PATH. Run from the checkout root, one stage at a time:
#   bash perf/gpu/gpu_data_path.sh repo       # local-flavor repository: --preprocess gpu --engine inductor
#   bash perf/gpu/gpu_data_path.sh bare       # the gpu preprocessing alone (both decoders) and the inductor engine alone
#   bash perf/gpu/gpu_data_path.sh sweep      # serve it; perf_analyzer: preprocess, classifier, ensemble
# Images: builder/parity_images (640x480 JPEGs of 55-100 KB; a 2048x1536 JPEG and a 4032x3024 one made
# from it for large uploads).
# TORCH_COMPILE=reduce-overhead builds and measures the TorchInductor + CUDA graphs variant; SWEEPS picks
# among "ensemble preprocess classifier large"; CONCURRENCY, INTERVAL_MS set the grid.
set -euo pipefail
source "$(dirname "$0")/gpu_repo.sh"
OUT=${OUT:-build/gpu}
REPO=${REPO:-/tmp/swin-gpu-repo}
WORK=${WORK:-/tmp/swin-gpu-server}
COMPILE=${TORCH_COMPILE:-none}
MAX_BATCH=${MAX_BATCH:-128}
IMAGES=${IMAGES:-/tmp/swin-gpu-images}
mkdir -p "$OUT" "$IMAGES/large"
gpu_photos "$IMAGES/typical"
cp builder/parity_images/astronaut_2048x1536.jpg "$IMAGES/large/"
# A 12 MP phone-camera-sized upload, made from the bundled 3 MP photo.
[ -f "$IMAGES/large/astronaut_4032x3024.jpg" ] || $PYTHON -c "from PIL import Image; Image.open('$IMAGES/large/astronaut_2048x1536.jpg').resize((4032, 3024), Image.BICUBIC).save('$IMAGES/large/astronaut_4032x3024.jpg', quality=85)"
case "${1:?stage}" in
  repo)
    gpu_repo --engine inductor --torch-compile "$COMPILE" 2>&1 | tail -6
    cp "$REPO/manifest.json" "$OUT/manifest-$COMPILE.json"
    ;;
  bare)
    $PYTHON -m perf preprocess --repository "$REPO" --images "$IMAGES/typical" --batches 1,64,256 \
      --decoders "${DECODERS:-nvimgcodec,torchvision}" --output "$OUT/preprocess-typical.json" 2>&1 | grep img/s
    $PYTHON -m perf preprocess --repository "$REPO" --images "$IMAGES/large" --batches 1,16 \
      --decoders "${DECODERS:-nvimgcodec,torchvision}" --output "$OUT/preprocess-large.json" 2>&1 | grep img/s
    $PYTHON -m perf bare --engines program --repository "$REPO" --batches 1,8,32,64,128 \
      --output "$OUT/bare-program-$COMPILE.json" 2>&1 | grep -o '"batch_size.*throughput_img_per_s": [0-9.]*\|load_s.*' | head -12
    ;;
  sweep)
    $SERVE_PYTHON -m builder serve --repository "$REPO" --workdir "$WORK" --detach --timeout 600 \
      --cuda-memory-pool-mb 4096
    trap '$SERVE_PYTHON -m builder stop --workdir "$WORK"; cp "$WORK/tritonserver.log" "$OUT/tritonserver-$COMPILE.log" || true' EXIT
    sweeps=" ${SWEEPS:-ensemble preprocess classifier large} "
    common=(--protocols grpc --batch-sizes "${BATCH_SIZES:-1}" --measurement-interval-ms "${INTERVAL_MS:-3000}" --stability-percent 15
            --max-trials 5)
    [[ $sweeps == *" ensemble "* ]] && $PYTHON -m perf sweep --models ensemble --shared-memory none --concurrency "${CONCURRENCY:-1,16,64,128,256}" \
      --images "$IMAGES/typical" "${common[@]}" --label "ensemble, 640x480 JPEGs, compile=$COMPILE" \
      --output "$OUT/sweep-ensemble-$COMPILE.json"
    [[ $sweeps == *" preprocess "* ]] && $PYTHON -m perf sweep --models preprocess --shared-memory cuda --concurrency "${CONCURRENCY:-1,16,64,128,256}" \
      --images "$IMAGES/typical" "${common[@]}" --label "preprocess alone, 640x480 JPEGs, output in CUDA shm" \
      --output "$OUT/sweep-preprocess-$COMPILE.json"
    [[ $sweeps == *" classifier "* ]] && $PYTHON -m perf sweep --models classifier --shared-memory cuda --concurrency "${CONCURRENCY:-1,16,64,128,256}" \
      "${common[@]}" --label "classifier alone, FP32 tensors in CUDA shm, compile=$COMPILE" \
      --output "$OUT/sweep-classifier-$COMPILE.json"
    [[ $sweeps == *" large "* ]] && $PYTHON -m perf sweep --models ensemble --shared-memory none --concurrency 1,16,64 \
      --images "$IMAGES/large" "${common[@]}" --label "ensemble, 2048x1536 JPEG" \
      --output "$OUT/sweep-ensemble-large-$COMPILE.json"
    true
    ;;
  *) echo "stages: repo, bare, sweep" >&2; exit 2 ;;
esac
