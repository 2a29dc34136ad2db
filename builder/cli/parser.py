"""The `python -m builder` argument parser: every subcommand's options, each declared once.

Defaults come from the settings dataclasses (`builder.cli.args.field_default`); the commands that use the parsed
arguments live in `builder.__main__`. Only argparse and the settings are imported, so `--help` is instant.
"""

from __future__ import annotations

import argparse

DESCRIPTION = "`python -m builder`: build, check and serve a Triton model repository."


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    parser = argparse.ArgumentParser(prog="python -m builder", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_repo, _add_export, _add_quantize, _add_docker, _add_monitoring, _add_check, _add_serve, _add_stop):
        add(sub)
    for command in sub.choices.values():  # `-v` after the subcommand too; not given there, the top level's stands
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def given_options(argv=None) -> frozenset:
    """The options given on the command line (dest names), told apart from those left at their defaults."""
    parser = build_parser()
    stack = [parser]
    while stack:
        for action in stack.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif action.dest != "help":
                action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv))) - {"command"}


def _add_export(sub) -> None:
    from builder import settings as s
    from builder.cli.args import add_model_args, add_parity_args, field_default

    e = sub.add_parser("export", help="export and validate model.onnx alone")
    add_model_args(e)
    e.add_argument("--opset", type=int, default=field_default(s.RepoSettings, "opset"))
    e.add_argument("--output", default="build/model.onnx")
    add_parity_args(e, field_default(s.RepoSettings, "parity"), top1=False, what="the ONNX export")
    e.add_argument("--reference", default=None, help="write inputs + PyTorch logits (.npz) for plan validation")
    e.add_argument("--calibration", default=None, help="write preprocessed images (.npy) for INT8 calibration")
    data = e.add_mutually_exclusive_group()
    data.add_argument("--images", default=None, help="folder of photos for --reference/--calibration")
    data.add_argument("--noise", action="store_true",
                      help="use seeded Gaussian noise instead of photos (recorded as such; not for real INT8)")
    e.add_argument("--reference-batch", type=int, default=64)


def _add_quantize(sub) -> None:
    from builder import settings as s
    from builder.cli.args import add_parity_args

    q = sub.add_parser("quantize", help="INT8 Q/DQ ONNX with NVIDIA ModelOpt")
    q.add_argument("--onnx", required=True)
    q.add_argument("--calibration", required=True, help=".npy of preprocessed images (builder export --calibration)")
    q.add_argument("--output", required=True)
    q.add_argument("--high-precision", choices=("fp16", "fp32"), default="fp16")
    q.add_argument("--reference", default=None, help=".npz from `builder export --reference` to validate against")
    add_parity_args(q, s.LOW_PRECISION_PARITY, what="the INT8 model (with --reference)")


def _add_docker(sub) -> None:
    from builder import settings as s
    from builder.cli.args import field_default

    d = sub.add_parser("docker", help="render docker/ for the pinned NGC release")
    d.add_argument("--output", default="docker")
    d.add_argument("--model", default=s.DEFAULT_MODEL, help="ensemble name (the repository's --name)")
    d.add_argument("--precision", choices=s.TENSORRT_PRECISIONS, default="fp16",
                   help="the plan service's TensorRT precision")
    from builder.serving.pod import PodSettings as pod

    k = d.add_argument_group("Kubernetes pods (docker/k8s)")
    k.add_argument("--gpus-per-pod", type=int, default=field_default(pod, "gpus_per_pod"),
                   help="nvidia.com/gpu per pod; cores, memory and /dev/shm scale with it")
    k.add_argument("--min-gpus", type=int, default=field_default(pod, "min_gpus"),
                   help="the autoscaler's minimum, in GPUs (rounded up to whole pods)")
    k.add_argument("--max-gpus", type=int, default=field_default(pod, "max_gpus"),
                   help="the autoscaler's maximum, in GPUs (rounded down to whole pods)")
    k.add_argument("--cpus-per-gpu", type=int, default=field_default(pod, "cpus_per_gpu"))
    k.add_argument("--memory-gib-per-gpu", type=int, default=field_default(pod, "memory_gib_per_gpu"))
    k.add_argument("--cuda-memory-pool-mb", type=int, default=field_default(pod, "cuda_memory_pool_mb"),
                   help="each GPU's CUDA memory pool (0: Triton's 64 MiB)")


