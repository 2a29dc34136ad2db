"""The repository contract: model names, tensor names, dtypes and shapes.

Everything that names a tensor or a model (the ONNX export, the Triton configs,
the ensemble maps, the checker, the clients, perf_analyzer input files) derives
it from here, so a rename happens in exactly one place. This module imports
only the standard library: clients in other services can rely on it without
torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

# Where a client on the server's own host reaches it, and the server's default ports. An address, not
# `localhost`: on one H200 host 176 of the first 256 gRPC requests to `localhost` waited 3.03 s each before
# reaching the server, and none did to 127.0.0.1 (the same server, load and client;
# perf/results/h200-photo-batching). tritonserver listens on IPv4 only; gRPC's resolver tries [::1] for
# localhost first, most likely the wait.
LOOPBACK = "127.0.0.1"
# The timm model built when none is named; the ensemble (and every model name) derives from it.
DEFAULT_MODEL = "swin_tiny_patch4_window7_224"
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
LOCAL_HTTP_URL, LOCAL_GRPC_URL = f"{LOOPBACK}:{HTTP_PORT}", f"{LOOPBACK}:{GRPC_PORT}"

# Triton dtype name -> (config enum name, numpy dtype string). "BYTES" tensors
# are numpy object arrays of bytes.
_DTYPES = {
    "BOOL": ("TYPE_BOOL", "bool"),
    "UINT8": ("TYPE_UINT8", "uint8"),
    "INT32": ("TYPE_INT32", "int32"),
    "INT64": ("TYPE_INT64", "int64"),
    "FP16": ("TYPE_FP16", "float16"),
    "FP32": ("TYPE_FP32", "float32"),
    "BYTES": ("TYPE_STRING", "object"),
}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the contract.

    Attributes:
        name: Tensor name, as written in configs and sent by clients.
        dtype: Triton wire dtype ("FP32", "BYTES", ...).
        dims: Shape without the batch dimension (-1 for a variable dimension).
        label_filename: For an output indexed by class: the labels file its config names, so Triton's
            classification extension (`class_count`) answers with "score:index:label" strings.
    """

    name: str
    dtype: str
    dims: Tuple[int, ...]
    label_filename: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")

    @property
    def config_dtype(self) -> str:
        """The `DataType` enum name used in config.pbtxt (e.g. "TYPE_FP32")."""
        return _DTYPES[self.dtype][0]


# Fixed tensor names of the contract.
IMAGE = "image"            # encoded image bytes, one element per image
PIXELS = "input"           # normalized NCHW float tensor (the ONNX input)
LOGITS = "logits"          # raw classifier scores (the ONNX output), in class order
PROBABILITIES = "probabilities"  # softmax of the logits, in class order
# Top-k with class names is Triton's classification extension on either output above (a request's
# `class_count`: "score:index:label" strings, best first). No served output is BYTES: tritonserver 2.51 dies
# of a divide error (SIGFPE) when a request asks for `class_count` on a BYTES output, so a top-k label
# tensor of our own would let any client stop the server.
# Ensemble-internal name of the classifier's logits on their way to the
# postprocess model, which passes them on as the ensemble's `logits` output.
# tritonserver 2.51 fails a request that asks for a subset of the outputs
# ("unexpected deadlock, at least one output is not set") when one tensor is
# both an ensemble output and the input of a later step; distinct names avoid it.
CLASSIFIER_LOGITS = "classifier_logits"
# Files in model directories: the class names the classifier's outputs carry (Triton's classification
# extension), and the photo the preprocess model warms up with (`<model>/warmup/`).
LABELS_FILE = "labels.txt"
WARMUP_IMAGE = "photo.bin"


@dataclass(frozen=True)
class Contract:
    """Names and shapes of one deployed model family.

    Attributes:
        name: Ensemble name; the step models are named after it.
        image_size: (height, width) the classifier takes.
        num_classes: Number of logits.
    """

    name: str
    image_size: Tuple[int, int]
    num_classes: int

    @classmethod
    def named(cls, name: str) -> "Contract":
        """A contract for its model names only (tensor shapes unknown), e.g. on the client side."""
        return cls(name, (0, 0), 0)

    # Model names --------------------------------------------------------
    @property
    def ensemble(self) -> str:
        return self.name

    @property
    def preprocess(self) -> str:
        return f"{self.name}_preprocess"

    @property
    def classifier(self) -> str:
        return f"{self.name}_classifier"

    @property
    def postprocess(self) -> str:
        return f"{self.name}_postprocess"

    @property
    def model_names(self) -> Tuple[str, str, str, str]:
        return (self.preprocess, self.classifier, self.postprocess, self.ensemble)

    # Tensors ----------------------------------------------------------------
    @property
    def image(self) -> TensorSpec:
        return TensorSpec(IMAGE, "BYTES", (1,))

    @property
    def pixels(self) -> TensorSpec:
        return TensorSpec(PIXELS, "FP32", (3, *self.image_size))

    @property
    def logits(self) -> TensorSpec:
        return TensorSpec(LOGITS, "FP32", (self.num_classes,), LABELS_FILE)

    @property
    def probabilities(self) -> TensorSpec:
        return TensorSpec(PROBABILITIES, "FP32", (self.num_classes,), LABELS_FILE)

    @property
    def postprocess_outputs(self) -> Tuple[TensorSpec, ...]:
        # The probabilities plus the raw logits passed through, so they stay reachable through the ensemble
        # for clients that want their own postprocessing. Both are indexed by class and carry the labels.
        return (self.probabilities, self.logits)

    @property
    def ensemble_outputs(self) -> Tuple[TensorSpec, ...]:
        return self.postprocess_outputs


def contract_tensors(contract: Contract) -> dict:
    """The contract's tensors as the manifest records them (name -> dtype, dims without the batch)."""
    return {spec.name: {"dtype": spec.dtype, "dims": list(spec.dims)}
            for spec in (contract.image, contract.pixels, *contract.ensemble_outputs)}
