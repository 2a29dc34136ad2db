"""The PyTorch 2 engine: `torch.export` of the timm model with a dynamic batch, served by torch (+ TorchInductor).

Why this route: an ExportedProgram (`model.pt2`) is one file that loads without
timm or the model's Python code, keeps a symbolic batch dimension, and can be
compiled by TorchInductor where it is served. The served model compiles with
`torch.compile` (dynamic batch), captures one CUDA graph per batch bucket, and
reuses Inductor's stored artifacts when they were made by the same torch on the
same GPU (`engine.json` says which; others are ignored with a log line).
AOTInductor packages would skip the compile; with torch 2.11, loading one
(`aoti_load_package`) crashed the process, so they are not used.

The parity gate is the ONNX one: the exported program against the eager model
on the same inputs (max abs, cosine, top-1), before anything is written.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from builder.compare import gate
from builder.core.contract import Contract
from builder.errors import BuilderError
from builder.export.model import LoadedModel
from builder.settings import Parity

log = logging.getLogger("builder")
FILE = "model.pt2"
SIDECAR = "engine.json"
ARTIFACTS = "inductor.bin"
FILES = (FILE, SIDECAR, ARTIFACTS)  # what an inductor classifier version holds (inductor.bin: built on a GPU)


def export_program(model: LoadedModel, contract: Contract, path: Path, max_batch: int) -> Path:
    """Exports the classifier with `torch.export` (batch 1..max_batch symbolic) and saves it.

    Raises:
        BuilderError: torch.export cannot capture the model.
    """
    import torch
    from torch.export import Dim

    started = time.perf_counter()
    sample = torch.zeros(2, *contract.pixels.dims)
    # timm's Swin checks the batch in Python only through shapes, so one symbolic batch dimension covers 1..max.
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    try:
        with torch.no_grad():
            program = torch.export.export(model.module, (sample,), dynamic_shapes=({0: batch},))
    except Exception as exc:
        raise BuilderError(f"torch.export could not capture {contract.name} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}); use --engine onnxruntime") from None
    torch.export.save(program, str(path))
    log.info("exported %s (%.1f MB) with torch.export in %.1f s", Path(path).name, Path(path).stat().st_size / 1e6,
             time.perf_counter() - started)
    return Path(path)


def validate_program(path: Path, model: LoadedModel, contract: Contract, parity: Parity) -> Dict[str, float]:
    """The saved program, loaded back, against the eager model (same inputs as the ONNX gate)."""
    import torch

    program = torch.export.load(str(path)).module()
    batch = np.random.default_rng(0).standard_normal((parity.batch, *contract.pixels.dims), dtype=np.float32)
    with torch.no_grad():
        candidate = program(torch.from_numpy(batch)).numpy()
        reference = model.module(torch.from_numpy(batch)).numpy()
    figures = gate("the exported program", "PyTorch", reference, candidate, parity,
                   inputs=f"{parity.batch} seeded Gaussian tensors, FP32 on the CPU")
    log.info("torch.export program vs PyTorch: max abs %.3g, min cosine %.7f", figures["max_abs"],
             figures["min_cosine"])
    return figures


def environment() -> Dict[str, str]:
    """What compiled artifacts are tied to: torch, CUDA and the GPU."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "gpu": gpu,
            "python": platform.python_version()}


def build_inductor(folder: Path, params: Dict[str, str], max_batch: int, batches: Sequence[int],
                   photos: "np.ndarray", reference: "np.ndarray", parity: Parity,
                   timeout_s: Optional[float] = None) -> Dict:
    """Compiles the program as served on this GPU, stores Inductor's artifacts, gates and times it.

    `compile_engine`, then `load_engine`: two fresh processes, each with an
    empty Inductor and Triton cache, so nothing but the stored file can help
    the second. Arguments and result as theirs.
    """
    return load_engine(folder, params, max_batch, batches, photos, reference, parity,
                       compile_engine(folder, params, max_batch, timeout_s), timeout_s)


