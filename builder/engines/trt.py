"""TensorRT plans from the exported ONNX: build, validate, time, inspect.

Plans must be built where the serving TensorRT lives (NVIDIA's TensorRT
container of the tritonserver release, or a TensorRT 8.6 wheel on
Python 3.9), so this module imports only the standard library, numpy and
tensorrt (plus the project's numpy-only `builder.compare`), and runs on
Python >= 3.9. It supports TensorRT 8.6 through 10.x to 11.x by feature
detection: flags and enums are looked up by name and used only when the
running TensorRT has them (EXPLICIT_BATCH is gone in 11; weakly-typed
FP16/INT8 builder flags and implicit INT8 calibrators are deprecated in 10 and
removed in 11).

    python -m builder.engines.trt build --onnx model.onnx --plan model.plan --precision fp16 --max-batch 32
    python -m builder.engines.trt validate --plan model.plan --reference reference.npz
    python -m builder.engines.trt time --plan model.plan --batches 1,8,32 --json timings.json

Device memory and timing use the CUDA runtime through ctypes (no pycuda).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from builder.compare import check_parity, compare_logits
from builder.errors import BuilderError

log = logging.getLogger("builder.engines.trt")
PRECISIONS = ("fp32", "tf32", "fp16", "int8", "fp8")


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise BuilderError("tensorrt is not importable here; build plans inside NVIDIA's TensorRT container "
                           "(`make plan-docker`) or in a Python that has the tensorrt wheel") from None
    return tensorrt


def trt_major() -> int:
    """Major version of the installed TensorRT."""
    return int(_trt().__version__.split(".")[0])


# -- CUDA runtime through ctypes -------------------------------------------------

class _Cuda:
    """The few CUDA runtime calls needed to run and time an engine."""

    def __init__(self) -> None:
        for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise BuilderError("libcudart (the CUDA runtime) was not found; put its folder on LD_LIBRARY_PATH")
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise BuilderError(f"CUDA {what} failed: {self.lib.cudaGetErrorString(code).decode()}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def htod(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.check(self.lib.cudaMemcpy(ctypes.c_void_p(ptr), array.ctypes.data_as(ctypes.c_void_p),
                                       ctypes.c_size_t(array.nbytes), 1), "cudaMemcpy H2D")

    def dtoh(self, array: np.ndarray, ptr: int) -> None:
        self.check(self.lib.cudaMemcpy(array.ctypes.data_as(ctypes.c_void_p), ctypes.c_void_p(ptr),
                                       ctypes.c_size_t(array.nbytes), 2), "cudaMemcpy D2H")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return s.value

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def event(self) -> int:
        e = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        return e.value

    def record(self, event: int, stream: int) -> None:
        self.check(self.lib.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cudaEventRecord")

    def elapsed_ms(self, start: int, end: int) -> float:
        self.lib.cudaEventSynchronize(ctypes.c_void_p(end))
        ms = ctypes.c_float()
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), ctypes.c_void_p(start), ctypes.c_void_p(end)),
                   "cudaEventElapsedTime")
        return float(ms.value)


def gpu_info() -> Dict[str, str]:
    """GPU name, compute capability and driver from nvidia-smi (empty values if unavailable)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        name, cap, driver = (v.strip() for v in out.split(","))
        return {"gpu": name, "compute_capability": cap, "driver": driver}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {"gpu": "", "compute_capability": "", "driver": ""}


# -- building -----------------------------------------------------------------------

