"""Bare benchmarks of the preprocessings (no server).

The `gpu` preprocessing: decode alone, and decode + transform. Each image set is
repeated to the batch size; every batch is timed end to end (host bytes in,
normalized tensor on the device out, synchronized). The CPU ones (`exact`,
`draft`): each batch through a thread pool, as the preprocess model runs it.
Every row also says how far its tensors are from the exact path on the same
images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence
import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger("perf")


def bench_gpu(images: Sequence[Path], params, batches: Sequence[int], device: str, decoders: Sequence[str],
              warmup: int = 3, iterations: int = 10) -> List[Dict]:
    """Rows of {decoder, stage, batch_size, latency_*_ms, throughput_img_per_s} plus parity figures."""
    import torch

    from builder.core import imaging
    from builder.repository.triton_models import gpu_imaging
    from builder.timing import timed, timing_row

    data = [Path(p).read_bytes() for p in images]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for decoder in decoders:
        preprocessor = gpu_imaging.GpuPreprocessor(params, device, decoder)
        tensors, _ = preprocessor(data)
        exact = np.stack([imaging.preprocess(d, params) for d in data])
        diff = np.abs(tensors.cpu().numpy() - exact)
        parity = {"tensor_max_abs": float(diff.max()), "tensor_mean_abs": float(diff.mean())}
        for batch in batches:
            items = [data[i % len(data)] for i in range(batch)]
            orientations = [imaging.gpu_candidate(d, params.max_pixels) or 1 for d in items]
            for stage, fn in (("decode", lambda: preprocessor.decoder(items, orientations)),
                              ("decode+transform", lambda: preprocessor(items))):
                row = {"decoder": preprocessor.decoder.backend, "stage": stage, "device": device,
                       **timing_row(batch, timed(fn, sync, warmup, iterations)), **parity}
                rows.append(row)
                log.info("%s %s batch %d: %.0f img/s (%.2f ms)", row["decoder"], stage, batch,
                         row["throughput_img_per_s"], row["latency_mean_ms"])
    return rows


def bench_cpu(images: Sequence[Path], params, batches: Sequence[int], variants: Sequence[str], threads: int,
              warmup: int = 1, iterations: int = 5) -> List[Dict]:
    """Rows of the CPU preprocessings (`exact`, `draft`), each batch mapped over `threads` threads.

    Pillow releases the GIL while it decodes and resamples, which is how the preprocess model uses a
    thread pool; this times the same map.
    """
    from builder.core import imaging
    from builder.timing import timed, timing_row

    data = [Path(p).read_bytes() for p in images]
    exact = np.stack([imaging.preprocess(d, params) for d in data])
    settings = {variant: dataclasses.replace(params, jpeg_draft=variant == "draft") for variant in variants}
    rows = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        # Every variant over the largest batch, three times, before any timing: otherwise the first variant
        # timed pays for starting the pool's threads (measured: 4.9 vs 3.4 ms for the same 640x480 JPEG).
        largest = [data[i % len(data)] for i in range(max(batches))]
        for chosen in [*settings.values()] * 3:
            list(pool.map(lambda d: imaging.preprocess(d, chosen), largest))
        for variant, chosen in settings.items():
            diff = np.abs(np.stack([imaging.preprocess(d, chosen) for d in data]) - exact)
            parity = {"tensor_max_abs": float(diff.max()), "tensor_mean_abs": float(diff.mean())}
            for batch in batches:
                items = [data[i % len(data)] for i in range(batch)]
                seconds = timed(lambda: list(pool.map(lambda d: imaging.preprocess(d, chosen), items)),
                                lambda: None, warmup, iterations)
                row = {"decoder": "pillow", "stage": variant, "device": "cpu", "threads": threads,
                       **timing_row(batch, seconds), **parity}
                rows.append(row)
                log.info("pillow %s batch %d, %d threads: %.0f img/s (%.2f ms)", variant, batch, threads,
                         row["throughput_img_per_s"], row["latency_mean_ms"])
    return rows
