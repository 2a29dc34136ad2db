#!/usr/bin/env bash
# Serve swin_tiny on the lent H100 with the pip tritonserver (2.51) of nvidia-pytriton and measure it with
# perf_analyzer 2.51: the `local` flavor with the TensorRT FP16 plan in the Python backend, the preprocess
# and postprocess models as in production. Python-backend models run on the GPU kit's Python 3.9
# (tensorrt 8.6, numpy) plus Pillow. Stages (from the checkout root, after h100_trt.sh export + build fp16):
#   bash perf/gpu/h100_serve.sh setup    # unpack the carried wheels (/tmp/wheels) where both Pythons see them
#   bash perf/gpu/h100_serve.sh repo     # python -m builder repo --flavor local --plan ... (torch env)
#   bash perf/gpu/h100_serve.sh sweep    # start the server, perf sweep, stop
#   bash perf/gpu/h100_serve.sh cudashm  # clients with none/system/cuda shared memory agree; perf_analyzer compares them
set -euo pipefail
K=/tmp/gpukit
W=/tmp/swin-work
OUT=${OUT:-build/gpu}
P312=/tmp/site312
mkdir -p "$OUT" "$P312"
stage=${1:?stage}
case "$stage" in
  setup)
    for w in /tmp/wheels/*.whl; do
      case "$w" in
        *cp312*) python3 -m zipfile -e "$w" "$P312" ;;
        *nvidia_pytriton*) python3 -m zipfile -e "$w" "$K/site" ;;
        *tritonclient*|*protobuf*) python3 -m zipfile -e "$w" "$K/site"; python3 -m zipfile -e "$w" "$P312" ;;
        *) python3 -m zipfile -e "$w" "$K/site" ;;
      esac
    done
    # tritonclient keeps its package under .data/purelib (a wheel with data files).
    for site in "$K/site" "$P312"; do cp -r "$site"/tritonclient-2.51.0.data/purelib/* "$site"/; done
    chmod +x "$K"/site/pytriton/tritonserver/bin/tritonserver "$K"/site/pytriton/tritonserver/python_backend_stubs/*/* \
      "$K"/site/tritonclient-2.51.0.data/data/bin/perf_analyzer
    # Pure-Python packages the clients CLI needs, taken from the machine's own Python.
    for pkg in packaging tqdm; do cp -r "$(python3 -c "import $pkg, os; print(os.path.dirname($pkg.__file__))")" "$K/site/"; done
    libs=$K/site/nvidia_pytriton.libs
    ln -sf "$(ls "$libs"/libb64-*.so.0d)" "$libs/libb64.so.0d"
    ln -sf "$(ls "$libs"/libcudart-*.so.12*)" "$libs/libcudart.so.12"
    $K/py39 -c "import PIL, tritonclient, google.protobuf, grpc, tensorrt; print('py39 ok', PIL.__version__)"
    PYTHONPATH=$P312 python3 -c "import tritonclient.grpc.model_config_pb2, grpc; print('py312 ok')"
    ;;
  repo)
    PYTHONPATH=$P312 python3 -m builder repo --flavor local --plan "$W/fp16/model.plan" --output /tmp/swin-repo \
      --max-batch-size 64 --preferred-batch-sizes 16,32,64 --max-queue-delay-us 2000 \
      --instance-kind KIND_GPU --instance-count 2 --preprocess-instances 2 2>&1 | tail -3
    cp /tmp/swin-repo/manifest.json "$OUT/manifest.json"
    ;;
  sweep)
    export PATH=$K/site/tritonclient-2.51.0.data/data/bin:$PATH
    export LD_LIBRARY_PATH=$K/site/nvidia_pytriton.libs:${LD_LIBRARY_PATH:-}
    $K/py39 -m builder serve --repository /tmp/swin-repo --workdir /tmp/swin-server --detach --timeout 300
    trap '$K/py39 -m builder stop --workdir /tmp/swin-server; cp /tmp/swin-server/tritonserver.log "$OUT/" || true' EXIT
    $K/py39 -m perf sweep --models ${MODELS:-classifier,ensemble} --protocols grpc --shared-memory ${SHM:-none,system} \
      --concurrency ${CONCURRENCY:-1,8,32,64} --batch-sizes 1 --images .gpurun/images \
      --measurement-interval-ms 3000 --stability-percent 15 --max-trials 6 \
      --label "H100, local flavor, TensorRT 8.6 FP16 plan in the Python backend" --output "$OUT/sweep.json"
    ;;
  cudashm)
    export PATH=$K/site/tritonclient-2.51.0.data/data/bin:$PATH
    export LD_LIBRARY_PATH=$K/site/nvidia_pytriton.libs:${LD_LIBRARY_PATH:-}
    $K/py39 -m builder serve --repository /tmp/swin-repo --workdir /tmp/swin-server --detach --timeout 300
    trap '$K/py39 -m builder stop --workdir /tmp/swin-server' EXIT
    for mode in ensemble classifier; do
      for shm in none system cuda; do
        $K/py39 -m clients classify --url localhost:8001 --json --top-k 3 --mode $mode --shared-memory $shm \
          .gpurun/images > "$OUT/client-$mode-$shm.jsonl"
      done
      cmp "$OUT/client-$mode-none.jsonl" "$OUT/client-$mode-system.jsonl"
      cmp "$OUT/client-$mode-none.jsonl" "$OUT/client-$mode-cuda.jsonl" && echo "clients $mode: none/system/cuda agree"
    done
    $K/py39 -m perf sweep --models classifier --protocols grpc --shared-memory none,system,cuda \
      --concurrency 16,64 --batch-sizes 1,8 --measurement-interval-ms 3000 --stability-percent 15 --max-trials 6 \
      --label "H100, transports for the TensorRT FP16 classifier" --output "$OUT/sweep-transport.json"
    ;;
esac