@dataclass(frozen=True)
class PlanOptions:
    """How to build one plan.

    Attributes:
        onnx: Exported model (input `input`, dynamic batch).
        plan: Output plan path; sidecars are written beside it.
        precision: fp32 (strict), tf32, fp16, int8 or fp8.
        min_batch, opt_batch, max_batch: The optimization profile; max
            should equal the Triton config's max_batch_size.
        input_name: The network input the profile applies to.
        workspace_gib: Workspace memory pool limit.
        opt_level: Builder optimization level (0-5) where supported.
        timing_cache: Path of a timing cache to reuse and update.
        calibration: .npy of preprocessed images for implicit INT8 calibration.
        tactic_sources: Tactic source names to enable (empty: TensorRT's default).
        inspect: Save the engine's layer information beside the plan.
        reference: .npz of inputs and PyTorch logits; the new plan must meet
            the parity thresholds before it replaces an existing plan.
        max_abs, min_cosine, min_top1: Parity thresholds for `reference`.
        timing_batches: Batch sizes the new plan is timed at, recorded in the
            sidecar for `builder repo --engine auto` (empty: min, opt, max).
    """

    onnx: str
    plan: str
    precision: str = "fp16"
    min_batch: int = 1
    opt_batch: int = 0
    max_batch: int = 32
    input_name: str = "input"
    workspace_gib: float = 4.0
    opt_level: int = 3
    timing_cache: Optional[str] = None
    calibration: Optional[str] = None
    tactic_sources: Tuple[str, ...] = ()
    inspect: bool = True
    reference: Optional[str] = None
    max_abs: float = 0.5
    min_cosine: float = 0.99
    min_top1: float = 0.9
    timing_batches: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BuilderError(f"precision: {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        opt = self.opt_batch or self.max_batch
        if not 1 <= self.min_batch <= opt <= self.max_batch:
            raise BuilderError(f"profile: need 1 <= min ({self.min_batch}) <= opt ({opt}) <= max ({self.max_batch})")
        if not os.path.isfile(self.onnx):
            raise BuilderError(f"onnx: {self.onnx!r} does not exist; export it first (python -m builder export)")
        if not 0 <= self.opt_level <= 5:
            raise BuilderError("opt_level: use 0..5")
        if self.workspace_gib <= 0:
            raise BuilderError("workspace_gib: must be positive")
        if any(not self.min_batch <= b <= self.max_batch for b in self.timing_batches):
            raise BuilderError(f"timing_batches: {list(self.timing_batches)} must lie in the profile "
                               f"{self.min_batch}..{self.max_batch}")


def _config_batching(path: str) -> Tuple[int, List[int]]:
    """(max_batch_size, preferred batch sizes) of a Triton config.pbtxt.

    A regular expression, not protobuf: this module must run where only numpy
    and tensorrt are installed. The configs it reads are written by `builder`.
    """
    import re

    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise BuilderError(f"triton_config: cannot read {path} ({exc.strerror})") from None
    found = re.search(r"^max_batch_size:\s*(\d+)", text, flags=re.M)
    if not found or int(found.group(1)) < 1:
        raise BuilderError(f"triton_config: {path} has no max_batch_size >= 1; plans need a batching config")
    return int(found.group(1)), [int(v) for v in re.findall(r"preferred_batch_size:\s*(\d+)", text)]


def profile_from_config(path: str) -> Tuple[int, int]:
    """(opt, max) batch from a Triton config.pbtxt: max = max_batch_size, opt = the largest preferred size."""
    largest, preferred = _config_batching(path)
    return (max(preferred) if preferred else largest), largest


def batches_from_config(path: str) -> Tuple[int, ...]:
    """The batch sizes a Triton config makes the server form: 1, each preferred size and max_batch_size."""
    largest, preferred = _config_batching(path)
    return tuple(sorted({1, largest, *preferred}))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _onnx_has_qdq(path: str) -> bool:
    # Cheap scan for QuantizeLinear op names in the protobuf bytes: no onnx import needed.
    with open(path, "rb") as f:
        return b"QuantizeLinear" in f.read()


def _flag(trt, name: str):
    return getattr(trt.BuilderFlag, name, None)


def _set_flag(config, trt, name: str, required_for: str = "") -> None:
    flag = _flag(trt, name)
    if flag is None:
        if required_for:
            raise BuilderError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}, needed for {required_for}")
        return
    config.set_flag(flag)


