"""What every Python-backend model of the repository shares: Triton's logger and per-request error responses.

Copied beside each served `model.py` (the stub imports it from there), like `imaging.py`.
"""

import triton_python_backend_utils as pb_utils


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
