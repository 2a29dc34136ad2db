"""The repository build's settings (`RepoSettings`), with the GPU photo path's setup and the instance defaults
they take."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Tuple

from builder.settings.parts import (ENGINES, FLAVORS, GPU_DECODERS, GPU_PHOTO_PATHS, IN_PROCESS_PHOTO_PATHS,
                                   INDUCTOR_PRECISIONS, PREPROCESS, QUANTIZED_PRECISIONS, TORCH_COMPILE,
                                   WINDOW_ATTENTIONS, Batching, InstanceGroup, ModelSource, Parity, VersionPolicy,
                                   _fail, check_model_name)


def _default_classifier_instances() -> InstanceGroup:
    return InstanceGroup("KIND_GPU", 1)


# Two instances of each Python model: tritonserver's dynamic batcher can lose the wake-up it waits for
# when its one instance frees and then sleeps 500 ms. With one instance each, 2-6 of 6,000 requests at
# concurrency 1 and 10-12 of 6,000 at 4 took over 500 ms; with two (classifier one), none of 24,000 took
# over 77 ms, at 5-17% more throughput (perf/results/cpu-batcher-stall, two runs).
PYTHON_MODEL_INSTANCES = 2


def _cpu_instances() -> InstanceGroup:
    return InstanceGroup("KIND_CPU", PYTHON_MODEL_INSTANCES)


# What a GPU photo path (`--preprocess gpu` on GPU instances) is built with where the options are not given: the
# fastest setup measured on one H100 and H200 (perf/results/h200-photo-hybrid, h200-photo-ceiling; 7,318 img/s
# with one photo per request at concurrency 256 on an H100, against 5,335 on an H200 with the two-instance
# defaults of the other preprocessings): eight photo-path processes each taking batches of at most 32 (hybrid:
# up to 8 classified in the process, larger batches joined in the classifier model), two classifier instances
# batching what they send up to 128 without waiting for company, queues that hold a burst, and MPS so that the
# processes share the GPU at once. Keyed by `builder repo` option (dest); any option given wins.
GPU_PHOTO_PATH_SETUP = {"preprocess_instances": 8, "preprocess_max_batch_size": 32, "instance_count": 2,
                        "max_batch_size": 128, "preferred_batch_sizes": (32, 64, 128), "max_queue_delay_us": 0,
                        "max_queue_size": 4096}
PHOTO_SETUP_MODES = ("measure", "fixed")


@dataclass(frozen=True)
class PhotoSetup:
    """How the build settles a GPU photo path's processes, batch limit and MPS (`builder.repository.photo_setup`).

    Attributes:
        mode: `measure` (on a build host with a CUDA GPU, time every candidate with the served code and write the
            one that serves the most images a second within `budget_ms`) or `fixed` (`GPU_PHOTO_PATH_SETUP`).
        processes: Photo-path instance counts to try (an option given by hand is the only one).
        batches: Photo-path batch limits to try (likewise).
        mps: MPS settings to try.
        budget_ms: The longest a batch may take at its median, bytes in to arrays out.
        seconds: Measured seconds per candidate, after warm-up.
    """

    mode: str = "measure"
    processes: Tuple[int, ...] = (4, 8)
    batches: Tuple[int, ...] = (16, 32, 64)
    mps: Tuple[bool, ...] = (False, True)
    budget_ms: float = 50.0
    seconds: float = 2.0

    @property
    def candidates(self) -> int:
        """How many setups the grid holds."""
        return len(self.processes) * len(self.batches) * len(self.mps)

    def __post_init__(self) -> None:
        if self.mode not in PHOTO_SETUP_MODES:
            _fail("photo_setup", f"{self.mode!r} is unknown", f"use one of {', '.join(PHOTO_SETUP_MODES)}")
        for name in ("processes", "batches"):
            values = getattr(self, name)
            if not values or min(values) < 1:
                _fail(f"photo_setup {name}", f"{list(values)} holds no count of 1 or more", "use e.g. 4,8")
        if not self.mps:
            _fail("photo_setup mps", "is empty", "try MPS off, on, or both")
        if not self.budget_ms > 0 or not self.seconds > 0:
            _fail("photo_batch_budget_ms", f"{self.budget_ms:g} ms over {self.seconds:g} s a candidate",
                  "use a positive budget, e.g. 50")


# From this many GPU photo-path instances a GPU: `auto` is the hybrid design with the inductor engine (several
# processes feed the classifier model better than each runs its own engine), and the repository is served under
# MPS (`builder serve` reads the manifest): without it the GPU runs one process's context at a time (8 instances:
# 5,593 img/s, under MPS 7,493; perf/results/h200-photo-buckets, h200-photo-hybrid).
MANY_PHOTO_PATH_INSTANCES = 6


def torch_threads(instances: InstanceGroup) -> str:
    """The `intra_op_threads` config parameter of a model that runs torch: "1" on GPU instances, "0" (torch decides)
    on CPU ones.

    A GPU instance only stacks and copies batches on the CPU, and each instance is a stub process: torch's default
    pool, a thread per core in every one, oversubscribed the cores (2 classifier instances on an H100 served 187
    img/s with it and 2,312 with one thread each, perf/results/h100-analyze/threads/). CPU instances compute there.
    """
    return "1" if instances.kind == "KIND_GPU" else "0"


def classifier_kind(flavor: str, engine: str, preprocess: InstanceGroup, gpu: Optional[str], gpus=()) -> str:
    """Where the classifier runs when its instance kind is not given: where its engine runs.

    The container flavor's native backends place themselves on the GPU. In the local flavor the classifier is a
    Python model: on the GPU when the build host had one (`gpu`) and the engine was built for it (inductor, a
    TensorRT plan), when the preprocess (or photo path) model's GPU instances hand it GPU tensors (`preprocess`:
    its instances), or when `gpus` names GPUs; else on the CPU (ONNX Runtime, or an engine built without a GPU).
    """
    if flavor == "container" or gpus or preprocess.kind == "KIND_GPU":
        return "KIND_GPU"
    return "KIND_GPU" if gpu and engine in ("inductor", "tensorrt") else "KIND_CPU"


def default_preprocess_instances(preprocess: str, kind: Optional[str] = None,
                                 count: Optional[int] = None) -> InstanceGroup:
    """The preprocess (or photo path) model's instances: on the GPU for `gpu`, else the CPU, unless told."""
    return InstanceGroup(kind or ("KIND_GPU" if preprocess == "gpu" else "KIND_CPU"),
                         PYTHON_MODEL_INSTANCES if count is None else count)


