#!/usr/bin/env bash
# `--preprocess draft` against `exact` on one host, CPU only: large JPEGs (3 and 12 MP) through the preprocessing
# alone (`perf preprocess`) and served (the preprocess model and the ensemble, perf_analyzer over gRPC).
# Needs: this project's venv (`make venv`); run from the checkout root. Results: $OUT (default build/draft).
# Images: builder/parity_images (640x480 JPEGs; a 2048x1536 JPEG and a 4032x3024 one made from it).
# One repository serves both: built with --preprocess draft, then its preprocess config switched to exact
# (`jpeg_draft: "False"`), so the classifier and everything else stay the same.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-build/draft}
R=${REPO:-/tmp/draft-repo}
IMAGES=${IMAGES:-/tmp/draft-images}
THREADS=${THREADS:-$($PYTHON -c "import os; print(min(8, os.cpu_count() or 1))")}
mkdir -p "$OUT" "$IMAGES/typical" "$IMAGES/large"
cp builder/parity_images/*_640x480.jpg "$IMAGES/typical/"
cp builder/parity_images/astronaut_2048x1536.jpg "$IMAGES/large/"
[ -f "$IMAGES/large/astronaut_4032x3024.jpg" ] || $PYTHON -c "from PIL import Image; Image.open('$IMAGES/large/astronaut_2048x1536.jpg').resize((4032, 3024), Image.BICUBIC).save('$IMAGES/large/astronaut_4032x3024.jpg', quality=85)"
$PYTHON -m builder repo --flavor local --output "$R" --preprocess draft --engine onnxruntime 2>&1 | tail -1
cp "$R/manifest.json" "$OUT/manifest.json"
for set in large typical; do
  $PYTHON -m perf preprocess --repository "$R" --images "$IMAGES/$set" --decoders none --cpu exact,draft \
    --batches 1,8 --threads "$THREADS" --warmup 2 --iterations 60 --output "$OUT/preprocess-$set.json" 2>&1 | grep INFO
done
for variant in draft exact; do
  $PYTHON - "$R" "$variant" <<'P'
import sys
from pathlib import Path
from builder.repository import configs
model_dir = next(p for p in Path(sys.argv[1]).iterdir() if p.name.endswith("_preprocess"))
config = configs.read(model_dir / "config.pbtxt")
config.parameters["jpeg_draft"].string_value = str(sys.argv[2] == "draft")
configs.write(config, model_dir)
P
  $PYTHON -m builder serve --repository "$R" --workdir "/tmp/draft-server-$variant" --detach --timeout 300 | tail -1
  for model in preprocess ensemble; do
    $PYTHON -m perf sweep --models "$model" --shared-memory none --protocols grpc --batch-sizes 1 \
      --concurrency "${CONCURRENCY:-1,4}" --images "$IMAGES/large" --measurement-interval-ms 4000 \
      --stability-percent 20 --max-trials 6 --label "$model, 2048x1536 and 4032x3024 JPEGs, $variant preprocessing" \
      --output "$OUT/sweep-$model-$variant.json" 2>&1 | grep -iE "img/s|infer/s" || true
  done
  $PYTHON -m builder stop --workdir "/tmp/draft-server-$variant"
done
