#!/usr/bin/env bash
# `--engine auto` on one GPU host: ONNX Runtime, TorchInductor and a TensorRT plan built, gated and timed at the
# batch sizes the classifier's config forms; the fastest is served. Then the served classifier and ensemble.
# Needs: an NVIDIA driver; PYTHON (default python3) with torch (CUDA) + torchvision, timm, onnx, onnxruntime and
# tritonclient==2.51.0; TRT_PYTHON: a Python >= 3.9 with tensorrt and numpy (TensorRT and torch need not share
# one: the plan is timed where it is built and the timings travel in plan.json); SERVE_PYTHON as in
# gpu_data_path.sh; perf_analyzer on PATH. Run from the checkout root, one stage at a time:
#   bash perf/gpu/engine_auto.sh plan     # ONNX + reference logits (photos), FP16 plan gated and timed
#   bash perf/gpu/engine_auto.sh auto     # builder repo --engine auto [--plan ...]: the choice table
#   bash perf/gpu/engine_auto.sh sweep    # serve it: classifier and ensemble sweeps (gpu_data_path.sh sweep)
# Images: builder/parity_images (the reference logits and every parity gate).
set -euo pipefail
source "$(dirname "$0")/gpu_repo.sh"
TRT=${TRT_PYTHON:-$PYTHON}
OUT=${OUT:-build/gpu-auto}
W=${WORK_DIR:-/tmp/swin-auto}
REPO=${REPO:-/tmp/swin-auto-repo}
MAX_BATCH=${MAX_BATCH:-128}
PREFERRED=${PREFERRED:-32,64,128}
TACTICS=${TACTICS:-edge_mask_convolutions,jit_convolutions}
mkdir -p "$OUT" "$W"
case "${1:?stage}" in
  plan)
    $PYTHON -m builder export --output "$W/model.onnx" --images builder/parity_images \
      --reference "$W/reference.npz" --reference-batch 256 2>&1 | tail -2
    # The profile and the timed batch sizes are the repository's: opt at the middle preferred size, max = max batch.
    $TRT -m builder.engines.trt build --onnx "$W/model.onnx" --plan "$W/plan/model.plan" --precision fp16 \
      --min-batch 1 --opt-batch 64 --max-batch "$MAX_BATCH" --timing-batches "1,$PREFERRED" --workspace-gib 8 \
      --tactic-sources "$TACTICS" --reference "$W/reference.npz" --max-abs 1.0 --min-cosine 0.99 --min-top1 0.9 \
      2>&1 | tail -2
    cp "$W/plan/plan.json" "$OUT/plan-fp16.json"
    ;;
  auto)
    plan=(); [ -f "$W/plan/model.plan" ] && plan=(--plan "$W/plan/model.plan")  # the plan competes when built
    gpu_repo --engine auto "${plan[@]}" 2>&1 | grep -v "^\s*$" | tail -25
    cp "$REPO/manifest.json" "$OUT/manifest.json"
    cp "$REPO/README.md" "$OUT/repository-README.md"
    cp "$REPO"/*_classifier/1/engine.json "$OUT/engine.json" 2>/dev/null || true
    ;;
  sweep)
    REPO=$REPO OUT=$OUT TORCH_COMPILE=auto SWEEPS=${SWEEPS:-"classifier ensemble"} \
      bash perf/gpu/gpu_data_path.sh sweep
    ;;
  *) echo "stages: plan, auto, sweep" >&2; exit 2 ;;
esac
