"""Triton Python-backend model: the classifier on ONNX Runtime (`local` flavor).

The pip-distributed tritonserver has only the Python backend, so the `local`
flavor runs the same `model.onnx` with ONNX Runtime inside it. Its config has
the same name, tensors, batching and instance groups as the native
`onnxruntime_onnx` model of the `container` flavor, so clients cannot tell the
two apart. Requests of a dynamic batch run as one ONNX Runtime call.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Runs model.onnx from this version directory."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                     if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(path, options, providers=providers)

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        responses, start = [], 0
        for array in arrays:
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(self.output_name, logits[start:start + len(array)])]))
            start += len(array)
        return responses
