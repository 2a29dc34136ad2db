"""Triton Python-backend model: the photo path's tensors with no work, to measure what serving alone costs.

Written by `photo_designs.py null` as `<name>_null`, with the photo-path model's config (input, outputs,
batching, instances). Each request's images are read and answered with fixed outputs of the real shapes and
types, so a sweep of it gives the ceiling of the server, the Python backend and the client at that request
size: no photo path on this stack can serve more requests per second.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64, "TYPE_INT32": np.int32,
          "TYPE_STRING": np.object_}


class TritonPythonModel:
    """Fixed outputs of the photo path's shapes for every image of every request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.rows = {}  # output name -> one image's answer
        for output in config["output"]:
            dtype = _TYPES[output["data_type"]]
            row = np.zeros([int(d) for d in output["dims"]], dtype=dtype)
            if dtype is np.object_:
                row[...] = b"label"
            self.rows[output["name"]] = row

    def execute(self, requests):
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            n = len(images)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.repeat(row[None], n, axis=0)) for name, row in self.rows.items()]))
        return responses
