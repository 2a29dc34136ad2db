"""Transport under both clients: error mapping and retries, tritonclient connections (TLS, headers),
shared memory, and the ensemble/classifier request and response tensors."""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
import importlib

import numpy as np

from builder.core import contract as C
from clients.errors import (ClientError, InferenceFailed, InvalidImage, ModelNotFound, Overloaded, RequestTimeout,
                            ServerUnavailable, SettingsError)
from clients.settings import Classification, ClientSettings, ImageLike, Prediction, load_image


# -- errors and retries ---------------------------------------------------------

# Server errors are classified by their status: gRPC's code (tritonclient reports "StatusCode.UNAVAILABLE")
# or HTTP's (Triton maps each TRITONSERVER_Error code to one of each).
_STATUS_KINDS = {
    "INVALID_ARGUMENT": "invalid", "400": "invalid",
    "NOT_FOUND": "not_found", "404": "not_found",
    "DEADLINE_EXCEEDED": "timeout", "504": "timeout",
    "UNAVAILABLE": "unavailable", "503": "unavailable", "502": "unavailable",
    "RESOURCE_EXHAUSTED": "overloaded", "429": "overloaded",
}
# Triton answers UNAVAILABLE both for a full queue (overload: back off) and for a model without a ready version
# (starting, reloading: retry soon); only its message tells the two apart. The dynamic batcher's REJECT texts:
_OVERLOADED = ("Exceeds maximum queue size", "Request timeout expired")
# A model that exists but has no ready version yet (the server starting, a version loading) is reported as
# not found or unavailable, with these texts: transient, retried like an unreachable server.
_NOT_READY = ("has no available versions", "not at ready state", "is not ready")
# Failures below the protocol (no status: the connection itself) that mean "not reachable right now".
_UNREACHABLE = ("Connection refused", "connection refused", "Failed to connect", "failed to connect",
                "Connection reset", "Broken pipe", "Server disconnected", "Cannot connect")


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


def to_client_error(exc: BaseException) -> ClientError:
    """Maps a tritonclient / transport exception to a typed :class:`ClientError`, by its status code."""
    if isinstance(exc, ClientError):
        return exc
    # tritonclient's InferenceServerException carries the server's text in message().
    message = (exc.message() if callable(getattr(exc, "message", None)) else None) or str(exc)
    status = _status(exc)
    kind = _STATUS_KINDS.get(status.rsplit(".", 1)[-1])
    if kind == "overloaded" or (kind in (None, "unavailable") and any(s in message for s in _OVERLOADED)):
        return Overloaded(f"server overloaded: {message}", status)  # retrying at once would add to the flood
    if kind == "timeout" or isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return RequestTimeout(f"request timed out: {message}", status)
    if any(s in message for s in _NOT_READY):
        return ServerUnavailable(f"server unavailable: {message}", status)
    if kind == "invalid":
        return InvalidImage(message, status) if "image[" in message else InferenceFailed(message, status)
    if kind == "not_found":
        return ModelNotFound(message, status)
    if kind == "unavailable" or (kind is None and (isinstance(exc, (ConnectionError, OSError))
                                                   or any(s in message for s in _UNREACHABLE))):
        return ServerUnavailable(f"server unavailable: {message}", status)
    if kind is None and ("timed out" in message or "Deadline" in message):  # a client-side deadline
        return RequestTimeout(f"request timed out: {message}", status)
    return InferenceFailed(message, status)


def _retry_budget(settings: ClientSettings, error: ClientError) -> Optional[Tuple[str, int]]:
    """Which retry budget an error draws on, or None when it is not retried.

    Inference has no side effects. "Not reachable / not ready yet" is retried at once (with backoff), and a
    request the server rejected as overloaded is resubmitted after a growing backoff, so the flood drains
    instead of growing. Timeouts and rejected inputs are not retried: that only adds load.
    """
    if isinstance(error, ServerUnavailable):
        return "unavailable", settings.retries
    if isinstance(error, Overloaded):
        return "overloaded", settings.overload_retries
    return None


def _delay(settings: ClientSettings, attempt: int) -> float:
    return min(settings.max_backoff_s, settings.backoff_s * (2 ** attempt)) * (0.5 + random.random() / 2)


def _next_delay(settings: ClientSettings, error: ClientError, attempts: Dict[str, int]) -> Optional[float]:
    budget = _retry_budget(settings, error)
    if budget is None or attempts.get(budget[0], 0) >= budget[1]:
        return None
    attempt = attempts.get(budget[0], 0)
    attempts[budget[0]] = attempt + 1
    return _delay(settings, attempt)