def _add_monitoring(sub) -> None:
    from builder.cli.args import field_default
    from builder.repository.monitoring import MonitoringSettings as m

    p = sub.add_parser("monitoring", help="write a repository's Prometheus rules and Grafana dashboard again, with "
                                          "other settings (`repo` writes them with the defaults)")
    p.add_argument("--repository", default="model_repository", help="the repository whose models are watched")
    p.add_argument("--output", default=None, help="the folder to write (default: monitoring/ beside the repository)")
    g = p.add_argument_group("What Prometheus watches, and when it alerts")
    g.add_argument("--target", default=field_default(m, "target"), help="tritonserver's metrics endpoint, host:port")
    g.add_argument("--scrape-interval-s", type=int, default=field_default(m, "scrape_interval_s"),
                   help="scrape and rule evaluation interval, seconds")
    g.add_argument("--rate-window", default=field_default(m, "rate_window"),
                   help="window of every rate (a Prometheus duration, at least two scrapes)")
    g.add_argument("--queue-budget-ms", type=float, default=field_default(m, "queue_budget_ms"),
                   help="queue time per request that fires the queue alert; the autoscaler's target too")
    g.add_argument("--failure-ratio", type=float, default=field_default(m, "failure_ratio"),
                   help="share of failed requests that fires the failure alert")
    g.add_argument("--alert-after", default=field_default(m, "alert_after"),
                   help="how long a condition holds before its alert fires (0s: at once)")


def _add_check(sub) -> None:
    c = sub.add_parser("check", help="check a model repository")
    c.add_argument("repository", nargs="?", default="model_repository")
    c.add_argument("--needs-torch", action="store_true",
                   help="print 1 if the repository runs torch in the Python backend (the container image then "
                        "needs --build-arg WITH_TORCH=1), else 0")


def _add_serve(sub) -> None:
    from builder.cli.args import field_default
    from builder.serving.server import METRICS, ServerSettings

    s = sub.add_parser("serve", help="run the local tritonserver on a repository")
    _server_args(s)
    s.add_argument("--model-control", choices=("none", "poll", "explicit"), default="none")
    s.add_argument("--poll-seconds", type=int, default=2)
    s.add_argument("--detach", action="store_true", help="run in the background (stop with `stop`)")
    s.add_argument("--cache-mb", type=int, default=0, help="response cache size for --response-cache models")
    s.add_argument("--cuda-memory-pool-mb", type=int, default=0,
                   help="CUDA memory pool of every GPU for tensors passed between models on the GPU (0: "
                        "Triton's 64)")
    s.add_argument("--mps", action=argparse.BooleanOptionalAction, default=None,
                   help="start a CUDA MPS control daemon of the server's own, so that GPU model instances share each "
                        "GPU at once; quit with the server (default: as the build chose, manifest.json's "
                        "serve.mps: on for a GPU photo path of several instances)")
    s.add_argument("--metrics", choices=METRICS, default=field_default(ServerSettings, "metrics"),
                   help="what the metrics port exports: counters (Triton's default; what monitoring/ reads), "
                        "summaries (latency quantiles too), or off")
    s.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")


def _add_stop(sub) -> None:
    t = sub.add_parser("stop", help="stop a detached local tritonserver (and end what a killed one left: its model "
                                    "processes, its MPS daemon)",
                           description="Stop the tritonserver that `serve --detach` started from --workdir (found "
                                       "by its command line if the folder is gone).")
    _workdir_arg(t)


def _add_repo(sub) -> None:
    from builder import settings as s
    from builder.cli.args import add_model_args, add_parity_args, field_default

    repo = s.RepoSettings
    p = sub.add_parser("repo", help="export the model and write the model repository",
                       description="Export a timm Swin classifier to ONNX, validate it against PyTorch, "
                                   "and write a complete Triton model repository (atomically).")
    add_model_args(p)
    p.add_argument("--labels", default=field_default(s.ModelSource, "labels"),
                   help="class names, one per line in class order (a fine-tuned model's own), served by Triton's "
                        "classification extension (default: ImageNet's names for 1000 or 21k classes, else "
                        "class_<i>)")
    p.add_argument("--name", default=None, help="ensemble name (default: the timm model name)")
    p.add_argument("--output", default=field_default(repo, "output"), help="repository folder")
    p.add_argument("--flavor", choices=("container", "local"), default=None,
                   help="container (default, for NVIDIA's tritonserver image): native onnxruntime / tensorrt_plan "
                        "backends; local (the pip tritonserver, Python backend only): the classifier runs in the "
                        "Python backend; an existing repository keeps its flavor unless this is given")
    _repo_batching_args(p)
    _repo_placement_args(p, repo)
    _repo_preprocess_args(p, repo)
    _repo_engine_args(p, repo)
    _repo_contract_args(p, repo)
    _repo_versions_args(p, repo)
    add_parity_args(p, field_default(repo, "parity"), top1=False, what="the ONNX export")