class _Calibrator:
    """Implicit INT8 entropy calibration over preprocessed images (TensorRT < 11)."""

    def __new__(cls, trt, cuda: _Cuda, batches: np.ndarray, cache_path: str, batch: int):
        base = getattr(trt, "IInt8EntropyCalibrator2", None)
        if base is None:
            raise BuilderError(f"TensorRT {trt.__version__} has no implicit INT8 calibration; quantize the ONNX "
                               "with NVIDIA ModelOpt (explicit Q/DQ) and build that instead")

        class Calibrator(base):
            def __init__(self):
                base.__init__(self)
                self.data, self.batch, self.index = batches.astype(np.float32), batch, 0
                self.device = cuda.malloc(self.data[:batch].nbytes)

            def get_batch_size(self):
                return self.batch

            def get_batch(self, names):
                if self.index + self.batch > len(self.data):
                    return None
                cuda.htod(self.device, self.data[self.index:self.index + self.batch])
                self.index += self.batch
                return [self.device]

            def read_calibration_cache(self):
                return open(cache_path, "rb").read() if os.path.isfile(cache_path) else None

            def write_calibration_cache(self, cache):
                with open(cache_path, "wb") as f:
                    f.write(cache)

        return Calibrator()


def build_plan(options: PlanOptions) -> Dict:
    """Builds a plan and writes it with its sidecars.

    Args:
        options: What to build.

    Returns:
        The sidecar dict (also written as `plan.json` beside the plan).

    Raises:
        BuilderError: Parse failure, unsupported precision, failed build.
    """
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH") and trt_major() < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    qdq = _onnx_has_qdq(options.onnx)
    weakly_typed_flags = _flag(trt, "FP16") is not None
    if qdq and not weakly_typed_flags and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(options.onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuilderError(f"TensorRT could not parse {options.onnx}: {errors}")
    config = builder.create_builder_config()
    workspace = int(options.workspace_gib * (1 << 30))
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    else:
        config.max_workspace_size = workspace
    if hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = options.opt_level
    if options.tactic_sources:
        mask = 0
        for name in options.tactic_sources:
            source = getattr(trt.TacticSource, name.upper(), None)
            if source is None:
                raise BuilderError(f"tactic_sources: TensorRT {trt.__version__} has no TacticSource.{name.upper()}")
            mask |= 1 << int(source)
        config.set_tactic_sources(mask)
    if options.inspect and hasattr(trt, "ProfilingVerbosity"):
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    cuda = None
    precision = options.precision
    if precision == "fp32":
        tf32 = _flag(trt, "TF32")
        if tf32 is not None:
            config.clear_flag(tf32)  # strict FP32: TF32 is on by default
    elif precision == "tf32":
        _set_flag(config, trt, "TF32", "tf32")
    elif precision == "fp16":
        if not weakly_typed_flags:
            raise BuilderError(f"TensorRT {trt.__version__} removed weakly-typed FP16; export an FP16 ONNX "
                               "(or a ModelOpt-quantized one) and build it strongly typed")
        _set_flag(config, trt, "FP16")
    elif precision in ("int8", "fp8"):
        if precision == "fp8" and (trt_major() < 10 or _flag(trt, "FP8") is None):
            raise BuilderError(f"fp8 needs TensorRT >= 10 (this is {trt.__version__}) and an FP8 Q/DQ ONNX")
        if weakly_typed_flags:
            _set_flag(config, trt, "FP16")  # layers left unquantized may run in FP16
            _set_flag(config, trt, precision.upper(), precision)
        if not qdq:
            if precision == "fp8" or not options.calibration:
                raise BuilderError(f"{precision}: the ONNX has no Q/DQ nodes; quantize it with ModelOpt "
                                   "(explicit, preferred) or pass --calibration images.npy (implicit INT8, TensorRT < 11)")
            cuda = _Cuda()
            images = np.load(options.calibration)
            batch = min(len(images), options.opt_batch or options.max_batch, 32)
            calib_profile = builder.create_optimization_profile()
            shape = tuple(network.get_input(0).shape)[1:]
            calib_profile.set_shape(options.input_name, (batch, *shape), (batch, *shape), (batch, *shape))
            config.set_calibration_profile(calib_profile)
            config.int8_calibrator = _Calibrator(trt, cuda, images, options.plan + ".calib", batch)

    shape = tuple(network.get_input(0).shape)[1:]
    if any(d < 0 for d in shape):
        raise BuilderError(f"input {options.input_name!r} has dynamic non-batch dims {shape}; export with a fixed size")
    opt = options.opt_batch or options.max_batch
    profile = builder.create_optimization_profile()
    profile.set_shape(options.input_name, (options.min_batch, *shape), (opt, *shape), (options.max_batch, *shape))
    config.add_optimization_profile(profile)

    cache = None
    if options.timing_cache and hasattr(config, "create_timing_cache"):
        blob = open(options.timing_cache, "rb").read() if os.path.isfile(options.timing_cache) else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building %s plan from %s (profile %d/%d/%d) with TensorRT %s ...", precision, options.onnx,
             options.min_batch, opt, options.max_batch, trt.__version__)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuilderError("TensorRT failed to build the plan (see its log above)")
    build_s = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(options.plan)), exist_ok=True)
    tmp = options.plan + ".tmp"
    with open(tmp, "wb") as f:
        f.write(serialized)
    parity = {}
    if options.reference:
        try:
            parity = validate_plan(tmp, options.reference, options.max_abs, options.min_cosine, options.min_top1)
        except BuilderError:
            os.remove(tmp)  # a plan outside the thresholds never replaces the previous one
            raise
    os.replace(tmp, options.plan)  # never a half-written or unvalidated plan under the real name
    if cache is not None:
        with open(options.timing_cache, "wb") as f:
            f.write(cache.serialize())
    log.info("built %s (%.1f MB) in %.0f s", options.plan, os.path.getsize(options.plan) / 1e6, build_s)

    layers = inspect_plan(options.plan) if options.inspect else {}
    # Timed here, where the plan was built for this GPU, so `--engine auto` can compare it with engines
    # built in another Python (TensorRT and torch rarely share one).
    runner = PlanRunner(options.plan)
    timings = [runner.time(b, warmup=10, iterations=50)
               for b in (options.timing_batches or sorted({options.min_batch, opt, options.max_batch}))]
    sidecar = {
        "tensorrt_version": trt.__version__,
        **gpu_info(),
        "precision": precision,
        "explicit_quantization": qdq,
        "profile": {"input": options.input_name, "min": options.min_batch, "opt": opt, "max": options.max_batch,
                    "shape": list(shape)},
        "workspace_gib": options.workspace_gib,
        "opt_level": options.opt_level,
        "build_s": round(build_s, 1),
        "onnx_sha256": _sha256(options.onnx),
        "plan_sha256": _sha256(options.plan),
        "layer_precisions": layers.get("precisions", {}),
        "parity": parity,
        "timings": timings,
        "calibration_source": _calibration_source(options.calibration),
        "options": asdict(options),
    }
    with open(os.path.join(os.path.dirname(os.path.abspath(options.plan)), "plan.json"), "w") as f:
        json.dump(sidecar, f, indent=2)
    return sidecar


