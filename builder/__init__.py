"""Builds a Triton model repository from a timm Swin Transformer classifier.

Heavy imports (torch, timm, onnx) stay inside the functions that need them so
that `python -m builder --help` is instant.
"""

from builder.errors import BuilderError

__all__ = ["BuilderError"]
