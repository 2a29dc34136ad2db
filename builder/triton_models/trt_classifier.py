"""Triton Python-backend model: the classifier as a TensorRT plan (`local` flavor on a GPU host).

For servers without the native tensorrt backend (the pip-distributed
tritonserver): the plan runs through `builder.trt.PlanRunner` (TensorRT's
Python API plus the CUDA runtime through ctypes), copied beside this file with
the two numpy-only modules it needs. Requests of a dynamic batch run as one
engine call. Same name, tensors and batching as every other classifier flavor.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from builder.trt import PlanRunner  # noqa: E402  (the copy beside this file)


class TritonPythonModel:
    """Runs model.plan from this version directory."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.runner = PlanRunner(os.path.join(args["model_repository"], args["model_version"], "model.plan"),
                                 device=int(args.get("model_instance_device_id", 0) or 0))

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        logits = self.runner(batch)[self.output_name].astype(np.float32, copy=False)
        responses, start = [], 0
        for array in arrays:
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(self.output_name, logits[start:start + len(array)])]))
            start += len(array)
        return responses
