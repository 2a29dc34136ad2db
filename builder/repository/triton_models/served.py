"""What the Python-backend models that decode photos share: the start of `initialize`, Triton's logger and
per-request error responses.

Copied beside the preprocess model's and the photo path's `model.py` (the stub imports it from there), like
`imaging.py` (`models.SERVED_MODULES`).
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor

import triton_python_backend_utils as pb_utils


def model_setup(args):
    """What `initialize` starts with: the model's config, its string parameters, and the device this instance
    runs on ("cuda:N" for a GPU instance, else "cpu"); a GPU instance's torch CPU threads are set as the config
    says (`intra_op_threads`, decided by `settings.torch_threads`)."""
    config = json.loads(args["model_config"])
    params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
    on_gpu = args.get("model_instance_kind") == "GPU"
    device = f"cuda:{int(args.get('model_instance_device_id', 0) or 0)}" if on_gpu else "cpu"
    threads = int(params.get("intra_op_threads", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    return config, params, device


def exact_pool(params, name: str) -> ThreadPoolExecutor:
    """The threads the exact path decodes on (Pillow releases the GIL): the config's `threads`, else up to 8."""
    workers = int(params.get("threads", "0")) or min(8, os.cpu_count() or 1)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)


def log_info(message: str) -> None:
    """Logs through the server's log (`pb_utils.Logger` exists once the stub runs a model, so it is looked up
    at each call, not at import)."""
    pb_utils.Logger.log_info(message)


def log_warn(message: str) -> None:
    """Logs a warning through the server's log."""
    pb_utils.Logger.log_warn(message)


def error_response(message: str):
    """A response that fails one request with `message` as a client error (INVALID_ARG, HTTP 400)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
