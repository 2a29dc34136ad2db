"""Running TensorRT plans on Polygraphy's TrtRunner: numpy or device memory in, numpy out, GPU timing.

The runtime half of `builder.engines.trt`, and what the `local` flavor's
Python-backend classifier loads beside a plan: standard library, numpy,
tensorrt and polygraphy only (Python >= 3.9, no torch). Device memory that
arrives by DLPack (the GPU preprocessing's output) is wrapped, not copied.
"""

from __future__ import annotations

import ctypes
from typing import Dict, Sequence, Union

import numpy as np

from builder.errors import BuilderError
from builder.timing import timing_row


def tensorrt_module():
    """The tensorrt module, once tensorrt and polygraphy are known to import; else a BuilderError saying where."""
    try:
        import tensorrt
    except ImportError:
        raise BuilderError("tensorrt is not importable here; build plans inside NVIDIA's TensorRT container "
                           "(`make plan-docker`) or in a Python that has the tensorrt wheel") from None
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BuilderError("polygraphy is not importable here; `pip install polygraphy` beside tensorrt "
                           "(NVIDIA's TensorRT container ships it)") from None
    # Polygraphy reports every loader step at INFO; this module logs what matters itself.
    G_LOGGER.module_severity = G_LOGGER.WARNING
    return tensorrt


def polygraphy_errors():
    """Polygraphy reports failures (parse, build, bad engine) by raising this."""
    from polygraphy.exception import PolygraphyException

    return PolygraphyException


def load_engine(plan: str):
    """Deserializes a plan (Polygraphy's loaders); a BuilderError if this TensorRT or GPU cannot run it."""
    tensorrt_module()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes

    try:
        return EngineFromBytes(BytesFromPath(plan))()
    except polygraphy_errors():
        raise BuilderError(f"{plan} could not be deserialized: built by another TensorRT version or for "
                           "another GPU") from None


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    """The head of DLPack's DLManagedTensor (dlpack.h, ABI stable since v0.2)."""

    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


_DLPACK_FLOATS = {16: np.float16, 32: np.float32}
_KDL_CUDA = 2


def device_view_from_dlpack(source):
    """A Polygraphy DeviceView over GPU memory that arrives by DLPack, without copying it.

    Polygraphy's runner takes DeviceViews (or torch tensors, where torch is
    installed) but cannot import DLPack, and a TensorRT-only Python (the
    Triton Python-backend stub that serves a plan) has no torch: so the
    capsule's DLTensor is read here. The capsule is not consumed (its owner
    keeps the memory) and is kept on the view until the view is dropped.

    Args:
        source: A DLPack capsule ("dltensor"), or an object with `to_dlpack()`
            (Triton's pb_utils.Tensor) or `__dlpack__()`.

    Returns:
        polygraphy.cuda.DeviceView with `shape` and `dtype` of the tensor.

    Raises:
        BuilderError: Not CUDA memory, not float16/32, or not contiguous.
    """
    from polygraphy.cuda import DeviceView
    from polygraphy.datatype import DataType

    capsule = source.to_dlpack() if hasattr(source, "to_dlpack") else (
        source.__dlpack__() if hasattr(source, "__dlpack__") else source)
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    tensor = _DLTensor.from_address(get_pointer(capsule, b"dltensor"))
    if tensor.device.device_type != _KDL_CUDA:
        raise BuilderError(f"DLPack tensor is on device type {tensor.device.device_type}, not CUDA memory")
    if tensor.dtype.code != 2 or tensor.dtype.lanes != 1 or tensor.dtype.bits not in _DLPACK_FLOATS:
        raise BuilderError(f"DLPack tensor has dtype code {tensor.dtype.code}/{tensor.dtype.bits} bits; "
                           "the plan takes float16 or float32")
    shape = tuple(tensor.shape[i] for i in range(tensor.ndim))
    if tensor.strides:
        expected, step = [], 1
        for size in reversed(shape):
            expected.insert(0, step)
            step *= size
        if any(size > 1 and tensor.strides[i] != expected[i] for i, size in enumerate(shape)):
            raise BuilderError(f"DLPack tensor of shape {shape} is not contiguous")
    dtype = np.dtype(_DLPACK_FLOATS[tensor.dtype.bits])
    view = DeviceView(tensor.data + tensor.byte_offset, shape, DataType.from_dtype(dtype))
    view.keepalive = capsule  # the memory lives as long as the capsule's owner reference
    return view


