"""Triton Python-backend model: encoded image bytes -> normalized pixels.

Copied into the repository as `<name>_preprocess/<version>/model.py`, with
`imaging.py` beside it. The transform's parameters come from the model's
config `parameters` (written from timm's data config by the builder) and are
read once in `initialize`. Requests that the dynamic batcher groups are decoded
together on a thread pool (Pillow releases the GIL while decoding and
resampling); an image that fails answers its own request with an error naming
the item, and the other requests of the batch are served.
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

try:  # imported as part of the project
    from . import imaging
except ImportError:  # inside tritonserver: imaging.py lies beside model.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import imaging


class TritonPythonModel:
    """Decodes and transforms images, batched across requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.params = imaging.PreprocessParams.from_parameters(params)
        self.input_name = config["input"][0]["name"]
        output = config["output"][0]
        self.output_name = output["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        threads = int(params.get("threads", "0")) or min(8, os.cpu_count() or 1)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="preprocess")

    def _one(self, data):
        try:
            return imaging.preprocess(imaging.as_bytes(data), self.params), None
        except imaging.ImageError as exc:
            return None, str(exc)

    def execute(self, requests):
        per_request = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy().reshape(-1)
                       for r in requests]
        flat = [item for items in per_request for item in items]
        results = list(self.pool.map(self._one, flat))
        responses, start = [], 0
        for items in per_request:
            mine = results[start:start + len(items)]
            start += len(items)
            failed = [f"{self.input_name}[{i}]: {err}" for i, (_, err) in enumerate(mine) if err]
            if failed:
                # INVALID_ARG makes it a client error (HTTP 400), not a server fault.
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                error = (pb_utils.TritonError("; ".join(failed), code) if code is not None
                         else pb_utils.TritonError("; ".join(failed)))
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            batch = np.stack([pixels for pixels, _ in mine]).astype(self.output_dtype, copy=False)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, batch)]))
        return responses

    def finalize(self):
        self.pool.shutdown(wait=False)
