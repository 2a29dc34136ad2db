"""Typed gRPC/HTTP clients for the Swin Triton ensemble.

`Classifier` (sync) and `AsyncClassifier` (asyncio) classify image bytes,
paths or arrays and return `Classification` dataclasses; errors are typed
(`clients.errors`). `python -m clients classify ...` is the CLI.
"""

from clients.api import AsyncClassifier, Classification, Classifier, ClientSettings, Prediction
from clients.errors import (ClientError, InferenceFailed, InvalidImage, ModelNotFound, Overloaded, RequestTimeout,
                            ServerUnavailable, SettingsError)

__all__ = ["AsyncClassifier", "Classification", "Classifier", "ClientSettings", "Prediction", "ClientError",
           "InferenceFailed", "InvalidImage", "ModelNotFound", "Overloaded", "RequestTimeout", "ServerUnavailable", "SettingsError"]
