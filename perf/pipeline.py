"""Bare benchmark of the `gpu` preprocessing pipeline (no server): decode alone, and decode + transform.

Each image set is repeated to the batch size; every batch is timed end to end
(host bytes in, normalized tensor on the device out, synchronized). Also
reports how far the tensors are from the exact CPU path on the same images.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

log = logging.getLogger("perf")


def bench_pipeline(images: Sequence[Path], params, batches: Sequence[int], device: str, decoders: Sequence[str],
                   warmup: int = 3, iterations: int = 10) -> List[Dict]:
    """Rows of {decoder, stage, batch_size, latency_*_ms, throughput_img_per_s} plus parity figures."""
    import torch

    from builder.repository.triton_models import gpu_imaging, imaging
    from builder.timing import timed, timing_row

    data = [Path(p).read_bytes() for p in images]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    for decoder in decoders:
        pipeline = gpu_imaging.GpuPreprocessor(params, device, decoder)
        tensors, _ = pipeline(data)
        exact = np.stack([imaging.preprocess(d, params) for d in data])
        diff = np.abs(tensors.cpu().numpy() - exact)
        parity = {"tensor_max_abs": float(diff.max()), "tensor_mean_abs": float(diff.mean())}
        for batch in batches:
            items = [data[i % len(data)] for i in range(batch)]
            orientations = [gpu_imaging.gpu_candidate(d, params.max_pixels) or 1 for d in items]
            for stage, fn in (("decode", lambda: pipeline.decoder(items, orientations)),
                              ("decode+transform", lambda: pipeline(items))):
                row = {"decoder": pipeline.decoder.backend, "stage": stage, "device": device,
                       **timing_row(batch, timed(fn, sync, warmup, iterations)), **parity}
                rows.append(row)
                log.info("%s %s batch %d: %.0f img/s (%.2f ms)", row["decoder"], stage, batch,
                         row["throughput_img_per_s"], row["latency_mean_ms"])
    return rows