class _Events:
    """A pair of CUDA events for GPU-side timing.

    Polygraphy's CUDA wrapper has streams, memory and copies but no events, so
    the four event calls go to the CUDA runtime it has already loaded.
    """

    def __init__(self) -> None:
        from polygraphy import cuda

        self.lib = cuda.wrapper().handle
        self.lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        self.start, self.end = self._create(), self._create()

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise BuilderError(f"CUDA {what} failed with error {code}")

    def _create(self) -> int:
        event = ctypes.c_void_p()
        self._check(self.lib.cudaEventCreate(ctypes.byref(event)), "cudaEventCreate")
        return event.value

    def record(self, event: int, stream: int) -> None:
        self._check(self.lib.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cudaEventRecord")

    def elapsed_ms(self) -> float:
        self._check(self.lib.cudaEventSynchronize(ctypes.c_void_p(self.end)), "cudaEventSynchronize")
        ms = ctypes.c_float()
        self._check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), ctypes.c_void_p(self.start),
                                                  ctypes.c_void_p(self.end)), "cudaEventElapsedTime")
        return float(ms.value)


class PlanRunner:
    """Runs a plan on the GPU through Polygraphy's TrtRunner: numpy or device memory in, numpy out."""

    def __init__(self, plan: str, device: int = 0):
        trt = tensorrt_module()
        from polygraphy import cuda
        from polygraphy.backend.trt import TrtRunner

        self.cuda = cuda
        code = cuda.wrapper().handle.cudaSetDevice(device)  # before any allocation: the instance's GPU
        if code != 0:
            raise BuilderError(f"CUDA cudaSetDevice({device}) failed with error {code}")
        self.engine = load_engine(plan)
        self.runner = TrtRunner(self.engine)
        self.runner.activate()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.input_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.inputs[0])))
        self.batch_buffer = None  # device memory for batches gathered from several device tensors

    def close(self) -> None:
        """Frees the runner's context and buffers (Polygraphy warns about runners never deactivated)."""
        if self.runner.is_active:
            self.runner.deactivate()
        if self.batch_buffer is not None:
            self.batch_buffer.free()
            self.batch_buffer = None

    def __enter__(self) -> "PlanRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gather(self, parts: Sequence):
        """One input batch from the requests of a dynamic batch.

        Host arrays are concatenated on the host (the runner copies once);
        a single device tensor is used where it lies; several device tensors
        (or a mix) are copied into one device buffer on the runner's stream.
        """
        if all(isinstance(p, np.ndarray) for p in parts):
            return np.concatenate(parts) if len(parts) > 1 else parts[0]
        if len(parts) == 1:
            return parts[0]
        from polygraphy.datatype import DataType

        rows = sum(p.shape[0] for p in parts)
        if self.batch_buffer is None:
            self.batch_buffer = self.cuda.DeviceArray(shape=(0,), dtype=DataType.from_dtype(self.input_dtype))
        batch = self.batch_buffer.resize((rows, *parts[0].shape[1:]))
        row_bytes = batch.nbytes // rows
        offset = 0
        for part in parts:
            host = isinstance(part, np.ndarray)
            if host:
                part = np.ascontiguousarray(part.astype(self.input_dtype, copy=False))
            self.cuda.wrapper().memcpy(
                dst=batch.ptr + offset, src=part.ctypes.data if host else part.ptr, nbytes=part.shape[0] * row_bytes,
                kind=self.cuda.MemcpyKind.HostToDevice if host else self.cuda.MemcpyKind.DeviceToDevice,
                stream_ptr=self.runner.stream.ptr)
            offset += part.shape[0] * row_bytes
        return batch

    def __call__(self, batch: Union[np.ndarray, object]) -> Dict[str, np.ndarray]:
        """Runs one batch (numpy, or a DeviceView on this GPU); returns host copies of the outputs."""
        if isinstance(batch, np.ndarray):
            batch = np.ascontiguousarray(batch.astype(self.input_dtype, copy=False))
        try:
            outputs = self.runner.infer({self.inputs[0]: batch})
        except polygraphy_errors() as exc:
            raise BuilderError(f"TensorRT execution failed: {exc}") from None
        # The runner reuses its host output buffers on the next call.
        return {name: np.array(outputs[name]) for name in self.outputs}

    def time(self, batch: int, warmup: int = 20, iterations: int = 200) -> Dict[str, float]:
        """Times GPU execution at one batch size with CUDA events (input already on the device).

        One `infer` binds the shapes and buffers; then only the execution is
        enqueued and timed. The runner's `infer` times on the host and includes
        the input checks and copies, which this measures without.
        """
        shape = tuple(self.engine.get_tensor_shape(self.inputs[0]))[1:]
        self(np.zeros((batch, *shape), dtype=np.float32))
        context, stream = self.runner.context, self.runner.stream.ptr
        for _ in range(warmup):
            context.execute_async_v3(stream)
        self.runner.stream.synchronize()
        events, samples = _Events(), []
        for _ in range(iterations):
            events.record(events.start, stream)
            if not context.execute_async_v3(stream):
                raise BuilderError("TensorRT execution failed")
            events.record(events.end, stream)
            samples.append(events.elapsed_ms() / 1000.0)
        return timing_row(batch, samples)


