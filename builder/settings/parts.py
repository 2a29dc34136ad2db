"""The parts every stage's settings are made of: the model's source, batching, instance groups, parity
thresholds, the version policy, and the choices and limits each option takes.

Every check raises :class:`BuilderError` naming the field and the fix, so a typo on the command line or in a
Makefile variable fails before any work.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from builder.core import contract as C
from builder.errors import BuilderError, field_error

DEFAULT_MODEL = C.DEFAULT_MODEL
FLAVORS = ("container", "local")
PREPROCESS = ("exact", "draft", "gpu")
# How the gpu preprocessing's photo path is served: one Python model that runs the inductor engine itself
# (`fused`), calls the classifier model once per batch by BLS (`bls`), or does the first for small batches and the
# second for larger ones (`hybrid`), or `auto` (with the inductor engine fused, hybrid from
# MANY_PHOTO_PATH_INSTANCES GPU instances; else bls); see docs/gpu-photo-path.md.
# Triton's ensemble of the three models with the GPU preprocess model was a fourth design until every measured row
# showed it slower (perf/results/h200-photo-designs); the CPU preprocessings keep the ensemble.
GPU_PHOTO_PATHS = ("auto", "fused", "bls", "hybrid")
# The photo-path designs that run the classifier's inductor engine in their own process.
IN_PROCESS_PHOTO_PATHS = ("fused", "hybrid")
# The gpu preprocessing's JPEG decoder: torchvision's nvJPEG batch decode (`auto`) or nvImageCodec (hardware JPEG
# engines first, then CUDA).
GPU_DECODERS = ("auto", "torchvision", "nvimgcodec")
ENGINES = ("auto", "onnxruntime", "inductor", "tensorrt")
TORCH_COMPILE = ("none", "default", "reduce-overhead")
# The inductor engine's precisions on a GPU (`engines/torch_runner.py` PRECISIONS says how each runs). int8 and
# fp8 quantize the Linear layers with torchao (dynamic activation scales); fp8 is rowwise, fp8-tensor per tensor.
# fp8-static: FP8 Linear layers with per-tensor scales calibrated by the build on photos (`engines/static_fp8.py`).
INDUCTOR_PRECISIONS = ("fp16", "fp32", "int8", "fp8", "fp8-tensor", "fp8-static")
# Those that quantize: gated with LOW_PRECISION_PARITY.
QUANTIZED_PRECISIONS = ("int8", "fp8", "fp8-tensor", "fp8-static")
# Those that torchao quantizes: served only where torchao is installed.
TORCHAO_PRECISIONS = ("int8", "fp8", "fp8-tensor")
# What `auto` races on a GPU build host, where the GPU and the installed packages allow it: timm's window
# attention at RACED_PRECISIONS, the fused one at FUSED_RACED_PRECISIONS (static FP8 is 8-bit on the fused engine).
RACED_PRECISIONS = ("fp16", "int8", "fp8")
FUSED_RACED_PRECISIONS = ("fp16", "fp8-static")
# The inductor engine's window attention: timm's own code, or one Triton kernel per window and head
# (`engines/window_attention.py`, Swin V1 only). `auto` races the fused program at FP16 beside timm's at every
# raced precision (each candidate is one more compile); `fused` applies it to every precision tried.
WINDOW_ATTENTIONS = ("auto", "timm", "fused")
INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
# What a TensorRT plan may be built in (`builder.engines.trt`, and the container flavor's `plan` service).
TENSORRT_PRECISIONS = ("fp32", "tf32", "fp16", "int8", "fp8")
# The tritonserver release the `container` flavor targets (NGC 24.10 ships
# tritonserver 2.51.0, the same as the local pip-distributed server).
TRITON_RELEASE = "24.10"
TRITON_VERSION = "2.51.0"
# TensorRT inside that release's containers (nvcr.io/nvidia/tensorrt:24.10-py3).
TENSORRT_VERSION = "10.5.0"

INT32_MAX, UINT32_MAX, UINT64_MAX = 2 ** 31 - 1, 2 ** 32 - 1, 2 ** 64 - 1
# Past these a value is a mistake, not a setting: a lone request waits the whole queue delay for company (a
# 3-year delay hangs it), and every Python-backend instance is a process with its own memory (and CUDA context).
MAX_QUEUE_DELAY_US = 10_000_000
MAX_INSTANCES = 256
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise field_error(field_name, problem, fix)


def check_model_name(field_name: str, name: str) -> str:
    """`name` if Triton can take it as a model (or ensemble) name, else the project error naming `field_name`."""
    if not name or not _NAME_RE.match(name):
        _fail(field_name, f"{name!r} has characters Triton model names should not",
              "use letters, digits, '_', '.' and '-'")
    return name


@dataclass(frozen=True)
class ModelSource:
    """Which timm model to build and where its weights come from.

    Attributes:
        model_name: timm model name (any Swin / SwinV2 classifier).
        pretrained: Load timm's pretrained weights from its hub.
        checkpoint: Path to a safetensors file or a torch state dict.
        model_kwargs: JSON object of extra `timm.create_model` keyword
            arguments (e.g. a tiny `embed_dim`/`depths` for tests).
        seed: Seed for deterministic random initialization.
        labels: A UTF-8 text file of class names, one per line in class
            order (a fine-tuned model's own classes). None: ImageNet's
            names for ImageNet-sized heads, else `class_<i>`.
    """

    model_name: str = DEFAULT_MODEL
    pretrained: bool = False
    checkpoint: Optional[str] = None
    model_kwargs: str = "{}"
    seed: int = 0
    labels: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.model_name or not _NAME_RE.match(self.model_name):
            _fail("model_name", f"{self.model_name!r} is not a timm model name",
                  f"pass one such as {DEFAULT_MODEL}")
        if self.pretrained and self.checkpoint:
            _fail("checkpoint", "given together with pretrained",
                  "choose either --pretrained or --checkpoint PATH")
        if self.checkpoint and not os.path.isfile(self.checkpoint):
            _fail("checkpoint", f"{self.checkpoint!r} does not exist",
                  "pass the path of a .safetensors file or a saved state dict")
        if self.labels is not None and not os.path.isfile(self.labels):
            _fail("labels", f"{self.labels!r} does not exist", "pass a text file with one class name per line")
        try:
            kwargs = json.loads(self.model_kwargs)
        except json.JSONDecodeError as exc:
            raise BuilderError(f"model_kwargs: not valid JSON ({exc.msg}); "
                               "pass a JSON object such as '{\"embed_dim\": 32}'") from None
        if not isinstance(kwargs, dict):
            _fail("model_kwargs", "is not a JSON object", "pass e.g. '{\"embed_dim\": 32}'")

    @property
    def kwargs(self) -> Dict[str, Any]:
        """The parsed `model_kwargs` (lists become tuples, as timm expects)."""
        return {k: tuple(v) if isinstance(v, list) else v
                for k, v in json.loads(self.model_kwargs).items()}


@dataclass(frozen=True)
class Batching:
    """Batch limits, Triton's dynamic batcher and its queue policy for one model.

    Attributes:
        max_batch_size: Largest batch the model accepts (>= 1).
        preferred_batch_sizes: Batch sizes the dynamic batcher aims for.
        max_queue_delay_us: How long a request may wait to be batched.
        max_queue_size: Requests the queue holds before new ones are
            rejected at once (256; 0: unbounded). Overload then fails fast
            instead of growing everyone's latency.
        queue_timeout_us: A queued request older than this is rejected
            (0: no timeout); clients may ask for a shorter one.
        priority_levels: Request priorities the queue honours (0: none);
            requests without one get the lowest.
    """

    max_batch_size: int = 32
    preferred_batch_sizes: Tuple[int, ...] = ()
    max_queue_delay_us: int = 100
    max_queue_size: int = 256
    queue_timeout_us: int = 0
    priority_levels: int = 0

    def __post_init__(self) -> None:
        for name in ("max_queue_size", "queue_timeout_us", "priority_levels"):
            if getattr(self, name) < 0:
                _fail(name, "is negative", "use 0 (off) or more")
        # The widths of the ModelConfig fields they are written to: past them the config cannot be written.
        for name, largest in (("max_batch_size", INT32_MAX), ("max_queue_size", UINT32_MAX),
                              ("queue_timeout_us", UINT64_MAX), ("max_queue_delay_us", UINT64_MAX),
                              ("priority_levels", UINT64_MAX)):
            if getattr(self, name) > largest:
                _fail(name, f"{getattr(self, name)} is above {largest}, the largest Triton's config takes",
                      "use a smaller value")
        if self.max_batch_size < 1:
            _fail("max_batch_size", f"is {self.max_batch_size}",
                  "use 1 or more (every model of the repository batches)")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                _fail("preferred_batch_sizes", f"{size} is outside 1..{self.max_batch_size}",
                      "keep every preferred size at most max_batch_size")
        if not 0 <= self.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
            _fail("max_queue_delay_us", f"is {self.max_queue_delay_us}",
                  f"use 0 to {MAX_QUEUE_DELAY_US:,} microseconds (a lone request waits this long for company)")


@dataclass(frozen=True)
class InstanceGroup:
    """Where and how many copies of a model Triton runs.

    Attributes:
        kind: KIND_GPU, KIND_CPU or KIND_AUTO.
        count: Instances per device (per GPU for KIND_GPU).
        gpus: GPU ids for KIND_GPU; empty means all GPUs.
    """

    kind: str = "KIND_GPU"
    count: int = 1
    gpus: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in INSTANCE_KINDS:
            _fail("instance kind", f"{self.kind!r} is unknown", f"use one of {', '.join(INSTANCE_KINDS)}")
        if not 1 <= self.count <= MAX_INSTANCES:
            _fail("instance count", f"is {self.count}", f"use 1 to {MAX_INSTANCES} (a few per device)")
        if self.gpus and self.kind != "KIND_GPU":
            _fail("instance gpus", f"given for {self.kind}", "list GPUs only with KIND_GPU")
        if any(g < 0 for g in self.gpus):
            _fail("instance gpus", "has a negative id", "use GPU ids as nvidia-smi lists them")


@dataclass(frozen=True)
class Parity:
    """Thresholds an exported model must meet against PyTorch.

    Attributes:
        max_abs: Largest allowed absolute difference of any logit.
        min_cosine: Smallest allowed cosine similarity of a row of logits.
        min_top1: Smallest allowed fraction of rows with the same top-1.
        batch: Rows compared (> 1, so the dynamic batch axis is exercised).
    """

    max_abs: float = 1e-3
    min_cosine: float = 0.9999
    min_top1: float = 1.0
    batch: int = 4

    def __post_init__(self) -> None:
        if self.max_abs <= 0:
            _fail("parity max_abs", "must be positive", "use e.g. 1e-3 for FP32")
        if not 0 < self.min_cosine <= 1:
            _fail("parity min_cosine", "must be in (0, 1]", "use e.g. 0.9999")
        if not 0 <= self.min_top1 <= 1:
            _fail("parity min_top1", "must be in [0, 1]", "use e.g. 1.0")
        if self.batch < 2:
            _fail("parity batch", "must be at least 2", "compare a real batch so the batch axis is tested")


# Thresholds of reduced-precision variants (TensorRT plans, INT8 ONNX) against PyTorch FP32: FP16/INT8 logits
# differ by tenths, so the gate is on the direction (cosine) and the answer (top-1), not the last digit.
LOW_PRECISION_PARITY = Parity(max_abs=0.5, min_cosine=0.99, min_top1=0.9)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions Triton serves: `latest` N, `all`, or `specific` ones."""

    kind: str = "latest"
    num_versions: int = 1
    versions: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "all", "specific"):
            _fail("version_policy", f"{self.kind!r} is unknown", "use latest, all or specific")
        if self.kind == "latest" and self.num_versions < 1:
            _fail("version_policy", "latest needs num_versions >= 1", "e.g. latest:1")
        if self.kind == "specific" and not self.versions:
            _fail("version_policy", "specific needs versions", "e.g. specific:1,2")

    @classmethod
    def parse(cls, text: str) -> "VersionPolicy":
        """Parses `latest`, `latest:N`, `all` or `specific:1,2`."""
        kind, _, arg = text.partition(":")
        try:
            if kind == "latest":
                return cls("latest", int(arg or 1))
            if kind == "specific":
                return cls("specific", versions=tuple(int(v) for v in arg.split(",") if v))
            if arg:
                raise BuilderError(f"version_policy: {text!r}: `{kind}` takes no number; use e.g. all, latest:2 "
                                   "or specific:1,2")
        except ValueError:
            raise BuilderError(f"version_policy: {text!r} has a non-integer; use e.g. latest:2 or specific:1,2") from None
        return cls(kind)
