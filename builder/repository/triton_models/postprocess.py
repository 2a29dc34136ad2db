"""Triton Python-backend model: logits -> softmax probabilities (and the logits passed through).

Copied into the repository as `<name>_postprocess/<version>/model.py`. Outputs, in config order: the
probabilities and, when configured, the logits passed through for the ensemble; both are indexed by class and
carry the model's `labels.txt`, so top-k with class names is Triton's classification extension (a request's
`class_count`). All requests of a dynamic batch are computed in one vectorized pass.
"""

import json

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside tritonserver: importable, without the Triton utilities
    pb_utils = None


def softmax(logits):
    """Softmax over the classes of float logits (batch, classes), as float32."""
    logits = logits.astype(np.float32, copy=False)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return probs


class TritonPythonModel:
    """Softmax over the classifier's logits, batched across requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        names = [o["name"] for o in config["output"]]
        self.probabilities_name = names[0]
        self.logits_name = names[1] if len(names) > 1 else None

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        probs = softmax(np.concatenate(arrays))
        responses, start = [], 0
        for array in arrays:
            end = start + len(array)
            tensors = [pb_utils.Tensor(self.probabilities_name, probs[start:end])]
            if self.logits_name:
                tensors.append(pb_utils.Tensor(self.logits_name, array))
            responses.append(pb_utils.InferenceResponse(tensors))
            start = end
        return responses