def _load_engine(plan: str):
    trt = _trt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with open(plan, "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    if engine is None:
        raise BuilderError(f"{plan} could not be deserialized: built by another TensorRT version or for another GPU")
    return engine


def inspect_plan(plan: str) -> Dict:
    """Writes `<plan>.layers.json` (TensorRT's engine inspector) and counts layer output precisions."""
    trt = _trt()
    engine = _load_engine(plan)
    if not hasattr(engine, "create_engine_inspector"):
        return {}
    inspector = engine.create_engine_inspector()
    if hasattr(engine, "get_tensor_name") and hasattr(inspector, "execution_context"):
        # With dynamic shapes the inspector reports formats only for a context with shapes set.
        context = engine.create_execution_context()
        name = engine.get_tensor_name(0)
        context.set_input_shape(name, tuple(engine.get_tensor_profile_shape(name, 0)[1]))
        inspector.execution_context = context
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    with open(plan + ".layers.json", "w") as f:
        f.write(info)
    precisions: Dict[str, int] = {}
    for layer in json.loads(info).get("Layers", []):
        if isinstance(layer, dict):
            for out in layer.get("Outputs", []):
                fmt = str(out.get("Format/Datatype", "?"))
                kind = next((k for k in ("Int8", "FP8", "Half", "Float", "Int32", "Bool") if k.lower() in fmt.lower()), fmt)
                precisions[kind] = precisions.get(kind, 0) + 1
    return {"precisions": precisions}


class PlanRunner:
    """Runs a plan on the GPU: numpy in, numpy out (TensorRT >= 8.5 tensor API)."""

    def __init__(self, plan: str, device: int = 0):
        self.trt = _trt()
        self.cuda = _Cuda()
        self.cuda.check(self.cuda.lib.cudaSetDevice(device), "cudaSetDevice")
        self.engine = _load_engine(plan)
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.stream = self.cuda.stream()
        self.buffers: Dict[str, Tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self.cuda.free(ptr)
            ptr, size = self.cuda.malloc(nbytes), nbytes
            self.buffers[name] = (ptr, size)
            self.context.set_tensor_address(name, ptr)
        return ptr

    def prepare(self, batch: np.ndarray) -> None:
        """Copies the input to the device and sets shapes (done once before timing)."""
        name = self.inputs[0]
        dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
        batch = np.ascontiguousarray(batch.astype(dtype, copy=False))
        self.context.set_input_shape(name, batch.shape)
        self.cuda.htod(self._buffer(name, batch.nbytes), batch)
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(out)))
            self._buffer(out, int(np.prod(shape)) * dtype.itemsize)

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream):
            raise BuilderError("TensorRT execution failed")

    def __call__(self, batch: np.ndarray) -> Dict[str, np.ndarray]:
        self.prepare(batch)
        self.enqueue()
        self.cuda.sync(self.stream)
        results = {}
        for out in self.outputs:
            shape = tuple(self.context.get_tensor_shape(out))
            array = np.empty(shape, dtype=np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(out))))
            self.cuda.dtoh(array, self.buffers[out][0])
            results[out] = array
        return results

    def time(self, batch: int, warmup: int = 20, iterations: int = 200) -> Dict[str, float]:
        """Times GPU execution at one batch size with CUDA events (input already on the device)."""
        shape = tuple(self.engine.get_tensor_shape(self.inputs[0]))[1:]
        self.prepare(np.zeros((batch, *shape), dtype=np.float32))
        for _ in range(warmup):
            self.enqueue()
        self.cuda.sync(self.stream)
        start, end = self.cuda.event(), self.cuda.event()
        samples = []
        for _ in range(iterations):
            self.cuda.record(start, self.stream)
            self.enqueue()
            self.cuda.record(end, self.stream)
            samples.append(self.cuda.elapsed_ms(start, end))
        samples_ms = np.array(samples)
        return {"batch_size": batch, "latency_mean_ms": float(samples_ms.mean()),
                "latency_p50_ms": float(np.percentile(samples_ms, 50)),
                "latency_p99_ms": float(np.percentile(samples_ms, 99)),
                "throughput_img_per_s": float(batch * 1000.0 / samples_ms.mean()), "iterations": iterations}


