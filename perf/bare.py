"""Bare-engine benchmark: the classifier run directly, no server.

Engines: `torch` (eager FP32, eager FP16, optionally torch.compile) on the
timm model, `onnxruntime` on the exported ONNX, `tensorrt` on a plan (through
`builder.engines.trt`). Warm-up is separate from measurement; GPU work is timed with
synchronization around each measured window. Results are flat JSON rows with
units in the keys, the reference for "serving efficiency" (served throughput /
bare throughput at the same batch) in `perf report`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Dict, List, Sequence

from builder.engines.choice import onnxruntime_timings
from builder.timing import timed, timing_row

log = logging.getLogger("perf")


def _row(engine: str, variant: str, batch: int, seconds: Sequence[float]) -> Dict:
    return {"engine": engine, "variant": variant, **timing_row(batch, seconds)}


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def bench_torch(model_name: str, model_kwargs: Dict, batches: Sequence[int], device: str, warmup: int,
                iterations: int, compile_model: bool = False) -> List[Dict]:
    """Eager FP32 and FP16 (autocast-free .half()) and optionally torch.compile FP16."""
    import timm
    import torch

    model = timm.create_model(model_name, pretrained=False, **model_kwargs).eval().to(device)
    shape = timm.data.resolve_data_config({}, model=model)["input_size"]
    variants = [("eager_fp32", model, torch.float32)]
    if device.startswith("cuda"):
        half = timm.create_model(model_name, pretrained=False, **model_kwargs).eval().to(device).half()
        variants.append(("eager_fp16", half, torch.float16))
        if compile_model:
            variants.append(("compile_fp16", torch.compile(half, mode="max-autotune-no-cudagraphs"), torch.float16))
    rows = []
    for name, module, dtype in variants:
        for batch in batches:
            x = torch.randn(batch, *shape, device=device, dtype=dtype)
            with torch.inference_mode():
                samples = timed(lambda: module(x), _sync(device), warmup, iterations)
            rows.append(_row("torch", name, batch, samples))
            log.info("%s", json.dumps(rows[-1]))
    return rows


def bench_onnxruntime(onnx_path: str, batches: Sequence[int], warmup: int, iterations: int,
                      threads: int = 0) -> List[Dict]:
    """ONNX Runtime (CUDA provider when present, else CPU) on the exported model."""
    provider, rows = onnxruntime_timings(onnx_path, batches, warmup, iterations, budget_s=None, threads=threads)
    return [{"engine": "onnxruntime", "variant": provider, **row} for row in rows]


def bench_tensorrt(plan: str, batches: Sequence[int], warmup: int, iterations: int) -> List[Dict]:
    """A TensorRT plan timed with CUDA events (input resident on the GPU)."""
    from builder.engines.plan_runner import PlanRunner, tensorrt_module

    rows = []
    with PlanRunner(plan) as runner:
        for batch in batches:
            timing = runner.time(batch, warmup=warmup, iterations=iterations)
            rows.append({"engine": "tensorrt", "variant": plan, "tensorrt_version": tensorrt_module().__version__,
                         **timing})
            log.info("%s", json.dumps(rows[-1]))
    return rows


def bench_program(version_dir: str, params: Dict[str, str], max_batch: int, batches: Sequence[int], device: str,
                  warmup: int, iterations: int) -> List[Dict]:
    """The inductor engine exactly as served: the repository's model.pt2 through the classifier's TorchEngine.

    Its load time (program load, compile with or without stored artifacts, warm-up of every batch bucket)
    is reported as `load_s`; input already on the device, as the preprocess model hands it over.
    """
    from builder.engines.inductor import time_engine
    from builder.engines.torch_runner import TorchEngine

    started = time.perf_counter()
    engine = TorchEngine(version_dir, device, params, max_batch)
    load_s = time.perf_counter() - started
    variant = f"{engine.dtype} compile={params.get('compile', 'none')} tuning={engine.tuning}"
    return [{"engine": "program", "variant": variant, **row, "load_s": round(load_s, 2)}
            for row in time_engine(engine, params, batches, warmup, iterations, budget_s=None)]
