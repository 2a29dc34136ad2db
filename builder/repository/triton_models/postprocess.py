"""Triton Python-backend model: logits -> top-k probabilities and class names.

Copied into the repository as `<name>_postprocess/<version>/model.py` with
`labels.txt` beside it. Outputs, in config order: scores, classes, labels
(k is their length in the config) and, when configured, the logits passed
through for the ensemble. All requests of a dynamic batch are computed in one
vectorized pass.
"""

import json
import os

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside tritonserver: `top_k` is also the clients' local postprocessing
    pb_utils = None


def top_k(logits, k):
    """Softmax probabilities and indices of the k largest logits, best first.

    Args:
        logits: float array (batch, classes).
        k: How many classes to keep (at most `classes`).

    Returns:
        (scores float32 (batch, k), indices int64 (batch, k)).
    """
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, logits.shape[1])
    part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(-probs, part, axis=1).argsort(axis=1, kind="stable")
    indices = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return np.take_along_axis(probs, indices, axis=1), indices


class TritonPythonModel:
    """Top-k over the classifier's logits, batched across requests."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        names = [o["name"] for o in config["output"]]
        self.scores_name, self.classes_name, self.labels_name = names[:3]
        self.logits_name = names[3] if len(names) > 3 else None
        self.k = int(config["output"][0]["dims"][0])
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "labels.txt"), encoding="utf-8") as f:
            self.labels = np.array([line.rstrip("\n").encode("utf-8") for line in f], dtype=object)

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        scores, indices = top_k(np.concatenate(arrays), self.k)
        responses, start = [], 0
        for array in arrays:
            end = start + len(array)
            idx = indices[start:end]
            tensors = [pb_utils.Tensor(self.scores_name, scores[start:end]),
                       pb_utils.Tensor(self.classes_name, idx),
                       pb_utils.Tensor(self.labels_name, self.labels[idx])]
            if self.logits_name:
                tensors.append(pb_utils.Tensor(self.logits_name, array))
            responses.append(pb_utils.InferenceResponse(tensors))
            start = end
        return responses
