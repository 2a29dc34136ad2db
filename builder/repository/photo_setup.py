"""The GPU photo path's setup, measured by the build on the GPU it runs on (as `--engine auto` races engines).

What is measured is the served photo path's own code with no server: the staged model's `GpuPreprocessor` (decode,
resize, crop, normalize), its inductor engine with the CUDA graphs and the head, from JPEG bytes in host memory to
class arrays in host memory, on batches of B photos in P processes at once (each its own CUDA context, as
Triton's Python-backend instances are), with and without a CUDA MPS daemon of its own (as `builder serve --mps`).
Each candidate is (processes, batch limit, MPS); the winner serves the most images a second among those whose
batch takes at most the budget at its median (a request waits about one batch of its instance ahead of it).

Not measured, written as measured by hand (`settings.GPU_PHOTO_PATH_SETUP`): the hybrid design's local batch, the
classifier's instances and batch limit, the queue delays. On an H200 the hand-measured setup served 1.06-1.15x
its no-server figure at the same batch (perf/results/h200-photo-ceiling): the served path keeps up with it.

`perf/gpu/photo_ceiling.py` runs the same measurement on any grid, for the results folders.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from builder.errors import BuilderError
from builder.settings import PhotoSetup

log = logging.getLogger("builder")


def _load(version_dir: str, params: dict, largest: int):
    """The photo path's preprocessor, engine and head on params["device"]: a function of JPEG bytes -> arrays.

    As served, the engine takes at most the classifier's max batch (what its program was exported for), and a
    larger batch of photos is classified in chunks of that size; its buckets stop at `largest`, the largest batch
    measured (fewer CUDA graphs to capture in every measuring process).
    """
    import torch

    from builder.core import imaging
    from builder.engines import torch_runner
    from builder.repository.triton_models import gpu_imaging

    device = params["device"]
    pre = gpu_imaging.GpuPreprocessor.from_config(imaging.PreprocessParams.from_parameters(params), params, device,
                                                  map, print)
    chunk = min(int(params["classifier_max_batch"]), largest)
    engine = torch_runner.TorchEngine(os.path.join(version_dir, params["engine_dir"]), device, params, chunk,
                                      log=lambda message: None)

    def labels(items):
        pixels, _ = pre(items)
        return torch.cat([torch_runner.class_outputs_packed(engine(pixels[i:i + chunk]))
                          for i in range(0, len(pixels), chunk)]).cpu().numpy()

    return labels


def _worker(index, version_dir, params, photos, batches, seconds, barrier, results):
    """One process: load, then each batch size in step with the others (the barrier), timed."""
    import torch

    from builder.timing import timed

    labels = _load(version_dir, params, max(batches))
    if index == 0:  # one process says where it ran
        on_gpu = params["device"].startswith("cuda")
        results.put({"gpu": torch.cuda.get_device_name(0) if on_gpu else "none", "torch": torch.__version__})
    for batch in batches:
        items = [photos[i % len(photos)] for i in range(batch)]
        for _ in range(5):
            labels(items)
        barrier.wait()
        started = time.perf_counter()
        # `.cpu()` in `labels` waits for the device: nothing more to synchronize.
        seconds_each = timed(lambda: labels(items), lambda: None, 0, sys.maxsize, budget_s=seconds, min_calls=20)
        results.put({"batch": batch, "images": batch * len(seconds_each), "wall": time.perf_counter() - started,
                     "p50": statistics.median(seconds_each) * 1e3})


def _collect(results, workers, count: int) -> list:
    """`count` results from the workers; fails as soon as one of them has failed (not after a timeout: a worker
    that cannot load, e.g. on a host without the GPU it names, would otherwise be waited for)."""
    got = []
    while len(got) < count:
        try:
            got.append(results.get(timeout=2))
        except queue.Empty:
            failed = [p.exitcode for p in workers if p.exitcode not in (None, 0)]
            if failed:
                for p in workers:
                    p.kill()
                raise BuilderError(f"photo setup: a measuring process failed (exit code {failed[0]}; its error is "
                                   "above)")
    return got


def photo_path_params(model_dir: Path, device: str) -> tuple:
    """A staged or served photo-path model's newest version folder and config parameters (on `device`)."""
    from builder.repository import configs
    from builder.repository.versions import existing_versions

    params = configs.parameters(configs.read(Path(model_dir) / "config.pbtxt"))
    if not params.get("engine_dir"):
        raise BuilderError(f"{Path(model_dir).name} runs no engine in its process (the `bls` design); build "
                           "the photo path with --gpu-photo-path fused or hybrid")
    params.update(device=device)
    return str(Path(model_dir) / str(existing_versions(Path(model_dir))[-1])), params