def compile_engine(folder: Path, params: Dict[str, str], max_batch: int,
                   timeout_s: Optional[float] = None) -> Optional[float]:
    """Compiles every batch bucket from scratch in a fresh process and saves Inductor's artifacts.

    Several may run at once (the race compiles its candidates side by side: the
    work is on the CPU); timing is `load_engine`'s, one at a time.

    Args:
        folder: Holds `model.pt2` and `engine.json`; `inductor.bin` is written there.
        params: The classifier's config parameters (precision, compile, buckets, input dims).
        max_batch: The config's max_batch_size.
        timeout_s: The process is stopped after this long (None: no limit).

    Returns:
        Seconds the engine took to start from scratch; None when nothing is compiled (`compile` none).

    Raises:
        BuilderError: The process failed or ran out of time.
    """
    if params.get("compile", "none") == "none":
        return None
    log.info("compiling with TorchInductor (%s, mode %s, buckets %s): minutes on the first build",
             params.get("precision", "fp16"), params["compile"], params["batch_buckets"])
    with tempfile.TemporaryDirectory(prefix="inductor-") as tmp:
        return _child("compile", folder, params, max_batch, [], tmp, timeout_s)["start_s"]


def load_engine(folder: Path, params: Dict[str, str], max_batch: int, batches: Sequence[int],
                photos: "np.ndarray", reference: "np.ndarray", parity: Parity, compiled_s: Optional[float],
                timeout_s: Optional[float] = None) -> Dict:
    """Loads the engine in a fresh process as the served model does, gates it on the photos and times it.

    Args:
        folder: Holds `model.pt2`, `engine.json` and (compiled) `inductor.bin`, checked against `engine.json`.
        params: The classifier's config parameters.
        max_batch: The config's max_batch_size.
        batches: Batch sizes to time.
        photos: Real photos through the exact preprocessing (N, C, H, W), float32.
        reference: PyTorch FP32 logits of `photos`.
        parity: Thresholds of the served engine (its precision) against `reference`.
        compiled_s: `compile_engine`'s start time from scratch (recorded).
        timeout_s: The process is stopped after this long (None: no limit).

    Returns:
        Start times (from scratch, from the stored artifacts), artifact size, parity figures and timings.

    Raises:
        BuilderError: The process failed or ran out of time, or the engine misses the parity thresholds.
    """
    precision = params.get("precision", "fp16")
    with tempfile.TemporaryDirectory(prefix="inductor-") as tmp:
        np.save(os.path.join(tmp, "photos.npy"), photos)
        log.info("loading the %s engine again in a fresh process, as the served model will", precision)
        loaded = _child("load", folder, params, max_batch, batches, tmp, timeout_s)
        logits = np.load(os.path.join(tmp, "logits.npy"))
    figures = gate(f"the TorchInductor {precision} engine", "PyTorch FP32", reference, logits, parity,
                   inputs=f"{len(photos)} bundled photos, exact preprocessing")
    artifacts = folder / ARTIFACTS
    result = {"start_from_scratch_s": compiled_s, "start_with_artifacts_s": loaded["start_s"],
              "artifacts_mb": round(artifacts.stat().st_size / 1e6, 1) if artifacts.is_file() else None,
              "parity_served": figures, "timings": loaded["timings"], "device": loaded["device"]}
    log.info("TorchInductor engine: start %s s from scratch, %.1f s with %s; %s vs FP32 max abs %.3g, top-1 %.3f",
             compiled_s, loaded["start_s"], ARTIFACTS, precision.upper(), figures["max_abs"],
             figures["top1_agreement"])
    return result


@contextlib.contextmanager
def _deadline(child: "subprocess.Popen", timeout_s: Optional[float]):
    """Kills `child`'s process group after `timeout_s`; yields a callable saying whether it did."""
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill) if timeout_s else None
    if timer:
        timer.start()
    try:
        yield fired.is_set
    finally:
        if timer:
            timer.cancel()


