#!/usr/bin/env bash
# Model Analyzer and `perf tune` on the same classifier, same load, same grid, on one GPU host.
# Needs: a repository built by this project (REPO, default /tmp/swin-auto-repo from engine_auto.sh);
# SERVE_PYTHON: the Python whose `python3` the Python-backend stub uses, with this project's packages and
# tritonclient[http,grpc]==2.51.0; ANALYZER: a `model-analyzer` 1.58 executable in its own environment
# (`make analyzer`: triton-model-analyzer==1.58.0, protobuf<=6.33.6); perf_analyzer on PATH.
# Both tools keep the repository's preferred batch sizes, so max_batch_size stays at the repository's own
# (MAX_BATCH) and both vary the instance count; both send one FP32 tensor per request over gRPC, at
# concurrency MIN_CONCURRENCY..MAX_CONCURRENCY, with WINDOW_MS time windows. Run from the checkout root:
#   bash perf/gpu/analyze_vs_tune.sh analyze   # perf analyze (Model Analyzer, remote mode, brute search)
#   bash perf/gpu/analyze_vs_tune.sh tune      # perf tune on a server in explicit mode
set -euo pipefail
source "$(dirname "$0")/gpu_repo.sh"  # the shared preamble: PYTHON, SERVE_PYTHON, NAME, PYTHONPATH
ANALYZER=${ANALYZER:-.venv-analyzer/bin/model-analyzer}
REPO=${REPO:-/tmp/swin-auto-repo}
OUT=${OUT:-build/gpu-analyze}
MAX_BATCH=${MAX_BATCH:-128}
INSTANCES=${INSTANCES:-1,2}
WINDOW_MS=${WINDOW_MS:-5000}
MIN_CONCURRENCY=${MIN_CONCURRENCY:-16}
MAX_CONCURRENCY=${MAX_CONCURRENCY:-128}
mkdir -p "$OUT"
case "${1:?stage}" in
  analyze)
    $SERVE_PYTHON -m perf analyze --repository "$REPO" --models classifier --analyzer "$ANALYZER" \
      --max-instances "${INSTANCES##*,}" --min-batch "$MAX_BATCH" --max-batch "$MAX_BATCH" \
      --min-concurrency "$MIN_CONCURRENCY" --max-concurrency "$MAX_CONCURRENCY" \
      --measurement-interval-ms "$WINDOW_MS" --output "$OUT/model-analyzer" > "$OUT/analyze.log" 2>&1 \
      || { tail -20 "$OUT/analyze.log"; exit 1; }  # on failure, the end of the log (the error)
    tail -4 "$OUT/analyze.log"
    rm -rf "$OUT/model-analyzer/server" "$OUT/model-analyzer/output_models" "$OUT/model-analyzer/checkpoints"
    ;;
  tune)
    concurrency=$(python3 -c "import sys; lo, hi = int(sys.argv[1]), int(sys.argv[2]); \
print(','.join(str(c) for c in (1 << i for i in range(12)) if lo <= c <= hi))" "$MIN_CONCURRENCY" "$MAX_CONCURRENCY")
    $SERVE_PYTHON -m builder serve --repository "$REPO" --workdir /tmp/tune-server --detach \
      --model-control explicit --timeout 600 --cuda-memory-pool-mb 4096
    trap '$SERVE_PYTHON -m builder stop --workdir /tmp/tune-server' EXIT
    $SERVE_PYTHON -m perf tune --repository "$REPO" --instance-counts "$INSTANCES" \
      --queue-delays-us "${QUEUE_DELAY_US:-500}" --max-batch-sizes "$MAX_BATCH" --server-workdir /tmp/tune-server \
      --concurrency "$concurrency" --measurement-interval-ms "$WINDOW_MS" --stability-percent 15 \
      --output "$OUT/tune.json" > "$OUT/tune.log" 2>&1 || { tail -20 "$OUT/tune.log"; exit 1; }
    grep -E "\] |best" "$OUT/tune.log" | tail -6
    ;;
  *) echo "stages: analyze, tune" >&2; exit 2 ;;
esac
