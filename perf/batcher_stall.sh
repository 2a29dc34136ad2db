#!/usr/bin/env bash
# The dynamic batcher's 500 ms stalls against the instance counts of the ensemble's models, on one host (CPU is
# enough). tritonserver's dynamic batcher waits for a free instance on a condition variable whose wake-up can be
# lost; it then sleeps its default 500 ms (core/src/dynamic_batch_scheduler.cc, default_wait_microseconds). With
# one instance this hits about one request in a thousand at concurrency 1; with two, a free instance is usually
# there. Each variant: the configs' instance counts set, served, perf_analyzer over REQUESTS requests with every
# request's latency exported (`perf sweep --request-count`), stopped.
# Needs: this project's venv (`make venv`); run from the checkout root. Results: $OUT (default build/stall).
# Repository: the tiny Swin (the stall does not depend on the model; a small one makes thousands of requests
# cheap), local flavor, ONNX Runtime. Images: builder/parity_images' 640x480 JPEGs.
# VARIANTS: "preprocess:classifier:postprocess instance counts ..." (default "1:1:1 2:1:2 2:2:2").
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-build/stall}
R=${REPO:-/tmp/stall-repo}
IMAGES=${IMAGES:-/tmp/stall-images}
mkdir -p "$OUT" "$IMAGES"
cp builder/parity_images/*_640x480.jpg "$IMAGES/"
$PYTHON -m builder repo --flavor local --output "$R" --engine onnxruntime \
  --model-kwargs '{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}' 2>&1 | tail -1
cp "$R/manifest.json" "$OUT/manifest.json"
for variant in ${VARIANTS:-1:1:1 2:1:2 2:2:2}; do
  $PYTHON - "$R" "$variant" <<'P'
import sys
from pathlib import Path
from builder.repository import configs
counts = dict(zip(("_preprocess", "_classifier", "_postprocess"), map(int, sys.argv[2].split(":"))))
for model_dir in Path(sys.argv[1]).iterdir():
    suffix = next((s for s in counts if model_dir.name.endswith(s)), None)
    if suffix:
        config = configs.read(model_dir / "config.pbtxt")
        config.instance_group[0].count = counts[suffix]
        configs.write(config, model_dir)
P
  work=/tmp/stall-server-${variant//:/-}
  $PYTHON -m builder serve --repository "$R" --workdir "$work" --detach --timeout 300 | tail -1
  $PYTHON -m perf sweep --models ${MODELS:-ensemble} --concurrency "${CONCURRENCY:-1,4}" --images "$IMAGES" \
    --request-count "${REQUESTS:-6000}" --label "instances preprocess:classifier:postprocess = $variant" \
    --output "$OUT/sweep-instances-${variant//:/-}.json" 2>&1 | grep INFO || true
  $PYTHON -m builder stop --workdir "$work"
done
$PYTHON -m perf tails "$OUT"/sweep-instances-*.json --output "$OUT/tails.png"