def _repo_batching_args(p) -> None:
    """Dynamic batching and queue policy of every batched model (`repo`)."""
    from builder import settings as s
    from builder.cli.args import ints

    batching = s.Batching()
    g = p.add_argument_group("batching and queues")
    g.add_argument("--max-batch-size", type=int, default=batching.max_batch_size)
    g.add_argument("--preprocess-max-batch-size", type=int, default=None,
                   help="largest batch of the preprocess model, or of the GPU photo path's model (default: "
                        "--max-batch-size); 32 with 8 photo-path instances under MPS served the most one-image "
                        "requests on an H200 (see the README)")
    g.add_argument("--preferred-batch-sizes", type=ints, default=batching.preferred_batch_sizes, help="e.g. 8,16,32")
    g.add_argument("--max-queue-delay-us", type=int, default=batching.max_queue_delay_us)
    g.add_argument("--max-queue-size", type=int, default=batching.max_queue_size,
                   help="requests queued per model before new ones are rejected at once (0: unbounded)")
    g.add_argument("--queue-timeout-us", type=int, default=batching.queue_timeout_us,
                   help="reject requests queued longer than this (0: no timeout)")
    g.add_argument("--priority-levels", type=int, default=batching.priority_levels,
                   help="request priority levels (0: none)")


def _repo_placement_args(p, repo) -> None:
    """Instances and GPUs (`repo`)."""
    from builder import settings as s
    from builder.cli.args import field_default, ints

    instances = field_default(repo, "classifier_instances")
    g = p.add_argument_group("instances and GPUs")
    g.add_argument("--instance-kind", choices=("KIND_GPU", "KIND_CPU", "KIND_AUTO"), default=None,
                   help="where the classifier runs (default: where its engine runs: the GPU for the container "
                        "flavor; in the local flavor the GPU for an engine built on one (inductor, a plan) or the "
                        "gpu preprocessing, else the CPU)")
    g.add_argument("--instance-count", type=int, default=instances.count, help="classifier instances per device")
    g.add_argument("--gpus", type=ints, default=instances.gpus,
                   help="GPU ids of every GPU-placed model (classifier, GPU preprocessing, photo path), e.g. 0,1 "
                        "(default: all GPUs)")
    g.add_argument("--preprocess-instances", type=int, default=s.PYTHON_MODEL_INSTANCES,
                   help="preprocess model instances (2: one is free when the batcher looks, see the README)")


def _repo_preprocess_args(p, repo) -> None:
    """The photo preprocessing and the GPU photo path (`repo`)."""
    from builder import settings as s
    from builder.cli.args import field_default

    g = p.add_argument_group("preprocessing and the photo path")
    g.add_argument("--preprocess", choices=s.PREPROCESS, default=field_default(repo, "preprocess"),
                   help="exact: Pillow on the CPU, bit-identical to timm; draft: the same, with large JPEGs "
                        "decoded at 1/2, 1/4 or 1/8 scale (parity-gated against exact); gpu: batched GPU JPEG "
                        "decode + resize (parity-gated against exact; other formats take the exact path)")
    g.add_argument("--gpu-photo-path", choices=s.GPU_PHOTO_PATHS, default=field_default(repo, "gpu_photo_path"),
                   help="--preprocess gpu: fused: one model decodes the batch on the GPU, runs the inductor "
                        "engine in its own process and does top-k on the GPU; bls: the same, calling the "
                        "classifier model once per batch (any engine); hybrid: fused for batches of up to "
                        "--hybrid-local-batch images, bls above; auto (default): with the inductor engine fused, or "
                        f"hybrid from {s.MANY_PHOTO_PATH_INSTANCES} GPU photo-path instances (the measured "
                        "setup's 8); else bls. The _preprocess and _postprocess models are not called by the "
                        "photo path: they stay for direct clients on one CPU instance each (no GPU memory)")
    g.add_argument("--hybrid-local-batch", type=int, default=field_default(repo, "hybrid_local_batch"),
                   help="--gpu-photo-path hybrid: the largest batch (images) classified in the photo path's own "
                        "process; larger ones go to the classifier model (default %(default)s)")
    g.add_argument("--gpu-decoder", choices=s.GPU_DECODERS, default=field_default(repo, "gpu_decoder"),
                   help="--preprocess gpu: JPEG decoder (auto: torchvision's nvJPEG; nvimgcodec: nvImageCodec's "
                        "hardware decoders, installed in the serving Python)")
    g.add_argument("--preprocess-instance-kind", choices=("KIND_GPU", "KIND_CPU"), default=None,
                   help="where the preprocess model runs (default: KIND_GPU for --preprocess gpu, else KIND_CPU)")
    setup = field_default(repo, "photo_setup")
    g.add_argument("--photo-setup", choices=s.PHOTO_SETUP_MODES, default=setup.mode,
                   help="--preprocess gpu on GPU instances: measure (default, on a build host with a CUDA GPU): "
                        "time the photo path's own code with no server for "
                        f"{'/'.join(map(str, setup.processes))} processes x batch limits "
                        f"{'/'.join(map(str, setup.batches))} x MPS off/on, {setup.seconds:g} s each, and write "
                        "the one serving the most images a second within --photo-batch-budget-ms (a few "
                        "minutes, each candidate logged; the table goes into manifest.json and the repository's README); fixed: the "
                        "hand-measured setup. --preprocess-instances and --preprocess-max-batch-size given by "
                        "hand are the only values tried; builder serve --mps/--no-mps overrides the MPS choice")
    g.add_argument("--photo-batch-budget-ms", type=float, default=setup.budget_ms,
                   help="--photo-setup measure: the longest a photo-path batch may take at its median, JPEG "
                        "bytes to class arrays (default %(default)s)")


