#!/usr/bin/env bash
# A TensorRT plan served by the `local` flavor's Python-backend classifier (Polygraphy's runner), on one GPU host.
# The tiny Swin is exported, its FP16 plan built and gated, and the repository written. tritonserver loads only
# the classifier. Eight concurrent gRPC requests (dynamic batches) are compared with PyTorch's logits, and the
# model is unloaded (finalize closes the runner).
# Needs: PYTHON with torch, timm, onnx and tritonclient[grpc]; TRT_PYTHON with tensorrt, numpy and polygraphy;
# TRITONSERVER: a tritonserver folder (bin/, lib/, backends/) whose backends/python stub is for STUB_BIN's python3;
# STUB_BIN: a folder whose `python3` has numpy, tensorrt and polygraphy (the stub takes python3 from PATH);
# LD_LIBRARY_PATH with tritonserver's libraries and TensorRT's. Run from the checkout root.
set -euo pipefail
source perf/gpu/gpu_repo.sh  # the shared preamble: PYTHON, SERVE_PYTHON, NAME, PYTHONPATH
TRT=${TRT_PYTHON:?a Python with tensorrt and polygraphy}
W=${OUT:-build/served-plan-check}
TINY='{"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}'
mkdir -p "$W"
export PYTHONUNBUFFERED=1
$PYTHON -m builder export --output "$W/model.onnx" --model-kwargs "$TINY" --images builder/parity_images \
  --reference "$W/reference.npz" --reference-batch 64 2>&1 | tail -1
$TRT -m builder.engines.trt build --onnx "$W/model.onnx" --plan "$W/plan/model.plan" --precision fp16 \
  --max-batch 8 --opt-batch 8 --timing-batches 1,4,8 --tactic-sources "${TACTICS:-edge_mask_convolutions,jit_convolutions}" \
  --reference "$W/reference.npz" --max-abs 0.05 --min-cosine 0.999 --min-top1 0.9 > "$W/build.json" 2> "$W/build.log" \
  || { tail -5 "$W/build.log"; exit 1; }
rm -rf "$W/repo"
$PYTHON -m builder repo --flavor local --output "$W/repo" --engine tensorrt --plan "$W/plan/model.plan" \
  --model-kwargs "$TINY" --instance-kind KIND_GPU --instance-count 1 --max-batch-size 8 \
  --preferred-batch-sizes 4,8 --max-queue-delay-us 2000 2>&1 | tail -1
PATH=$STUB_BIN:$PATH "$TRITONSERVER/bin/tritonserver" --model-repository="$W/repo" \
  --backend-directory="$TRITONSERVER/backends" --model-control-mode=explicit --load-model=${NAME}_classifier \
  --http-port=18000 --grpc-port=18001 --metrics-port=18002 > "$W/tritonserver.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
$PYTHON - "$W" "${NAME}_classifier" <<'P'
import concurrent.futures, json, sys, time

import numpy as np
import tritonclient.grpc as grpcclient

work, model = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient("localhost:18001")
for _ in range(240):
    try:
        if client.is_model_ready(model):
            break
    except Exception:
        pass
    time.sleep(0.5)
else:
    sys.exit(f"{model} did not become ready; see {work}/tritonserver.log")
config = client.get_model_config(model, as_json=True)["config"]
reference = np.load(f"{work}/reference.npz")
inputs, expected = reference["inputs"][:16].astype(np.float32), reference["logits"][:16]

def infer(i):
    tensor = grpcclient.InferInput("input", [1, *inputs.shape[1:]], "FP32")
    tensor.set_data_from_numpy(inputs[i:i + 1])
    return client.infer(model, [tensor]).as_numpy("logits")

with concurrent.futures.ThreadPoolExecutor(8) as pool:
    served = np.concatenate(list(pool.map(infer, range(len(inputs)))))
stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
diff = np.abs(served - expected)
result = {"requests": len(inputs), "max_abs_vs_pytorch": float(diff.max()),
          "top1_agreement": float((served.argmax(1) == expected.argmax(1)).mean()),
          "inference_count": int(stats["inference_count"]), "execution_count": int(stats["execution_count"]),
          "force_cpu_only_input_tensors": config["parameters"]["FORCE_CPU_ONLY_INPUT_TENSORS"]["string_value"]}
client.unload_model(model)
for _ in range(60):
    if not client.is_model_ready(model):
        break
    time.sleep(0.5)
result["unloaded"] = not client.is_model_ready(model)
print(json.dumps(result))
P
sleep 2
grep -E "never deactivated|Traceback|error" "$W/tritonserver.log" | head -5 || echo "tritonserver log: no errors, no runner left active"
