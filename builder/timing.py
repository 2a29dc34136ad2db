"""Timing rows every engine shares: the batch sizes timed, the timing loop, and the row's figures.

One definition for all of them, because `--engine auto` compares rows made in
different Pythons (a TensorRT plan is timed where it was built, by
`builder.engines.plan_runner`): standard library and numpy only.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional, Sequence


def timing_batches(preferred: Sequence[int], max_batch: int) -> List[int]:
    """The batch sizes the server forms with this config: 1, each preferred size, and the maximum."""
    return sorted({1, *preferred, max_batch})


def timed(fn: Callable[[], object], sync: Callable[[], None], warmup: int, iterations: int,
          budget_s: Optional[float] = None, min_calls: int = 3) -> List[float]:
    """Seconds per call of `fn` after `warmup` calls, each call synchronized with `sync`.

    With `budget_s`, measurement stops after that many seconds (at least `min_calls` calls), so a slow engine
    at a large batch (ONNX Runtime on a CPU) costs seconds, not minutes.
    """
    for _ in range(warmup):
        fn()
    sync()
    samples: List[float] = []
    deadline = time.perf_counter() + budget_s if budget_s else None
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
        if deadline and len(samples) >= min_calls and time.perf_counter() > deadline:
            break
    return samples


def timing_row(batch: int, seconds: Sequence[float]) -> Dict:
    """A timing row from per-call seconds: median and p99 latency, throughput from the mean."""
    import numpy as np  # here, not at import: the builder's CLI starts without numpy

    ms = np.array(seconds) * 1000.0
    return {"batch_size": batch, "latency_mean_ms": float(ms.mean()), "latency_p50_ms": float(np.percentile(ms, 50)),
            "latency_p99_ms": float(np.percentile(ms, 99)),
            "throughput_img_per_s": float(batch * 1000.0 / ms.mean()), "iterations": len(ms)}