def _with_retries(settings: ClientSettings, call: Callable[[], Any]) -> Any:
    attempts: Dict[str, int] = {}
    while True:
        try:
            return call()
        except Exception as exc:  # tritonclient raises several unrelated types
            error = to_client_error(exc)
            delay = _next_delay(settings, error, attempts)
            if delay is None:
                raise error from None
            time.sleep(delay)


async def _with_retries_async(settings: ClientSettings, call: Callable[[], Any]) -> Any:
    attempts: Dict[str, int] = {}
    while True:
        try:
            return await call()
        except Exception as exc:
            error = to_client_error(exc)
            delay = _next_delay(settings, error, attempts)
            if delay is None:
                raise error from None
            await asyncio.sleep(delay)


def rejected(sources: Sequence[str], error: ClientError) -> List[Classification]:
    """Each image of a request the server still rejected as overloaded after the retries, marked alone."""
    return [Classification(source, error=f"rejected: {error}") for source in sources]


# -- requests -------------------------------------------------------------------

def _module(protocol: str, aio: bool = False):
    if protocol == "grpc":
        if aio:
            import tritonclient.grpc.aio as module
        else:
            import tritonclient.grpc as module
    else:
        if aio:
            import tritonclient.http.aio as module
        else:
            import tritonclient.http as module
    return module


def _channel_args(settings: ClientSettings) -> list:
    # gRPC's own reconnect backoff grows to 120 s: a channel that saw the
    # server down would keep failing fast long after a restart. Cap it near
    # our retry delays; the user's arguments win.
    defaults = {"grpc.initial_reconnect_backoff_ms": 100, "grpc.min_reconnect_backoff_ms": 100,
                "grpc.max_reconnect_backoff_ms": int(max(settings.max_backoff_s, 0.1) * 1000)}
    defaults.update(dict(settings.grpc_channel_args))
    return list(defaults.items())


def _make_client(settings: ClientSettings, aio: bool = False):
    module = _module(settings.protocol, aio)
    if settings.protocol == "grpc":
        # tritonclient reads the certificate files itself: pass paths.
        return module.InferenceServerClient(
            settings.url, ssl=settings.ssl, root_certificates=settings.root_certificates,
            private_key=settings.private_key, certificate_chain=settings.certificate_chain,
            channel_args=_channel_args(settings))
    if aio:
        return module.InferenceServerClient(settings.url, conn_timeout=settings.connect_timeout_s,
                                            ssl=settings.ssl, ssl_context=_ssl_context(settings, "ssl"))
    factory = (lambda: _ssl_context(settings, "gevent.ssl")) if settings.ssl else None
    return module.InferenceServerClient(settings.url, connection_timeout=settings.connect_timeout_s,
                                        network_timeout=settings.timeout_s, ssl=settings.ssl,
                                        ssl_context_factory=factory, insecure=settings.insecure)


def _ssl_context(settings: ClientSettings, module_name: str):
    """The HTTP clients' TLS context: the CA bundle, the client certificate, verification unless insecure."""
    if not settings.ssl:
        return None

    ssl_module = importlib.import_module(module_name)  # gevent.ssl for the gevent-based sync client
    context = ssl_module.create_default_context(cafile=settings.root_certificates)
    if settings.certificate_chain:
        context.load_cert_chain(settings.certificate_chain, settings.private_key)
    if settings.insecure:
        context.check_hostname, context.verify_mode = False, ssl_module.CERT_NONE
    return context


def _infer_kwargs(settings: ClientSettings) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"model_version": settings.model_version, "headers": dict(settings.headers) or None}
    if settings.protocol == "grpc":
        kwargs["client_timeout"] = settings.timeout_s
    return kwargs


