#!/usr/bin/env bash
# The README's GPU quick start as typed, measured: `make repo FLAVOR=local PREPROCESS=gpu && make serve` builds
# and serves the photo path with no tuning numbers; beside it, in the same run on the same GPU, the best setup
# tuned by hand (HAND_TUNED, below). One image per request at concurrency 1, 128 and 256, eight at 128, gRPC.
# Needs what perf/gpu/photo_path.sh needs (PYTHON, SERVE_PYTHON, perf_analyzer on PATH). Run from the checkout:
#   bash perf/gpu/as_built.sh repo      # `make repo FLAVOR=local PREPROCESS=gpu`, through the Makefile's own line
#   bash perf/gpu/as_built.sh sweep     # `make serve` (its line), the sweep; then the hand-tuned copy, the sweep
#   bash perf/gpu/as_built.sh metrics   # what the metrics cost: `make serve METRICS=off|counters|summaries`, each
#                                       # swept with one image per request at c1 and c256
# Images: builder/parity_images/*_640x480.jpg (the bundled photos, 640x480 JPEGs).
set -euo pipefail
source "$(dirname "$0")/gpu_repo.sh"
OUT=${OUT:-build/as-built}
REPO=${REPO:-/tmp/swin-as-built}
WORK=${WORK:-/tmp/swin-as-built-server}
IMAGES=${IMAGES:-/tmp/swin-photo-images}
# The hand-tuned variant: the as-built repository with the classifier's queue delay of perf/gpu/gpu_repo.sh (500 us)
# instead of the build's 0 (the only setting of the measured recipe the build does not take).
HAND_DELAY_US=${HAND_DELAY_US:-500}
mkdir -p "$OUT"
gpu_photos "$IMAGES"

# A README make line's builder command, as the Makefile writes it, run with $1 (this host may have no venv); $EXTRA
# is appended (where only: the server's workdir).
as_typed() {
  local py=$1; shift
  local line; line=$(make -s -n -o .venv/.installed "$@" REPO="$REPO" | sed -e ':a' -e '/\\$/{N;s/\\\n//;ba}' \
    | grep -- ' -m builder ')
  echo "as typed: make $* -> ${line#*python } ${EXTRA:-}" >&2
  eval "$py ${line#*python } ${EXTRA:-}"
}

sweep() {  # $1: tag; $2 (optional): "load" sweeps one image per request at c1 and c256 only
  common=(--name "$NAME" --models ensemble --protocols grpc --shared-memory none --measurement-interval-ms
          "${INTERVAL_MS:-3000}" --stability-percent 15 --max-trials 5 --images "$IMAGES"
          --client-threads "${CLIENT_THREADS:-16}")
  local concurrency=1,128,256; [ "${2:-}" = load ] && concurrency=1,256
  $PYTHON -m perf sweep "${common[@]}" --batch-sizes 1 --concurrency $concurrency \
    --label "$1, 1 x 640x480 JPEG per request" --output "$OUT/sweep-$1-b1.json"
  [ "${2:-}" = load ] && return
  $PYTHON -m perf sweep "${common[@]}" --batch-sizes 8 --concurrency 128 \
    --label "$1, 8 x 640x480 JPEG per request" --output "$OUT/sweep-$1-b8.json"
}

case "${1:?stage}" in
  repo)
    as_typed "$PYTHON" repo FLAVOR=local PREPROCESS=gpu 2>&1 | grep -v "^\s*$" | tail -12
    cp "$REPO/manifest.json" "$OUT/manifest.json"
    ;;
  sweep)
    for tag in as-built hand-tuned; do
      served=$REPO
      if [ "$tag" = hand-tuned ]; then
        served=${REPO}-hand; rm -rf "$served"; cp -r "$REPO" "$served"
        sed -i "s/max_queue_delay_microseconds: 0$/max_queue_delay_microseconds: $HAND_DELAY_US/" \
          "$served/${NAME}_classifier/config.pbtxt"
      fi
      REPO=$served EXTRA="--workdir $WORK" as_typed "$SERVE_PYTHON" serve 2>&1 | tail -3
      started=$SECONDS
      sweep "$tag" || true  # a failed point is in its row; the stop below still runs
      stop_from=$SECONDS
      $SERVE_PYTHON -m builder stop --workdir "$WORK"
      echo "$tag: sweep $((stop_from - started)) s, stop $((SECONDS - stop_from)) s"
      cp "$WORK/tritonserver.log" "$OUT/tritonserver-$tag.log" || true
    done
    ;;
  metrics)  # the same repository served three times, only the metrics port's exports changed
    for metrics in off counters summaries; do
      EXTRA="--workdir $WORK" as_typed "$SERVE_PYTHON" serve METRICS=$metrics 2>&1 | tail -2
      sweep "metrics-$metrics" load || true
      $SERVE_PYTHON -m builder stop --workdir "$WORK"
    done
    ;;
  *) echo "stages: repo, sweep, metrics" >&2; exit 2 ;;
esac