def _child(mode: str, folder: Path, params: Dict[str, str], max_batch: int, batches: Sequence[int],
           tmp: str, timeout_s: Optional[float] = None) -> Dict:
    cache = tempfile.mkdtemp(prefix=f"{mode}-", dir=tmp)
    # Empty caches: the first start is a true cold start, the second sees only what inductor.bin holds.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
               # Shortly before the deadline the child prints where it stands (every thread's stack) to the log.
               BUILDER_STACKS_AT_S=str(max(timeout_s - 15, 1)) if timeout_s else "",
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")])))
    out = os.path.join(tmp, f"{mode}.json")
    command = [sys.executable, "-m", "builder.engines.inductor", mode, str(folder), json.dumps(params), str(max_batch),
               ",".join(str(b) for b in batches), tmp, out]
    # Its own session: on a timeout the compile workers it started go with it.
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    lines: List[str] = []
    # Relayed as it comes: a compile takes minutes and its lines are the build's progress.
    with _deadline(child, timeout_s) as expired:
        for line in child.stdout:
            lines.append(line.rstrip())
            log.info("  %s", lines[-1])
    child.wait()
    if expired():
        raise BuilderError(f"the TorchInductor {mode} step did not finish in {timeout_s:.0f} s (stopped); "
                           "raise --compile-timeout-s, or choose another precision or engine")
    if child.returncode != 0 or not os.path.isfile(out):
        raise BuilderError(f"the TorchInductor {mode} step failed (exit {child.returncode}): {_what_failed(lines)}")
    with open(out) as f:
        return json.load(f)


# A traceback's last line: the exception's class (dotted, torch's own often) and its message.
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Unsupported|Failed|Interrupt)\w*)(: |$)")


def _what_failed(lines: List[str]) -> str:
    """The child's last exception line and what follows it (torch's hints follow the message), else its last
    lines: dynamo ends every error with the same two hints, which alone say nothing."""
    found = [i for i, line in enumerate(lines) if _EXCEPTION.match(line.strip())]
    shown = lines[found[-1]:found[-1] + 3] if found else lines[-3:]
    return " | ".join(line.strip() for line in shown if line.strip())[:1500]


def time_engine(engine, params: Dict[str, str], batches: Sequence[int], warmup: int = 5, iterations: int = 200,
                budget_s: Optional[float] = 2.0) -> List[Dict]:
    """Times a `TorchEngine` at each batch size, input already on its device (as the preprocess hands it over)."""
    import torch

    from builder.timing import timed, timing_row
    from builder.engines.torch_runner import params_shape

    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    rows: List[Dict] = []
    for batch in batches:
        x = torch.randn(batch, *params_shape(params), device=engine.device)
        rows.append(timing_row(batch, timed(lambda: engine(x), sync, warmup, iterations, budget_s)))
        log.info("batch %d: p50 %.2f ms, %s img/s", batch, rows[-1]["latency_p50_ms"],
                 f"{rows[-1]['throughput_img_per_s']:,.0f}")
    return rows


def _child_main(mode: str, folder: str, params_json: str, max_batch: str, batches: str, tmp: str, out: str) -> None:
    """One start of the served engine (see `build_inductor`); writes what it measured to `out`."""
    import torch

    from builder.engines.torch_runner import TorchEngine

    if os.environ.get("BUILDER_STACKS_AT_S"):
        faulthandler.dump_traceback_later(float(os.environ["BUILDER_STACKS_AT_S"]), file=sys.stdout)
    params = json.loads(params_json)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    engine = TorchEngine(folder, device, params, int(max_batch), log=lambda message: print(message, flush=True))
    result: Dict = {"start_s": round(time.perf_counter() - started, 1), "device": str(engine.device)}
    if mode == "compile":
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise SystemExit("TorchInductor saved no artifacts")
        path = os.path.join(folder, ARTIFACTS)
        with open(path + ".tmp", "wb") as f:
            f.write(saved[0])
        os.replace(path + ".tmp", path)
    else:
        photos = torch.from_numpy(np.load(os.path.join(tmp, "photos.npy"))).to(engine.device)
        logits = [engine(photos[i:i + max(engine.buckets)]).float().cpu() for i in range(0, len(photos),
                                                                                          max(engine.buckets))]
        np.save(os.path.join(tmp, "logits.npy"), torch.cat(logits).numpy())
        result["timings"] = time_engine(engine, params, [int(b) for b in batches.split(",")])
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # the parent relays it
    _child_main(*sys.argv[1:])
