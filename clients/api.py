"""A small typed API over tritonclient for the Swin ensemble (and the bare classifier).

    from clients import Classifier, ClientSettings

    with Classifier(ClientSettings(url="localhost:8001", model="swin_tiny_patch4_window7_224")) as c:
        for result in c.classify(["cat.jpg", open("dog.png", "rb").read()], top_k=3):
            print(result.source, result.top1.label if result.ok else result.error)

Images may be encoded bytes, file paths, HWC uint8 numpy arrays or PIL images.
They are sent `max_batch` per request with up to `concurrency` requests in
flight. A request whose image the server rejects is re-sent image by image, so
one bad upload fails alone and names itself. Retries (with exponential
backoff) happen only where they are safe: the server is unreachable or not
ready yet. Tensor and model names come from `builder.contract`.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from builder import contract as C
from clients.errors import (ClientError, InferenceFailed, InvalidImage, ModelNotFound, Overloaded, RequestTimeout,
                            ServerUnavailable, SettingsError)

ImageLike = Union[bytes, bytearray, str, os.PathLike, np.ndarray, Any]
PROTOCOLS = ("grpc", "http")
SHARED_MEMORY = ("none", "system", "cuda")
MODES = ("ensemble", "classifier")


@dataclass(frozen=True)
class ClientSettings:
    """How to reach and call the server.

    Attributes:
        url: host:port (gRPC default port 8001, HTTP 8000).
        protocol: `grpc` or `http`.
        model: Ensemble name (the timm model name unless renamed).
        model_version: Pin a version ("" = the server's choice).
        mode: `ensemble` (server-side preprocessing) or `classifier` (the
            same preprocessing done here, raw pixels sent to the classifier).
        timeout_s: Per-request timeout.
        connect_timeout_s: Connection timeout (HTTP; gRPC uses timeout_s).
        retries: Extra attempts when the server is unavailable.
        backoff_s: First retry delay; doubles each attempt, with jitter.
        max_backoff_s: Longest delay between two attempts.
        max_batch: Images per request.
        concurrency: Requests in flight.
        ssl: Use TLS.
        root_certificates: CA bundle path for TLS (both protocols).
        private_key: Client key path (mutual TLS, both protocols).
        certificate_chain: Client certificate path (mutual TLS, both protocols).
        insecure: HTTP TLS without certificate verification.
        headers: Extra request headers, e.g. (("authorization", "Bearer ..."),).
        shared_memory: Send inputs through `system` or `cuda` shared memory
            (client and server on the same host).
        grpc_channel_args: Extra gRPC channel arguments (see `load_balanced`).
    """

    url: str = "localhost:8001"
    protocol: str = "grpc"
    model: str = "swin_tiny_patch4_window7_224"
    model_version: str = ""
    mode: str = "ensemble"
    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 2.0
    max_batch: int = 8
    concurrency: int = 4
    ssl: bool = False
    root_certificates: Optional[str] = None
    private_key: Optional[str] = None
    certificate_chain: Optional[str] = None
    insecure: bool = False
    headers: Tuple[Tuple[str, str], ...] = ()
    shared_memory: str = "none"
    grpc_channel_args: Tuple[Tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        def fail(name: str, problem: str, fix: str) -> None:
            raise SettingsError(f"{name}: {problem}; {fix}")

        if self.protocol not in PROTOCOLS:
            fail("protocol", f"{self.protocol!r} is unknown", "use grpc or http")
        if self.mode not in MODES:
            fail("mode", f"{self.mode!r} is unknown", "use ensemble or classifier")
        if self.shared_memory not in SHARED_MEMORY:
            fail("shared_memory", f"{self.shared_memory!r} is unknown", f"use one of {SHARED_MEMORY}")
        grpc_target = self.protocol == "grpc" and self.url.startswith(("dns:", "ipv4:", "ipv6:", "unix:"))
        if not grpc_target and ("://" in self.url or ":" not in self.url):
            fail("url", f"{self.url!r} is not host:port", "e.g. localhost:8001 (no scheme; gRPC also takes dns:///host:port)")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            fail("timeout_s", "timeouts must be positive", "use seconds > 0")
        if self.retries < 0 or self.backoff_s < 0:
            fail("retries", "retries and backoff_s must be >= 0", "e.g. retries=3, backoff_s=0.25")
        if self.max_batch < 1 or self.concurrency < 1:
            fail("max_batch", "max_batch and concurrency must be >= 1", "e.g. max_batch=8, concurrency=4")
        if self.protocol == "http" and self.grpc_channel_args:
            fail("grpc_channel_args", "given for http", "use them with protocol='grpc'")
        for name in ("root_certificates", "private_key", "certificate_chain"):
            path = getattr(self, name)
            if path is None:
                continue
            if not self.ssl:
                fail(name, "given without ssl", "turn TLS on (ssl=True, --ssl) or leave it out")
            if not os.path.isfile(path):
                fail(name, f"{path!r} does not exist", "pass the path of a PEM file")
        if (self.private_key is None) != (self.certificate_chain is None):
            fail("private_key", "mutual TLS needs both private_key and certificate_chain", "pass both or neither")
        if self.insecure and self.protocol == "grpc":
            fail("insecure", "is for HTTP", "with gRPC, pass root_certificates for a private CA")

    @classmethod
    def load_balanced(cls, url: str, **kwargs) -> "ClientSettings":
        """gRPC settings for a load-balanced Kubernetes Service.

        `url` should name a headless Service (`dns:///swin.ns.svc:8001`
        resolves to every pod): the channel spreads requests round-robin over
        the resolved addresses, keepalive pings detect dead pods, and the
        connection is recycled every few minutes so new pods get traffic.
        """
        args = (
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.enable_retries", 1),
        )
        return cls(url=url, protocol="grpc", grpc_channel_args=args + tuple(kwargs.pop("grpc_channel_args", ())),
                   **kwargs)


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k answer."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """The answer for one image.

    Attributes:
        source: What was classified (a path, or `#<position>`).
        predictions: Top-k classes, best first (empty on error).
        logits: Raw logits when asked for.
        error: Why this image failed, or None.
    """

    source: str
    predictions: Tuple[Prediction, ...] = ()
    logits: Optional[np.ndarray] = field(default=None, compare=False)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def top1(self) -> Prediction:
        if not self.predictions:
            raise ClientError(f"{self.source}: no predictions ({self.error})")
        return self.predictions[0]


# -- inputs --------------------------------------------------------------------

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def collect_images(paths: Sequence[Union[str, os.PathLike]]) -> List[Path]:
    """Expands folders into the image files under them (by suffix, sorted); files are kept as given."""
    files: List[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(path)  # a missing file is reported as that image's failure
    return files


def load_image(item: ImageLike, position: int) -> Tuple[str, bytes]:
    """Turns one input into (source name, encoded bytes).

    Raises:
        ClientError: A path that cannot be read or an unsupported type.
    """
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"#{position}", bytes(item)
    if isinstance(item, (str, os.PathLike)):
        try:
            return str(item), Path(item).read_bytes()
        except OSError as exc:
            raise ClientError(f"{item}: cannot read ({exc.strerror or exc})") from None
    from PIL import Image

    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise ClientError(f"#{position}: arrays must be HxW or HxWxC uint8, got {item.dtype} {item.shape}")
        item = Image.fromarray(item)
    if isinstance(item, Image.Image):
        buf = io.BytesIO()
        item.save(buf, "PNG")  # lossless: the server sees exactly these pixels
        return f"#{position}", buf.getvalue()
    raise ClientError(f"#{position}: cannot classify a {type(item).__name__}; pass bytes, a path, an array or a PIL image")


# -- errors and retries ---------------------------------------------------------

# Also the transient states of a server that is starting, stopping or
# reloading a model: it answers, but the model has no ready version for a moment.
_UNAVAILABLE = ("has no available versions", "not at ready state", "is not ready", "UNAVAILABLE", "Connection refused", "connection refused", "Failed to connect", "failed to connect",
                "Connection reset", "Broken pipe", "Server disconnected", "Cannot connect", "503", "502")


# The dynamic batcher's queue policy: queue full, or queued past the timeout (REJECT).
_OVERLOADED = ("Exceeds maximum queue size", "Request timeout expired")


def _status(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    return str(status() if callable(status) else status or "")


def to_client_error(exc: BaseException) -> ClientError:
    """Maps a tritonclient / transport exception to a typed :class:`ClientError`."""
    if isinstance(exc, ClientError):
        return exc
    # tritonclient's InferenceServerException carries the server's text in message().
    message = (exc.message() if callable(getattr(exc, "message", None)) else None) or str(exc)
    status = _status(exc)
    text = f"{status} {message} {type(exc).__name__}"
    if any(s in message for s in _OVERLOADED):  # Triton says UNAVAILABLE; retrying would add to the flood
        return Overloaded(f"server overloaded: {message}", status)
    if "DEADLINE_EXCEEDED" in text or "Deadline" in text or isinstance(exc, (TimeoutError, asyncio.TimeoutError)) \
            or "timed out" in text or "Timeout" in text:
        return RequestTimeout(f"request timed out: {message}", status)
    if "INVALID_ARG" in text or status == "400":
        if "image[" in message:
            return InvalidImage(message, status)
        return InferenceFailed(message, status)
    if isinstance(exc, (ConnectionError, OSError)) or any(s in text for s in _UNAVAILABLE):
        return ServerUnavailable(f"server unavailable: {message}", status)
    if "NOT_FOUND" in text or "unknown model" in message or "not found" in message or status == "404":
        return ModelNotFound(message, status)
    return InferenceFailed(message, status)


def _retryable(error: ClientError) -> bool:
    # Inference has no side effects, but only "not reachable / not ready yet"
    # is retried: retrying timeouts or rejected inputs only adds load.
    return isinstance(error, ServerUnavailable)


def _delay(settings: ClientSettings, attempt: int) -> float:
    return min(settings.max_backoff_s, settings.backoff_s * (2 ** attempt)) * (0.5 + random.random() / 2)


def _with_retries(settings: ClientSettings, call: Callable[[], Any]) -> Any:
    for attempt in range(settings.retries + 1):
        try:
            return call()
        except Exception as exc:  # tritonclient raises several unrelated types
            error = to_client_error(exc)
            if not _retryable(error) or attempt == settings.retries:
                raise error from None
            time.sleep(_delay(settings, attempt))


async def _with_retries_async(settings: ClientSettings, call: Callable[[], Any]) -> Any:
    for attempt in range(settings.retries + 1):
        try:
            return await call()
        except Exception as exc:
            error = to_client_error(exc)
            if not _retryable(error) or attempt == settings.retries:
                raise error from None
            await asyncio.sleep(_delay(settings, attempt))


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
    import importlib

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


def _ensemble_outputs(module, want_logits: bool) -> list:
    names = [C.SCORES, C.CLASSES, C.LABELS] + ([C.LOGITS] if want_logits else [])
    return [module.InferRequestedOutput(n) for n in names]


def _image_input(module, images: Sequence[bytes]):
    array = np.array(list(images), dtype=object).reshape(-1, 1)
    tensor = module.InferInput(C.IMAGE, list(array.shape), "BYTES")
    return tensor, array


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


def _parse_topk(scores, classes, labels, top_k: int) -> List[Tuple[Prediction, ...]]:
    rows = []
    for s_row, c_row, l_row in zip(scores, classes, labels):
        rows.append(tuple(Prediction(int(c), (l.decode("utf-8") if isinstance(l, bytes) else str(l)), float(s))
                          for s, c, l in list(zip(s_row, c_row, l_row))[:top_k]))
    return rows


def _params_from_config(config: dict):
    from builder.triton_models.imaging import PreprocessParams

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

    def ensemble_request(self, images: Sequence[bytes], want_logits: bool):
        tensor, array = _image_input(self.module, images)
        return tensor, array, _ensemble_outputs(self.module, want_logits)

    def results(self, sources, response, top_k: int, want_logits: bool) -> List[Classification]:
        rows = _parse_topk(response.as_numpy(C.SCORES), response.as_numpy(C.CLASSES),
                           response.as_numpy(C.LABELS), top_k)
        logits = response.as_numpy(C.LOGITS) if want_logits else None
        return [Classification(src, row, None if logits is None else logits[i], None)
                for i, (src, row) in enumerate(zip(sources, rows))]


class Classifier:
    """Synchronous client (thread pool for requests in flight).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, settings: ClientSettings):
        self.settings = settings
        self._engine = _Engine(settings)
        self._local = threading.local()
        self._all: List[Tuple[Any, Optional[_SharedMemory]]] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="classify")
        self._params = None  # preprocess parameters, read from the server once (classifier mode)

    # one tritonclient client per thread: the HTTP client is not thread-safe
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            client = _make_client(self.settings)
            shm = _SharedMemory(self.settings.shared_memory) if self.settings.shared_memory != "none" else None
            self._local.client, self._local.shm = client, shm
            with self._lock:
                self._all.append((client, shm))
        return client

    def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Blocks until the server and the model are ready.

        Raises:
            RequestTimeout: Not ready within `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                client = self._client()
                if client.is_server_ready() and client.is_model_ready(self.settings.model, self.settings.model_version):
                    return
                last = "server up, model not ready"
            except Exception as exc:
                last = str(to_client_error(exc))
            time.sleep(0.25)
        raise RequestTimeout(f"{self.settings.url}: {self.settings.model} not ready after {timeout_s:.0f} s ({last})")

    def _infer(self, model: str, inputs: list, outputs: list, arrays: list):
        client = self._client()
        shm = self._local.shm
        for tensor, array in zip(inputs, arrays):
            if shm is not None:
                shm.place(client, array, tensor)
            else:
                tensor.set_data_from_numpy(array)
        return client.infer(model, inputs, outputs=outputs, **_infer_kwargs(self.settings))

    def _classify_chunk(self, items, top_k: int, want_logits: bool) -> List[Classification]:
        sources = [s for s, _ in items]
        if self.settings.mode == "classifier":
            return self._classify_chunk_bare(items, top_k, want_logits)
        tensor, array, outputs = self._engine.ensemble_request([b for _, b in items], want_logits)
        try:
            response = _with_retries(self.settings, lambda: self._infer(
                self.settings.model, [tensor], outputs, [array]))
        except InvalidImage as exc:
            if len(items) == 1:
                return [Classification(sources[0], error=str(exc))]
            # One bad image fails its whole request: resend one by one so the
            # others are served and the bad one names itself.
            return [r for item in items for r in self._classify_chunk([item], top_k, want_logits)]
        return self._engine.results(sources, response, top_k, want_logits)

    def _preprocess_params(self):
        if self._params is None:
            config = _with_retries(self.settings, lambda: self._client().get_model_config(
                self._engine.names.preprocess, **({"as_json": True} if self.settings.protocol == "grpc" else {})))
            self._params = _params_from_config(config)
        return self._params

    def _classify_chunk_bare(self, items, top_k: int, want_logits: bool) -> List[Classification]:
        from builder.triton_models import imaging

        batch, errors = imaging.preprocess_many([b for _, b in items], self._preprocess_params())
        good = [i for i, e in enumerate(errors) if e is None]
        results: Dict[int, Classification] = {
            i: Classification(items[i][0], error=e) for i, e in enumerate(errors) if e}
        if good:
            module, names = self._engine.module, self._engine.names
            pixels = module.InferInput(C.PIXELS, [len(good), *batch.shape[1:]], "FP32")
            response = _with_retries(self.settings, lambda: self._infer(
                names.classifier, [pixels], [module.InferRequestedOutput(C.LOGITS)], [batch[good]]))
            logits = response.as_numpy(C.LOGITS)
            # Top-k and class names from the postprocess model: one source of truth for labels.
            tensor = module.InferInput(C.LOGITS, list(logits.shape), "FP32")
            topk = _with_retries(self.settings, lambda: self._infer(
                names.postprocess, [tensor], _ensemble_outputs(module, False), [logits]))
            rows = _parse_topk(topk.as_numpy(C.SCORES), topk.as_numpy(C.CLASSES), topk.as_numpy(C.LABELS), top_k)
            for row, i in enumerate(good):
                results[i] = Classification(items[i][0], rows[row], logits[row] if want_logits else None)
        return [results[i] for i in range(len(items))]

    def classify(self, images: Sequence[ImageLike], top_k: int = 5, return_logits: bool = False,
                 progress: Optional[Callable[[int], None]] = None) -> List[Classification]:
        """Classifies images; failures are per image, never lost.

        Args:
            images: Encoded bytes, paths, HWC uint8 arrays or PIL images.
            top_k: Classes per image (at most the server's k in ensemble mode).
            return_logits: Also return the raw logits.
            progress: Called with the number of images finished per request.

        Returns:
            One :class:`Classification` per image, in input order.

        Raises:
            ServerUnavailable, RequestTimeout, ModelNotFound, InferenceFailed:
                Request-level failures (not a bad image, which is reported in
                its Classification).
        """
        results: Dict[int, Classification] = {}
        for position, result in self.iter_classify(images, top_k, return_logits, raise_errors=True):
            results[position] = result
            if progress:
                progress(1)
        return [results[i] for i in range(len(images))]

    def iter_classify(self, images: Sequence[ImageLike], top_k: int = 5, return_logits: bool = False,
                      raise_errors: bool = False) -> Iterator[Tuple[int, Classification]]:
        """Yields (position, result) for each image as its request finishes.

        Files are read when their request is built, not all up front, and at
        most `2 * concurrency` requests are queued. A request-level failure
        (server gone after the retries, timeout, unknown model) stops the run:
        with `raise_errors` it is raised; otherwise every image not answered
        yet is yielded as failed with that error, and the answers already
        yielded stand.

        Args:
            images: As for :meth:`classify`.
            top_k: Classes per image.
            return_logits: Also return the raw logits.
            raise_errors: Raise request-level failures instead of reporting them per image.
        """
        chunks = self._engine.chunks(list(range(len(images))))
        pending: Dict[Future, List[int]] = {}
        done_positions: set = set()
        next_chunk, fatal = 0, None
        try:
            while pending or (next_chunk < len(chunks) and fatal is None):
                while fatal is None and next_chunk < len(chunks) and len(pending) < 2 * self.settings.concurrency:
                    chunk = chunks[next_chunk]
                    pending[self._pool.submit(self._run_positions, images, chunk, top_k, return_logits)] = chunk
                    next_chunk += 1
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    chunk = pending.pop(future)
                    try:
                        answers = future.result()
                    except ClientError as exc:
                        fatal = fatal or exc
                        continue
                    for position, result in answers:
                        done_positions.add(position)
                        yield position, result
        finally:
            for future in pending:
                future.cancel()
        if fatal is not None:
            if raise_errors:
                raise fatal
            for position in range(len(images)):
                if position not in done_positions:
                    yield position, Classification(_source_name(images[position], position),
                                                   error=f"not classified: {fatal}")

    def _run_positions(self, images, positions, top_k: int, want_logits: bool) -> List[Tuple[int, Classification]]:
        loaded, failed = _load_all([images[i] for i in positions], positions)
        answers = list(failed.items())
        if loaded:
            out = self._classify_chunk([item for _, item in loaded], top_k, want_logits)
            answers += [(position, result) for (position, _), result in zip(loaded, out)]
        return answers

    def close(self) -> None:
        """Releases shared memory regions and connections."""
        self._pool.shutdown(wait=True)
        for client, shm in self._all:
            if shm is not None:
                shm.release(client)
            try:
                client.close()
            except Exception:
                pass
        self._all.clear()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClassifier:
    """asyncio client (tritonclient's grpc.aio / http.aio), ensemble mode.

    Use with `async with`, or await :meth:`close`.
    """

    def __init__(self, settings: ClientSettings):
        if settings.shared_memory != "none":
            raise SettingsError("shared_memory: the asyncio client sends tensors over the wire; "
                                "use Classifier for shared memory")
        if settings.mode != "ensemble":
            raise SettingsError("mode: the asyncio client calls the ensemble; use Classifier for mode='classifier'")
        self.settings = settings
        self._engine = _Engine(settings)
        self._engine.module = _module(settings.protocol, aio=True)
        self._client = _make_client(settings, aio=True)
        self._semaphore = asyncio.Semaphore(settings.concurrency)

    async def wait_until_ready(self, timeout_s: float = 60.0) -> None:
        """Waits until the server and model are ready (raises RequestTimeout)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                if await self._client.is_server_ready() and await self._client.is_model_ready(
                        self.settings.model, self.settings.model_version):
                    return
                last = "server up, model not ready"
            except Exception as exc:
                last = str(to_client_error(exc))
            await asyncio.sleep(0.25)
        raise RequestTimeout(f"{self.settings.url}: {self.settings.model} not ready after {timeout_s:.0f} s ({last})")

    async def _classify_chunk(self, items, top_k: int, want_logits: bool) -> List[Classification]:
        sources = [s for s, _ in items]
        tensor, array, outputs = self._engine.ensemble_request([b for _, b in items], want_logits)
        tensor.set_data_from_numpy(array)
        kwargs = _infer_kwargs(self.settings)

        async def call():
            async with self._semaphore:
                if self.settings.protocol == "http":
                    return await asyncio.wait_for(self._client.infer(self.settings.model, [tensor], outputs=outputs,
                                                                     **kwargs), self.settings.timeout_s)
                return await self._client.infer(self.settings.model, [tensor], outputs=outputs, **kwargs)

        try:
            response = await _with_retries_async(self.settings, call)
        except InvalidImage as exc:
            if len(items) == 1:
                return [Classification(sources[0], error=str(exc))]
            parts = await asyncio.gather(*(self._classify_chunk([item], top_k, want_logits) for item in items))
            return [r for part in parts for r in part]
        return self._engine.results(sources, response, top_k, want_logits)

    async def classify(self, images: Sequence[ImageLike], top_k: int = 5,
                       return_logits: bool = False) -> List[Classification]:
        """Async twin of :meth:`Classifier.classify` (same results, same errors)."""
        loaded, results = _load_all(images)
        chunks = self._engine.chunks([x for _, x in loaded])
        parts = await asyncio.gather(*(self._classify_chunk([loaded[i][1] for i in c], top_k, return_logits)
                                       for c in chunks))
        for chunk, part in zip(chunks, parts):
            results.update((loaded[i][0], r) for i, r in zip(chunk, part))
        return [results[i] for i in range(len(images))]

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncClassifier":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
