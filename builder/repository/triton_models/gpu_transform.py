"""The GPU photo path's transform: Pillow's resampling as matrix products with Pillow's rounding, and the
transform of small batches replayed as CUDA graphs (`gpu_imaging.GpuPreprocessor` runs it).

Copied beside every served model that copies `gpu_imaging.py`. Torch and numpy only: it imports nothing of the
project, so it runs the same from the project and from a model's folder.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)
# Pillow's resampling filters the GPU path reproduces: (support, kernel); others are refused at build time.
FILTERS = {
    "bilinear": (1.0, lambda x: np.maximum(1.0 - np.abs(x), 0.0)),
    "bicubic": (2.0, lambda x: _bicubic(np.abs(x))),
}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point coefficients for 8-bit images


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def resample_weights(in_size: int, out_size: int, filter_name: str) -> np.ndarray:
    """Pillow's resampling of one axis as an (out_size, in_size) matrix (its `precompute_coeffs`).

    Antialiased: the filter widens by the downscale factor. Coefficients are
    normalized per output sample, then rounded to Pillow's 22-bit fixed point,
    so the matrix product gives Pillow's sums before its final rounding.
    """
    support, kernel = FILTERS[filter_name]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), in_size)
        taps = kernel((np.arange(first, last) - center + 0.5) / filterscale)
        total = taps.sum()
        if total != 0.0:
            taps = taps / total
        fixed = np.where(taps < 0, np.trunc(-0.5 + taps * (1 << _PRECISION_BITS)),
                         np.trunc(0.5 + taps * (1 << _PRECISION_BITS)))
        matrix[out, first:last] = fixed / (1 << _PRECISION_BITS)
    return matrix.astype(np.float32)


_SPLIT = 1 << 12  # fixed-point weight = high * _SPLIT + low, both parts integers float16 holds exactly


def split_weights(matrix: np.ndarray) -> np.ndarray:
    """A `resample_weights` matrix (out, in) as (2 * out, in): the high parts over the low parts.

    Each coefficient is an integer k over 2**22; k = high * 4096 + low with |low| <= 2048 and |high| <= 2048
    (|k| < 2**23), integers float16 represents exactly. Products with 8-bit pixels are then exact on tensor
    cores, and so are their float32 sums while under 2**24 (up to ~30 taps: downscales below ~8x); beyond,
    a sum is off by a float32 rounding, as a float32 product of the whole weights would be.
    """
    k = np.rint(matrix.astype(np.float64) * (1 << _PRECISION_BITS))
    high = np.rint(k / _SPLIT)
    if np.abs(high).max(initial=0) > 2048:  # a weight over 2: no resampling filter has one
        raise ValueError("resampling weights beyond float16's exact integers; use --preprocess exact")
    return np.concatenate([high, k - high * _SPLIT]).astype(np.float32)


def pillow_round(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Pillow's end of a pass from the split sums: (k_sum + 2**21) >> 22, clipped to 0..255, as int32."""
    total = high.to(torch.int32).mul_(_SPLIT).add_(low.to(torch.int32))
    return total.add_(1 << (_PRECISION_BITS - 1)).bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255)


def tensor_core_dtype(device: torch.device) -> torch.dtype:
    """float16 where torch multiplies float16 matrices into float32 sums on this device, else float32."""
    if device.type != "cuda":
        return torch.float32
    try:
        probe = torch.ones((2, 2), dtype=torch.float16, device=device)
        torch.mm(probe, probe, out_dtype=torch.float32)
        return torch.float16
    except (TypeError, RuntimeError):  # torch before `out_dtype`: float32 sums of float32 inputs
        return torch.float32


def supported(params) -> Optional[str]:
    """None when these `imaging.PreprocessParams` can run on the GPU, else the reason they cannot."""
    if params.interpolation not in FILTERS:
        return (f"interpolation {params.interpolation!r} is not reproduced on the GPU; "
                f"use {' or '.join(FILTERS)}, or --preprocess exact")
    if params.crop_mode != "center":
        return f"crop_mode {params.crop_mode!r}: the GPU path does the center crop only; use --preprocess exact"
    return None


