"""Client settings, results and image inputs: what callers construct and get back."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from builder.core import contract as C
from clients.errors import ClientError, SettingsError


ImageLike = Union[bytes, bytearray, str, os.PathLike, np.ndarray, Any]
PROTOCOLS = ("grpc", "http")
SHARED_MEMORY = ("none", "system", "cuda")
MODES = ("ensemble", "classifier")


# The longest per-request timeout taken (a day): past it a request is not served, it hangs.
MAX_TIMEOUT_S = 86_400

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
        overload_retries: Extra attempts, after a backoff, for a request the
            server rejected as overloaded (queue full or queued too long);
            images still rejected after them are reported as failed, alone.
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

    url: str = C.LOCAL_GRPC_URL
    protocol: str = "grpc"
    model: str = C.DEFAULT_MODEL
    model_version: str = ""
    mode: str = "ensemble"
    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    retries: int = 3
    overload_retries: int = 6
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
            fail("url", f"{self.url!r} is not host:port",
                 f"e.g. {C.LOCAL_GRPC_URL} (no scheme; gRPC also takes dns:///host:port)")
        for name in ("timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            # gRPC takes a deadline as a finite time; nan, inf and centuries are refused before any request.
            if not (isinstance(value, (int, float)) and 0 < value <= MAX_TIMEOUT_S):
                fail(name, f"is {value!r}", f"use seconds above 0 and at most {MAX_TIMEOUT_S:,}")
        if self.retries < 0 or self.backoff_s < 0:
            fail("retries", "retries and backoff_s must be >= 0", "e.g. retries=3, backoff_s=0.25")
        if self.overload_retries < 0:
            fail("overload_retries", "must be >= 0", "e.g. overload_retries=6 (0: report rejections at once)")
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