def _calibration_source(path: Optional[str]) -> Optional[str]:
    """What a calibration .npy holds, from the `<path>.json` that `builder export` writes beside it."""
    if not path:
        return None
    try:
        with open(path + ".json", encoding="utf-8") as f:
            return json.load(f).get("source", "unrecorded")
    except (OSError, ValueError):
        return "unrecorded"


def validate_plan(plan: str, reference: str, max_abs: float, min_cosine: float, min_top1: float) -> Dict[str, float]:
    """Runs the plan on the reference inputs and compares with the reference logits.

    Args:
        plan: The plan.
        reference: .npz with `inputs` (N,3,H,W) and `logits` (N,C) from PyTorch or ONNX Runtime.
        max_abs, min_cosine, min_top1: Thresholds.

    Returns:
        The comparison figures.

    Raises:
        BuilderError: A threshold is missed.
    """
    data = np.load(reference)
    runner = PlanRunner(plan)
    profile_max = runner.engine.get_tensor_profile_shape(runner.inputs[0], 0)[2][0]
    outputs = []
    for start in range(0, len(data["inputs"]), profile_max):
        result = runner(data["inputs"][start:start + profile_max])
        outputs.append(result[runner.outputs[0]].astype(np.float32))
    figures = compare_logits(data["logits"], np.concatenate(outputs))
    problems = check_parity(figures, max_abs, min_cosine, min_top1)
    # What the inputs were (real photos or noise asked for on purpose), carried into the sidecar and manifest.
    figures["inputs"] = str(data["source"]) if "source" in data.files else "unrecorded"
    if problems:
        raise BuilderError(f"{plan} fails parity: " + "; ".join(problems))
    return figures


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m builder.engines.trt {build,validate,time,inspect}`."""
    parser = argparse.ArgumentParser(prog="python -m builder.engines.trt", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build a plan from ONNX")
    b.add_argument("--onnx", required=True)
    b.add_argument("--plan", required=True)
    b.add_argument("--precision", choices=PRECISIONS, default="fp16")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=0)
    b.add_argument("--max-batch", type=int, default=32)
    b.add_argument("--triton-config", default=None,
                   help="derive opt/max batch from this config.pbtxt (max = max_batch_size, opt = largest preferred)")
    b.add_argument("--reference", default=None, help=".npz of inputs + PyTorch logits to validate before replacing")
    b.add_argument("--max-abs", type=float, default=0.5)
    b.add_argument("--min-cosine", type=float, default=0.99)
    b.add_argument("--min-top1", type=float, default=0.9)
    b.add_argument("--workspace-gib", type=float, default=4.0)
    b.add_argument("--opt-level", type=int, default=3)
    b.add_argument("--timing-cache", default=None)
    b.add_argument("--calibration", default=None, help=".npy of preprocessed images (implicit INT8)")
    b.add_argument("--tactic-sources", default="", help="e.g. edge_mask_convolutions,jit_convolutions")
    b.add_argument("--timing-batches", type=_ints, default=[],
                   help="batch sizes to time the plan at, recorded in plan.json (default: 1, each preferred "
                        "size and max from --triton-config, else min/opt/max)")
    v = sub.add_parser("validate", help="compare a plan with reference logits")
    v.add_argument("--plan", required=True)
    v.add_argument("--reference", required=True, help=".npz with inputs and logits")
    v.add_argument("--max-abs", type=float, default=0.5)
    v.add_argument("--min-cosine", type=float, default=0.99)
    v.add_argument("--min-top1", type=float, default=0.9)
    t = sub.add_parser("time", help="time a plan at several batch sizes")
    t.add_argument("--plan", required=True)
    t.add_argument("--batches", type=_ints, default=[1, 8, 32])
    t.add_argument("--iterations", type=int, default=200)
    t.add_argument("--json", default=None, help="write results here")
    i = sub.add_parser("inspect", help="write the plan's layer information")
    i.add_argument("--plan", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "build":
            opt_batch, max_batch, timing = args.opt_batch, args.max_batch, tuple(args.timing_batches)
            if args.triton_config:
                opt_batch, max_batch = profile_from_config(args.triton_config)
                opt_batch = args.opt_batch or opt_batch
                timing = timing or batches_from_config(args.triton_config)
            sidecar = build_plan(PlanOptions(
                onnx=args.onnx, plan=args.plan, precision=args.precision, min_batch=args.min_batch,
                opt_batch=opt_batch, max_batch=max_batch, workspace_gib=args.workspace_gib,
                opt_level=args.opt_level, timing_cache=args.timing_cache, calibration=args.calibration,
                tactic_sources=tuple(s for s in args.tactic_sources.split(",") if s), reference=args.reference,
                max_abs=args.max_abs, min_cosine=args.min_cosine, min_top1=args.min_top1, timing_batches=timing))
            print(json.dumps({k: sidecar[k] for k in ("tensorrt_version", "gpu", "precision", "build_s",
                                                      "layer_precisions", "parity", "timings")}))
        elif args.command == "validate":
            figures = validate_plan(args.plan, args.reference, args.max_abs, args.min_cosine, args.min_top1)
            print(json.dumps(figures))
        elif args.command == "time":
            runner = PlanRunner(args.plan)
            rows = []
            for batch in args.batches:
                row = runner.time(batch, iterations=args.iterations)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=2)
        else:
            print(json.dumps(inspect_plan(args.plan)))
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