class TransformGraphs:
    """The transform of small batches as CUDA graphs, one per image size and batch bucket.

    A batch of one 640x480 photo runs ~23 small kernels in ~0.05 ms of GPU time, but launching them from
    Python took 0.4 ms alone and 0.6-0.9 ms in a served model (H200): a lone photo's latency. Replaying a
    captured graph is one launch (0.06 ms there). A batch of n images replays the graph of the next power of
    two (n's rows filled, the rest left as they were: each image's rows are computed apart from the others,
    and the sums are exact integers, so the real rows are bitwise the eager values). Only buckets of at most
    `max_pixels` input pixels are captured (larger batches are kernel-bound, and a graph keeps its memory);
    a key is captured when seen a second time, so one-off sizes never cost a capture. At most `keep` graphs
    are kept, the least recently used dropped: a few sizes times buckets 1, 2, 4, 8 fit, and mixed traffic
    does not recapture on every batch. Traffic of many more sizes would: after `max_captures` captures
    (a few ms each) the graphs kept then stay, and new keys run eager.

    The graphs share one memory pool: they replay one at a time on one stream and each output is copied
    out before anything else replays, so no graph reads what another wrote. A capture that fails (a torch
    or GPU that refuses one) turns graphs off for good, says so once through `warn`, and the eager
    transform serves: no request fails for it.
    """

    def __init__(self, transform, warn=log.warning, max_pixels: int = 4_000_000, keep: int = 32,
                 max_captures: int = 256):
        self.transform, self.warn, self.max_pixels, self.keep = transform, warn, max_pixels, keep
        self.max_captures = max_captures
        self.failure: Optional[str] = None
        self.seen: Dict[Tuple[int, ...], int] = {}
        self.kept: "OrderedDict[Tuple[int, ...], Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]]" = \
            OrderedDict()
        self.pool = None
        self.captures = 0  # for logs and tests

    @staticmethod
    def key(images: List[torch.Tensor]) -> Tuple[int, ...]:
        """The graph a batch replays: (its power-of-two bucket, channels, height, width)."""
        return (1 << (len(images) - 1).bit_length(), *images[0].shape)

    def __call__(self, images: List[torch.Tensor]) -> torch.Tensor:
        count, key = len(images), self.key(images)
        kept = self.kept.get(key)
        if kept is not None:
            graph, static_in, static_out = kept
            self.kept.move_to_end(key)
            torch.stack(images, out=static_in[:count])
            graph.replay()
            return static_out[:count].clone()
        if self._capture_due(key):
            static_in = torch.zeros(key, dtype=torch.uint8, device=images[0].device)
            torch.stack(images, out=static_in[:count])
            try:
                return self._capture(key, static_in)[:count].clone()
            except Exception as exc:  # whatever the capture raised, the eager transform still serves
                self.failure = f"{type(exc).__name__}: {exc}"[:500]
                self.kept.clear()
                self.warn(f"transform CUDA graphs off after a failed capture ({self.failure}); the eager "
                          "transform serves; set the model's transform_graphs to \"0\" to skip the attempt")
        return self.transform(torch.stack(images))

    def _capture_due(self, key: Tuple[int, ...]) -> bool:
        """Whether to capture `key` now: graphs on, captures left, a small bucket, and its second sighting."""
        if (self.failure is not None or self.captures >= self.max_captures
                or key[0] * key[2] * key[3] > self.max_pixels):
            return False
        if len(self.seen) >= 4096:  # the sightings table stays small whatever sizes come
            self.seen.clear()
        self.seen[key] = self.seen.get(key, 0) + 1
        return self.seen[key] >= 2

    def _capture(self, key: Tuple[int, ...], static_in: torch.Tensor) -> torch.Tensor:
        """Captures the transform of `static_in` (warmed up on a side stream first); replays it; its output."""
        device = static_in.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # cuBLAS workspaces and the resampling matrices exist before capture
            self.transform(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call from another thread of the process meanwhile is not this capture's error.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.transform(static_in)
        self.kept[key] = (graph, static_in, static_out)
        self.captures += 1
        if self.captures == self.max_captures:
            self.warn(f"transform CUDA graphs: {self.captures} captured (traffic of many image sizes); the "
                      f"{len(self.kept)} kept replay, new batch shapes run eager from now on")
        while len(self.kept) > self.keep:
            self.kept.popitem(last=False)
        graph.replay()
        return static_out
