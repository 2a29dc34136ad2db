# Sourced by the perf/gpu scripts. `gpu_repo ARGS...` builds the repository they measure into $REPO with
# $PYTHON: the local flavor, --preprocess gpu, GPU instances (INSTANCES and PREPROCESS_INSTANCES, 2 each), max
# batch MAX_BATCH (128), preferred sizes PREFERRED (32,64,128), queue delay QUEUE_DELAY_US (500 us) and a queue
# of 4,096 requests. ARGS add the rest: the engine and its options.
gpu_repo() {
  $PYTHON -m builder repo --flavor local --output "$REPO" --preprocess gpu "$@" \
    --instance-kind KIND_GPU --instance-count "${INSTANCES:-2}" --preprocess-instances "${PREPROCESS_INSTANCES:-2}" \
    --max-batch-size "${MAX_BATCH:-128}" --preferred-batch-sizes "${PREFERRED:-32,64,128}" \
    --max-queue-delay-us "${QUEUE_DELAY_US:-500}" --max-queue-size 4096
}
