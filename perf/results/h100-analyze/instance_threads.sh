#!/usr/bin/env bash
# The inductor classifier with 2 GPU instances, torch's default CPU thread pool (intra_op_threads 0) against one
# thread per instance (1, the builder's default for GPU instances since this measurement), on one GPU host.
# One FP32 tensor per gRPC request from perf_analyzer (random data), concurrency 16 and 64.
# Needs: PYTHON with torch (CUDA), timm and onnx; SERVE_PYTHON as in gpu_data_path.sh; perf_analyzer on PATH.
# Run from the checkout root. Results: $OUT (default build/instance-threads).
set -u
source perf/gpu/gpu_repo.sh  # the shared preamble: PYTHON, SERVE_PYTHON, NAME, PYTHONPATH
OUT=${OUT:-build/instance-threads}
R=${REPO:-/tmp/threads-repo}
M=swin_tiny_patch4_window7_224_classifier
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PYTHON -m builder repo --flavor local --output "$R" --engine inductor --preprocess gpu --instance-kind KIND_GPU \
  --instance-count 2 --preprocess-instances 2 --max-batch-size 128 --preferred-batch-sizes 32,64,128 \
  --max-queue-delay-us 500 --max-queue-size 4096 2>&1 | tail -1
for threads in 0 1; do
  $PYTHON - "$R/$M/config.pbtxt" $threads <<'P'
import re, sys
path, threads = sys.argv[1], sys.argv[2]
text = open(path).read()
text = re.sub(r'(key: "intra_op_threads"\n\s*value \{\n\s*string_value: )"\d+"', r'\g<1>"%s"' % threads, text)
open(path, "w").write(text)
P
  $SERVE_PYTHON -m builder serve --repository "$R" --workdir "/tmp/threads-server-$threads" --detach --timeout 600 \
    2>&1 | tail -1
  for c in 16 64; do
    perf_analyzer -m $M -i grpc -u 127.0.0.1:8001 --concurrency-range $c --measurement-interval 4000 \
      --stability-percentage 25 --max-trials 6 -f "$OUT/perf_analyzer-threads$threads-$c.csv" > "$OUT/pa.log" 2>&1
    echo "intra_op_threads=$threads concurrency=$c: $(grep -E 'Throughput|p99 latency' "$OUT/pa.log" | tr -s ' ' | tr '\n' ' ')"
  done
  $SERVE_PYTHON -m builder stop --workdir "/tmp/threads-server-$threads"
done
