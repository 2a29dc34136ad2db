#!/usr/bin/env bash
# The TensorRT module before and after Polygraphy, on one GPU host: the same FP16 plan built by the hand-written
# module (OLD_COMMIT) and by the current one, each plan timed and validated by both runners; then the runner's
# gathered batches (device views + host arrays) and its DLPack wrapper.
# Needs: PYTHON (default python3) with torch (CUDA), timm and onnx, for the export and the DLPack check, and
# polygraphy there too; TRT_PYTHON: a Python >= 3.9 with tensorrt, numpy and polygraphy; git (for the old module).
# Run from the checkout root:  TRT_PYTHON=<python with tensorrt> bash perf/results/h100-polygraphy/polygraphy_check.sh
# Images: builder/parity_images (reference logits and the parity gate). Results: $OUT (default build/polygraphy-check).
set -uo pipefail
PYTHON=${PYTHON:-python3}
TRT=${TRT_PYTHON:?a Python with tensorrt and polygraphy}
OLD_COMMIT=${OLD_COMMIT:-f6f8fd0}
W=${OUT:-build/polygraphy-check}
OLD=${OLD_DIR:-$W/old-module}
TACTICS=${TACTICS:-edge_mask_convolutions,jit_convolutions}
mkdir -p "$W"
if [ ! -d "$OLD/builder" ]; then
  for f in builder/__init__.py builder/errors.py builder/compare.py builder/engines/__init__.py builder/engines/trt.py; do
    mkdir -p "$OLD/$(dirname $f)" && git show "$OLD_COMMIT:$f" > "$OLD/$f"
  done
fi
export PYTHONUNBUFFERED=1
PYTHONPATH=$PWD $PYTHON -m builder export --output "$W/model.onnx" --images builder/parity_images \
  --reference "$W/reference.npz" --reference-batch 256 2>&1 | tail -1
module() { [ "$1" = handwritten ] && (cd "$OLD" && pwd) || pwd; }
for v in handwritten polygraphy; do
  PYTHONPATH=$(module $v) $TRT -m builder.engines.trt build --onnx "$W/model.onnx" --plan "$W/$v/model.plan" \
    --precision fp16 --min-batch 1 --opt-batch 64 --max-batch 128 --timing-batches 1,32,64,128 --workspace-gib 8 \
    --tactic-sources "$TACTICS" --reference "$W/reference.npz" --max-abs 1.0 --min-cosine 0.99 --min-top1 0.9 \
    > "$W/build-$v.json" 2> "$W/build-$v.log" || { tail -5 "$W/build-$v.log"; exit 1; }
  cp "$W/$v/plan.json" "$W/plan-$v.json"
done
for runner in handwritten polygraphy; do
  for plan in handwritten polygraphy; do
    PYTHONPATH=$(module $runner) $TRT -m builder.engines.trt time --plan "$W/$plan/model.plan" \
      --batches 1,32,64,128 --iterations 300 --json "$W/time-$runner-runner-$plan-plan.json" > /dev/null 2>&1 \
      || echo "time: $runner runner on the $plan plan failed"
    PYTHONPATH=$(module $runner) $TRT -m builder.engines.trt validate --plan "$W/$plan/model.plan" \
      --reference "$W/reference.npz" 2>/dev/null | tail -1 > "$W/validate-$runner-runner-$plan-plan.json" \
      || echo "validate: $runner runner on the $plan plan failed"
  done
done
PYTHONPATH=$PWD $TRT perf/results/h100-polygraphy/gather_check.py "$W/polygraphy/model.plan" "$W/reference.npz" 2>/dev/null | tail -1
PYTHONPATH=$PWD $PYTHON perf/results/h100-polygraphy/dlpack_check.py 2>/dev/null | tail -1
