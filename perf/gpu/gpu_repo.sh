# Sourced by the perf/gpu scripts: what they all set alike (PYTHON, SERVE_PYTHON, NAME, the checkout on
# PYTHONPATH); `gpu_photos DIR` copies the measured load, the bundled 640x480 JPEGs, into DIR; `gpu_repo ARGS...`
# builds the repository they measure into $REPO with $PYTHON: the local flavor, --preprocess gpu, GPU instances
# (INSTANCES and PREPROCESS_INSTANCES, 2 each), max batch MAX_BATCH (128; the photo path's PREPROCESS_MAX_BATCH, the
# same), preferred sizes PREFERRED (32,64,128),
# queue delay QUEUE_DELAY_US (500 us) and a queue of 4,096 requests. ARGS add the rest: the engine and its options.
gpu_repo() {
  $PYTHON -m builder repo --flavor local --output "$REPO" --preprocess gpu "$@" \
    --instance-kind KIND_GPU --instance-count "${INSTANCES:-2}" --preprocess-instances "${PREPROCESS_INSTANCES:-2}" \
    --max-batch-size "${MAX_BATCH:-128}" --preferred-batch-sizes "${PREFERRED:-32,64,128}" \
    --max-queue-delay-us "${QUEUE_DELAY_US:-500}" --max-queue-size 4096 \
    ${PREPROCESS_MAX_BATCH:+--preprocess-max-batch-size "$PREPROCESS_MAX_BATCH"}
}

PYTHON=${PYTHON:-python3}
SERVE_PYTHON=${SERVE_PYTHON:-$PYTHON}
NAME=swin_tiny_patch4_window7_224
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

gpu_photos() {
  mkdir -p "$1"
  cp builder/parity_images/*_640x480.jpg "$1/"
}