def _repo_engine_args(p, repo) -> None:
    """The classifier's engine (`repo`)."""
    from builder import settings as s
    from builder.cli.args import field_default

    g = p.add_argument_group("classifier engine")
    g.add_argument("--engine", choices=s.ENGINES, default=field_default(repo, "engine"),
                   help="classifier engine. auto (default): on a GPU host, build, gate and time the candidates "
                        "and serve the fastest; without a GPU, onnxruntime (or tensorrt with --plan)")
    g.add_argument("--torch-compile", choices=s.TORCH_COMPILE, default=None,
                   help="inductor engine: the program eager, TorchInductor, or TorchInductor with CUDA graphs per "
                        "batch bucket (default)")
    g.add_argument("--inductor-precision", choices=("auto", *s.INDUCTOR_PRECISIONS), default=None,
                   help="inductor engine precision on a GPU (default auto: on a GPU build host fp16, int8 and "
                        "fp8 race, each gated, and fp16 and fp8-static on the fused window attention; int8/fp8 "
                        "need torchao; fp8-static is calibrated on the bundled photos)")
    g.add_argument("--window-attention", choices=s.WINDOW_ATTENTIONS,
                   default=field_default(repo, "window_attention"),
                   help="inductor engine's window attention (default auto: on a GPU build host the program with "
                        "each window attention in one Triton kernel races at fp16 and fp8-static beside timm's; "
                        "fused: every precision tried, Swin V1 only; local flavor)")
    g.add_argument("--compile-timeout-s", type=float, default=field_default(repo, "compile_timeout_s"),
                   help="stop a TorchInductor compile of the build after this long (its candidate fails)")
    g.add_argument("--plan", default=None,
                   help="a TensorRT plan built where TensorRT lives (python -m builder.engines.trt build): served with "
                        "--engine tensorrt, a candidate with --engine auto")
    g.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs for the TensorRT classifier")
    g.add_argument("--onnxruntime-tensorrt", action="store_true",
                   help="container flavor without a plan: ONNX Runtime's TensorRT accelerator (FP16, engine cache)")


def _repo_contract_args(p, repo) -> None:
    """The ONNX export, the response cache (`repo`)."""
    from builder.cli.args import field_default

    g = p.add_argument_group("outputs and export")
    g.add_argument("--opset", type=int, default=field_default(repo, "opset"))
    g.add_argument("--response-cache", action="store_true",
                   help="answer identical uploads from Triton's response cache on the model clients call (the "
                        "ensemble, or the GPU photo path under its name); serve with --cache-mb")


def _repo_versions_args(p, repo) -> None:
    """Model versions (`repo`)."""
    from builder.cli.args import field_default

    g = p.add_argument_group("versions")
    g.add_argument("--version", type=int, default=field_default(repo, "version"), help="version directory to write")
    g.add_argument("--add-version", action="store_true",
                   help="add the next version beside the served one(s) instead of replacing the repository")
    g.add_argument("--version-policy", default="latest", help="latest[:N] | all | specific:1,2")


def _server_args(p) -> None:
    from builder.core import contract as C

    p.add_argument("--repository", default="model_repository")
    p.add_argument("--http-port", type=int, default=C.HTTP_PORT)
    p.add_argument("--grpc-port", type=int, default=C.GRPC_PORT)
    p.add_argument("--metrics-port", type=int, default=C.METRICS_PORT)
    _workdir_arg(p)


def _workdir_arg(p) -> None:
    from builder.serving.server import ServerSettings
    from builder.cli.args import field_default

    p.add_argument("--workdir", default=field_default(ServerSettings, "workdir"),
                   help="the server's folder: its copy, log and pid file")