@dataclass(frozen=True)
class RepoSettings:
    """Everything `build_repository` needs.

    Attributes:
        source: Model and weights.
        output: Repository folder to (re)write atomically.
        flavor: `container` (native onnxruntime backend) or `local`
            (ONNX Runtime inside the Python backend, for pip tritonserver).
        name: Ensemble name; defaults to the timm model name.
        opset: ONNX opset (>= 17 for native LayerNormalization).
        classifier_batching: Batching of the classifier.
        preprocess_batching: Batching of the preprocess model, and of the photo
            path's model with `preprocess="gpu"` (its max batch may differ from
            the classifier's; the ensemble's is the smaller of the two).
        classifier_instances: Instance group of the classifier.
        preprocess_instances: Instance group of the preprocess model, and of
            the photo path's model with `preprocess="gpu"` (default: two
            instances, on the GPU for `gpu`, else on the CPU).
        postprocess_instances: Instance group of the postprocess model (the
            same default).
        parity: Export validation thresholds.
        version: Model version directory to write.
        version_policy: Version policy of every model.
        max_image_pixels: Largest decoded image the preprocess model accepts.
        plan: A TensorRT plan (built by `builder.engines.trt` where the serving
            TensorRT lives) to serve as the classifier instead of ONNX Runtime:
            on the native `tensorrt_plan` backend in the container flavor, in
            the Python backend in the local flavor; its `plan.json` sidecar is
            taken from beside it.
        cuda_graphs: Let the tensorrt_plan backend capture CUDA graphs.
        preprocess: `exact` (numpy + Pillow on the CPU, bit-identical to
            timm's eval transform), `draft` (the same, with JPEGs larger
            than the resize decoded at a reduced DCT scale by libjpeg) or
            `gpu` (batched GPU JPEG decode and resize with torch, the exact
            path for what the GPU cannot take); `draft` and `gpu` pass a
            parity gate against `exact`.
        engine: The classifier engine: `auto` (on a GPU host: the fastest of
            the candidates the host can build, by measurement, see
            `builder.engines.choice`; without a GPU: ONNX Runtime, or the
            `plan` when one is given), `onnxruntime` (the exported ONNX),
            `inductor` (a torch.export program compiled by TorchInductor, FP16
            on the GPU, in the Python backend; takes GPU input by DLPack) or
            `tensorrt` (the `plan`).
        torch_compile: For the inductor engine: `none` (the exported program
            eager), `default` (TorchInductor) or `reduce-overhead` (the
            default: TorchInductor + CUDA graphs per batch bucket).
        inductor_precision: The inductor engine's precision on a GPU: `auto`
            (the default: on a GPU build host, fp16, int8 and fp8 race
            where the GPU and torchao allow, each gated against PyTorch
            FP32; without a GPU, fp16), `fp16`, `fp32`, `int8`, `fp8`
            (rowwise) or `fp8-tensor` (CPU instances always run FP32).
        window_attention: The inductor engine's window attention on a GPU:
            `auto` (the default: on a GPU build host the FP16 program with
            every window attention in one Triton kernel races beside timm's
            own; without a GPU, timm's), `timm` or `fused` (Swin V1 models
            whose head size is a power of two from 16; others fail it, or
            leave `auto` on timm's with a log line).
        compile_timeout_s: Each TorchInductor compile or load of the build
            is stopped after this many seconds (its candidate fails).
        preprocess_parity: Thresholds of the `draft` or `gpu` preprocessing
            against `exact` (logits of the built model on real photos).
        onnxruntime_tensorrt: Container flavor without a plan: ONNX Runtime's
            TensorRT execution accelerator (FP16, engine cache in the model
            directory, so the repository must be mounted writable).
        response_cache: Triton's response cache on the model clients call
            (the ensemble, or the GPU photo path under its name): identical
            uploads are answered from memory (the server needs a cache:
            `builder serve --cache-mb N`).
        gpu_photo_path: With `preprocess="gpu"`, what clients call under the
            ensemble's name: `fused` (one Python model that decodes the batch
            on the GPU, runs the classifier's inductor engine in its own
            process and does top-k on the GPU; the classifier model stays for
            direct clients), `bls` (the same model calling the classifier
            model once per batch by BLS: any engine), `hybrid` (fused for
            batches of up to `hybrid_local_batch` images, bls for larger
            ones: a lone photo skips the hop, a full batch joins the
            classifier's batches) or `auto` (the default: with the inductor
            engine fused, or hybrid from `MANY_PHOTO_PATH_INSTANCES` GPU
            photo-path instances; else bls).
        gpu_decoder: With `preprocess="gpu"`: `auto` (torchvision's nvJPEG
            batch decode), `torchvision`, or `nvimgcodec` (nvImageCodec,
            hardware JPEG decoders first; the package must be installed in
            the serving Python).
        hybrid_local_batch: With `gpu_photo_path="hybrid"`: the largest
            batch (images) the photo path classifies in its own process (at
            most the classifier's max batch).
        place_classifier_by_engine: The classifier's instance kind was not
            given: once the engine is settled, the build places it where the
            engine runs (`classifier_kind`); `classifier_instances.kind` is
            provisional until then.
        photo_setup: How a GPU photo path's processes, batch limit and MPS
            are settled (measured on the build's GPU by default). When it
            measures, its grid, not `preprocess_instances.count` or
            `preprocess_batching.max_batch_size`, decides them: to keep a
            hand-set value, give the grid that one value (the CLI does) or
            `PhotoSetup(mode="fixed")`.
        mps: Serve under CUDA MPS (`builder serve` reads the manifest);
            None: from `MANY_PHOTO_PATH_INSTANCES` GPU photo-path instances.
    """

    source: ModelSource = field(default_factory=ModelSource)
    output: str = "model_repository"
    flavor: str = "container"
    name: Optional[str] = None
    opset: int = 17
    classifier_batching: Batching = field(default_factory=Batching)
    preprocess_batching: Batching = field(default_factory=lambda: Batching(32, (), 100))
    classifier_instances: InstanceGroup = field(default_factory=_default_classifier_instances)
    preprocess_instances: Optional[InstanceGroup] = None  # None: the default for `preprocess` (see above)
    postprocess_instances: InstanceGroup = field(default_factory=_cpu_instances)
    parity: Parity = field(default_factory=Parity)
    version: int = 1
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    max_image_pixels: Optional[int] = None  # None: imaging.MAX_IMAGE_PIXELS (64 MP)
    plan: Optional[str] = None
    cuda_graphs: bool = False
    preprocess: str = "exact"
    engine: str = "auto"
    torch_compile: Optional[str] = None
    inductor_precision: str = "auto"
    window_attention: str = "auto"
    compile_timeout_s: float = 900
    preprocess_parity: Parity = field(default_factory=lambda: Parity(max_abs=0.5, min_cosine=0.999, min_top1=0.9))
    onnxruntime_tensorrt: bool = False
    response_cache: bool = False
    engine_parity: Parity = field(default_factory=lambda: Parity(max_abs=0.5, min_cosine=0.999, min_top1=0.9))
    gpu_photo_path: str = "auto"
    gpu_decoder: str = "auto"
    hybrid_local_batch: int = 8
    place_classifier_by_engine: bool = False
    photo_setup: PhotoSetup = field(default_factory=PhotoSetup)
    mps: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.preprocess_instances is None:  # the GPU path's models run on the GPU
            object.__setattr__(self, "preprocess_instances", default_preprocess_instances(self.preprocess))
        self._place_gpu_models_together()
        self._check_gpu_photo_path()
        if self.preprocess not in PREPROCESS:
            _fail("preprocess", f"{self.preprocess!r} is unknown", f"use one of {', '.join(PREPROCESS)}")
        if self.engine not in ENGINES:
            _fail("engine", f"{self.engine!r} is unknown", f"use one of {', '.join(ENGINES)}")
        if self.torch_compile is not None and self.torch_compile not in TORCH_COMPILE:
            _fail("torch_compile", f"{self.torch_compile!r} is unknown", f"use one of {', '.join(TORCH_COMPILE)}")
        if self.inductor_precision not in ("auto", *INDUCTOR_PRECISIONS):
            _fail("inductor_precision", f"{self.inductor_precision!r} is unknown",
                  f"use one of auto, {', '.join(INDUCTOR_PRECISIONS)}")
        if self.flavor == "container" and self.inductor_precision in QUANTIZED_PRECISIONS:
            _fail("inductor_precision", f"{self.inductor_precision} needs torch >= 2.11 (and torchao for the dynamic "
                  "scales), and the container image's torch is older (docker/Dockerfile.tritonserver)",
                  "use fp16, or the local flavor")
        if self.window_attention not in WINDOW_ATTENTIONS:
            _fail("window_attention", f"{self.window_attention!r} is unknown",
                  f"use one of {', '.join(WINDOW_ATTENTIONS)}")
        if self.window_attention == "fused" and (self.flavor == "container" or self.engine not in ("inductor", "auto")):
            _fail("window_attention", "fused runs in the local flavor's inductor engine (the container image's "
                  "torch and Triton are older and untried with the kernel)",
                  "use --flavor local with --engine inductor or auto, or leave it out")
        if self.compile_timeout_s <= 0:
            _fail("compile_timeout_s", f"is {self.compile_timeout_s}", "use a positive number of seconds, e.g. 900")
        if self.torch_compile is not None and self.engine not in ("inductor", "auto"):
            _fail("torch_compile", f"applies to the inductor engine, not {self.engine}",
                  "pass --engine inductor (or auto) with it")
        if self.onnxruntime_tensorrt and (self.flavor != "container" or self.plan
                                          or self.engine not in ("onnxruntime", "auto")):
            _fail("onnxruntime_tensorrt", "applies to the container flavor's ONNX Runtime classifier",
                  "use it with --flavor container, --engine onnxruntime and no --plan")
        if self.plan and self.engine not in ("tensorrt", "auto"):
            _fail("engine", f"{self.engine} and a TensorRT plan were both given",
                  "serve one classifier: drop --plan, or pass --engine tensorrt (or auto: the plan competes)")
        if self.engine == "tensorrt" and not self.plan:
            _fail("plan", "the tensorrt engine serves a plan and none was given",
                  "build one where TensorRT lives (`python -m builder.engines.trt build`, `make plan-docker`) "
                  "and pass --plan")
        if self.plan is not None:
            if not os.path.isfile(self.plan):
                _fail("plan", f"{self.plan!r} does not exist", "build it with `make plan-docker` first")
        if self.cuda_graphs and (self.plan is None or self.flavor != "container"):
            _fail("cuda_graphs", "applies to the native tensorrt_plan backend only",
                  "pass --plan with the container flavor")
        if self.flavor not in FLAVORS:
            _fail("flavor", f"{self.flavor!r} is unknown", f"use one of {', '.join(FLAVORS)}")
        if self.name is not None:
            check_model_name("name", self.name)
        if not self.output:
            _fail("output", "is empty", "name the repository folder, e.g. model_repository")
        if self.opset < 17:
            _fail("opset", f"is {self.opset}", "use 17 or newer (native LayerNormalization)")
        if self.version < 1:
            _fail("version", f"is {self.version}", "Triton versions start at 1")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            _fail("max_image_pixels", "must be positive", "use e.g. 64000000, or leave it out (64 MP)")

    def _check_gpu_photo_path(self) -> None:
        """The GPU photo path's decoder, design and hybrid limit."""
        if self.gpu_decoder not in GPU_DECODERS:
            _fail("gpu_decoder", f"{self.gpu_decoder!r} is unknown", f"use one of {', '.join(GPU_DECODERS)}")
        if self.gpu_photo_path not in GPU_PHOTO_PATHS:
            _fail("gpu_photo_path", f"{self.gpu_photo_path!r} is unknown", f"use one of {', '.join(GPU_PHOTO_PATHS)}")
        if self.gpu_photo_path in IN_PROCESS_PHOTO_PATHS and self.engine not in ("inductor", "auto"):
            _fail("gpu_photo_path", f"{self.gpu_photo_path} runs the inductor engine in the photo path's process, "
                  f"not {self.engine}", "pass --engine inductor, or --gpu-photo-path bls")
        if self.hybrid_local_batch < 1:
            _fail("hybrid_local_batch", f"is {self.hybrid_local_batch}",
                  "use 1 or more images (--gpu-photo-path bls sends every batch to the classifier model)")

    def _place_gpu_models_together(self) -> None:
        """Every GPU-placed model on the same GPUs: the preprocess (or photo path) model follows `--gpus`.

        Triton gives a KIND_GPU group without ids `count` instances on every GPU; with ids, on those. The
        preprocessing's GPU tensors go to the classifier, so both must live on the same set of devices.
        """
        pre, cls = self.preprocess_instances, self.classifier_instances
        if pre.kind != "KIND_GPU" or cls.kind != "KIND_GPU":
            return
        if not pre.gpus and cls.gpus:
            object.__setattr__(self, "preprocess_instances", dataclasses.replace(pre, gpus=cls.gpus))
        elif tuple(sorted(pre.gpus)) != tuple(sorted(cls.gpus)):
            _fail("preprocess_instances gpus", f"{list(pre.gpus) or 'all'} differ from the classifier's "
                  f"{list(cls.gpus) or 'all'}", "place every GPU model on the same GPUs (one --gpus list)")

    @property
    def compile_mode(self) -> str:
        """The inductor engine's torch.compile mode (TorchInductor + CUDA graphs unless told otherwise)."""
        return self.torch_compile or "reduce-overhead"

    @property
    def served_precision(self) -> str:
        """The inductor precision written into the classifier's config (`auto` unresolved: fp16)."""
        return "fp16" if self.inductor_precision == "auto" else self.inductor_precision

    @property
    def served_attention(self) -> str:
        """The window attention written into the classifier's config (`auto` unresolved: timm's)."""
        return "fused" if self.window_attention == "fused" else "timm"

    @property
    def serve_with_mps(self) -> bool:
        """Whether the repository is to be served under CUDA MPS: as measured, else several GPU photo-path
        processes."""
        instances = self.preprocess_instances
        on_gpu = self.preprocess == "gpu" and instances.kind == "KIND_GPU"
        if self.mps is not None:
            return on_gpu and self.mps
        return on_gpu and instances.count >= MANY_PHOTO_PATH_INSTANCES

    @property
    def ensemble_max_batch(self) -> int:
        """The most images one request to the ensemble's name may carry: no step takes more than its own max."""
        return min(self.classifier_batching.max_batch_size, self.preprocess_batching.max_batch_size)

    @property
    def model_name(self) -> str:
        """The ensemble name (the timm name unless `name` is given)."""
        return self.name or self.source.model_name
