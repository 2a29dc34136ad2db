"""Triton Python-backend model: the classifier for servers without native backends (`local` flavor).

The pip-distributed tritonserver has only the Python backend, so the `local`
flavor runs the classifier here: a TensorRT plan when the version directory
holds `model.plan` (through `builder.trt.PlanRunner`, copied beside this file
with the two numpy-only modules it needs), else `model.onnx` on ONNX Runtime.
Its config has the same name, tensors, batching and instance groups as the
native `onnxruntime_onnx` / `tensorrt_plan` models of the `container` flavor,
so clients cannot tell them apart. Requests of a dynamic batch run as one call.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _onnxruntime(path, params):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(path, options, providers=providers)
    return lambda name, batch: session.run(None, {name: batch})[0]


def _tensorrt(path, device):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from builder.trt import PlanRunner  # the copy beside this file

    runner = PlanRunner(path, device=device)
    return lambda name, batch: next(iter(runner(batch).values())).astype(np.float32, copy=False)


class TritonPythonModel:
    """Runs model.plan (TensorRT) or model.onnx (ONNX Runtime) from this version directory."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        plan = os.path.join(version_dir, "model.plan")
        if os.path.isfile(plan):
            self.run = _tensorrt(plan, int(args.get("model_instance_device_id", 0) or 0))
        else:
            self.run = _onnxruntime(os.path.join(version_dir, "model.onnx"), params)

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        logits = self.run(self.input_name, batch)
        responses, start = [], 0
        for array in arrays:
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(self.output_name, logits[start:start + len(array)])]))
            start += len(array)
        return responses