def measure(model_dir: Path, processes: Sequence[int], batches: Sequence[int], seconds: float,
            photos: Sequence[bytes], device: str = "cuda:0", on_row: Callable[[Dict], None] = None) -> Dict:
    """Every (processes, batch) pair of the photo-path model in `model_dir`, in the current MPS setting.

    Returns:
        {"gpu", "torch", "rows": [{processes, batch, images, seconds, img_per_s, batch_p50_ms}]}; batch_p50_ms
        is one batch, bytes in to arrays out, the median over the processes' medians.
    """
    version_dir, params = photo_path_params(model_dir, device)
    context = multiprocessing.get_context("spawn")  # each process its own CUDA context; the parent has none
    results = context.Queue()
    out: Dict = {"rows": []}
    for count in processes:
        barrier = context.Barrier(count)
        workers = [context.Process(target=_worker, args=(i, version_dir, params, list(photos), list(batches),
                                                         seconds, barrier, results)) for i in range(count)]
        for p in workers:
            p.start()
        got = _collect(results, workers, count * len(batches) + 1)
        for p in workers:
            p.join()
        out.update(next(g for g in got if "gpu" in g))
        for batch in batches:
            mine = [g for g in got if g.get("batch") == batch]
            wall = max(g["wall"] for g in mine)
            images = sum(g["images"] for g in mine)
            row = {"processes": count, "batch": batch, "images": images, "seconds": round(wall, 2),
                   "img_per_s": round(images / wall, 1),
                   "batch_p50_ms": round(statistics.median(g["p50"] for g in mine), 3)}
            out["rows"].append(row)
            if on_row:
                on_row(row)
    return out


def measure_with_mps(model_dir: Path, processes, batches, seconds: float, photos, device: str, mps: bool,
                     on_row=None) -> Dict:
    """`measure`, under a CUDA MPS daemon of its own when `mps` (its spawned processes are the daemon's clients)."""
    from builder.core.mps import MpsDaemon

    if not mps:
        return measure(model_dir, processes, batches, seconds, photos, device, on_row)
    workdir = Path(tempfile.mkdtemp(prefix="photo-setup-"))  # the daemon's marker; its pipes go under /tmp
    daemon = MpsDaemon(workdir)
    daemon.start()
    saved = {key: os.environ.get(key) for key in daemon.env()}
    os.environ.update(daemon.env())
    try:
        return measure(model_dir, processes, batches, seconds, photos, device, on_row)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def choose(rows: List[Dict], budget_ms: float) -> Optional[Dict]:
    """The row with the most images a second among those whose batch p50 is within the budget (None: none is)."""
    within = [r for r in rows if r["batch_p50_ms"] <= budget_ms]
    return max(within, key=lambda r: r["img_per_s"]) if within else None


def settle(model_dir: Path, candidates: PhotoSetup, photos: Sequence[bytes], device: str = "cuda:0") -> Dict:
    """Measures the grid on `device` and returns the record the manifest keeps: every row, and the winner.

    Raises:
        BuilderError: A measuring process failed, or no candidate kept its batch within the budget.
    """
    from builder.core.mps import CONTROL

    started = time.perf_counter()
    rows: List[Dict] = []
    gpu = None
    with_mps = [m for m in candidates.mps if not m or shutil.which(CONTROL)]
    if len(with_mps) < len(candidates.mps):
        log.warning("photo setup: MPS is not measured (%s is not on PATH; it comes with the NVIDIA driver's "
                    "utilities)", CONTROL)
    if not with_mps:
        raise BuilderError(f"photo_setup: only MPS was to be measured and {CONTROL} is not on PATH; install the "
                           "NVIDIA driver's utilities, or pass --photo-setup fixed")
    total = len(candidates.processes) * len(candidates.batches) * len(with_mps)
    for mps in with_mps:
        def shown(row, mps=mps):
            log.info("photo setup [%d/%d]: %d processes, batches of %d, MPS %s: %.0f img/s, batch p50 %.1f ms",
                     len(rows) + 1, total, row["processes"], row["batch"], "on" if mps else "off",
                     row["img_per_s"], row["batch_p50_ms"])
            rows.append({**row, "mps": mps})

        found = measure_with_mps(model_dir, candidates.processes, candidates.batches, candidates.seconds, photos,
                                 device, mps, shown)
        gpu = found.get("gpu")
    budget_ms = candidates.budget_ms
    winner = choose(rows, budget_ms)
    if winner is None:
        fastest = min(rows, key=lambda r: r["batch_p50_ms"])
        raise BuilderError(f"photo_batch_budget_ms: no measured photo-path setup keeps a batch within "
                           f"{budget_ms:g} ms on this GPU (the quickest took {fastest['batch_p50_ms']:g} ms); "
                           "raise --photo-batch-budget-ms, or pass --photo-setup fixed")
    return {"measured": True, "gpu": gpu, "device": device, "budget_ms": budget_ms,
            "seconds_per_point": candidates.seconds, "took_s": round(time.perf_counter() - started, 1),
            "rows": rows, "chosen": {k: winner[k] for k in ("processes", "batch", "mps", "img_per_s",
                                                            "batch_p50_ms")}}