class _SharedMemory:
    """One reusable input region per worker (system or CUDA), grown on demand."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"swin-client-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.handle = None
        self.size = 0

    def _lib(self):
        if self.kind == "cuda":
            import tritonclient.utils.cuda_shared_memory as lib
        else:
            import tritonclient.utils.shared_memory as lib
        return lib

    def place(self, client, array: np.ndarray, tensor) -> None:
        """Writes `array` into the region (re-registering it larger if needed) and points `tensor` at it."""
        from tritonclient.utils import serialize_byte_tensor

        data = serialize_byte_tensor(array) if array.dtype == object else np.ascontiguousarray(array)
        nbytes = data.nbytes if data.dtype != object else len(data.item())
        if nbytes > self.size:
            self.release(client)
            self.size = max(nbytes, 1 << 20)
            lib = self._lib()
            if self.kind == "cuda":
                self.handle = lib.create_shared_memory_region(self.name, self.size, 0)
                client.register_cuda_shared_memory(self.name, lib.get_raw_handle(self.handle), 0, self.size)
            else:
                self.handle = lib.create_shared_memory_region(self.name, f"/{self.name}", self.size)
                client.register_system_shared_memory(self.name, f"/{self.name}", self.size)
        self._lib().set_shared_memory_region(self.handle, [data])
        tensor.set_shared_memory(self.name, nbytes)

    def release(self, client) -> None:
        if self.handle is None:
            return
        try:
            if self.kind == "cuda":
                client.unregister_cuda_shared_memory(self.name)
            else:
                client.unregister_system_shared_memory(self.name)
        except Exception:  # the server may be gone; the local region is freed regardless
            pass
        self._lib().destroy_shared_memory_region(self.handle)
        self.handle, self.size = None, 0


def _class_outputs(module, top_k: int, want_logits: bool) -> list:
    """The probabilities' top-k by Triton's classification extension (the server ranks and labels them), and the
    logits whole when wanted."""
    outputs = [module.InferRequestedOutput(C.PROBABILITIES, class_count=top_k)]
    return outputs + ([module.InferRequestedOutput(C.LOGITS)] if want_logits else [])


def _image_input(module, images: Sequence[bytes]):
    array = np.array(list(images), dtype=object).reshape(-1, 1)
    tensor = module.InferInput(C.IMAGE, list(array.shape), "BYTES")
    return tensor, array


def checked_request(images, top_k) -> list:
    """A classify call's arguments checked as the CLI checks them: the images as a list, top_k a count.

    One path or one encoded image given alone is one image (not a list of its characters or bytes).

    Raises:
        SettingsError: top_k is not a whole number of 1 or more.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise SettingsError(f"top_k: is {top_k!r}; use a whole number of 1 or more")
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)):
        return [images]
    return list(images)


def _source_name(image: ImageLike, position: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"#{position}"


def _load_all(images: Sequence[ImageLike], positions: Optional[Sequence[int]] = None
              ) -> Tuple[List[Tuple[int, Tuple[str, bytes]]], Dict[int, Classification]]:
    """Loads every input; unreadable ones become failed Classifications at their position.

    Args:
        images: The inputs.
        positions: Their positions in the caller's list (default 0..n-1).
    """
    loaded, failed = [], {}
    for position, image in zip(positions if positions is not None else range(len(images)), images):
        try:
            loaded.append((position, load_image(image, position)))
        except ClientError as exc:
            failed[position] = Classification(_source_name(image, position), error=str(exc))
    return loaded, failed


def parse_classifications(entries) -> List[Tuple[Prediction, ...]]:
    """Rows of Triton's classification strings ("score:index:label", best first) as Predictions.

    The label is everything after the second colon (class names may hold colons); an output without a labels
    file has no third field, and its label is the index.
    """
    rows = []
    for row in entries:
        predictions = []
        for entry in row:
            score, index, *label = (entry.decode("utf-8") if isinstance(entry, bytes) else str(entry)).split(":", 2)
            predictions.append(Prediction(int(index), label[0] if label else index, float(score)))
        rows.append(tuple(predictions))
    return rows


def _params_from_config(config: dict):
    from builder.core.imaging import PreprocessParams

    config = config.get("config", config)  # gRPC wraps it, HTTP does not
    return PreprocessParams.from_parameters({k: v["string_value"] for k, v in config["parameters"].items()})


class _Engine:
    """Protocol-independent request logic shared by the sync and asyncio clients."""

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self.names = C.Contract.named(settings.model)
        self.module = _module(settings.protocol)

    def chunks(self, items: Sequence[Tuple[str, bytes]]) -> List[List[int]]:
        size = self.settings.max_batch
        return [list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size)]

    def ensemble_request(self, images: Sequence[bytes], top_k: int, want_logits: bool):
        tensor, array = _image_input(self.module, images)
        return tensor, array, _class_outputs(self.module, top_k, want_logits)

    def results(self, sources, response, want_logits: bool) -> List[Classification]:
        rows = parse_classifications(response.as_numpy(C.PROBABILITIES))
        logits = response.as_numpy(C.LOGITS) if want_logits else None
        return [Classification(src, row, None if logits is None else logits[i], None)
                for i, (src, row) in enumerate(zip(sources, rows))]
