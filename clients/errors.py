"""Typed client errors. Each carries the server's message where there is one."""

from __future__ import annotations

from typing import Optional


class ClientError(Exception):
    """Base of every error this package raises.

    Attributes:
        status: The transport status ("StatusCode.UNAVAILABLE", "400", ...), if any.
    """

    def __init__(self, message: str, status: Optional[str] = None):
        super().__init__(message)
        self.status = status


class SettingsError(ClientError):
    """Invalid client settings (names the field and the fix)."""


class ServerUnavailable(ClientError):
    """The server could not be reached or is not ready (after retries)."""


class Overloaded(ClientError):
    """The server rejected the request because its queue is full or the request waited too long.

    The clients resubmit it after a growing backoff (never at once, which only
    adds load), up to `ClientSettings.overload_retries` times; images still
    rejected then are reported failed in their own results, not raised.
    """


class RequestTimeout(ClientError):
    """A request or the wait for readiness outlasted its timeout."""


class InvalidImage(ClientError):
    """The server rejected an input image (corrupt, empty, not an image, too large)."""


class ModelNotFound(ClientError):
    """The model (or the pinned version) is not loaded on the server."""


class InferenceFailed(ClientError):
    """Any other error the server returned."""
