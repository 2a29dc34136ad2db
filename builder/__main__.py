"""`python -m builder`: build, check and serve a Triton model repository.

Subcommands:
  repo    export a timm Swin and write a complete model repository
  export  export and validate the ONNX file alone (plus reference data for plans)
  quantize  INT8 Q/DQ ONNX with NVIDIA ModelOpt (explicit quantization for TensorRT >= 10)
  check   report what tritonserver would reject in a repository
  docker  render docker/ (Dockerfiles, compose) for the pinned NGC release
  monitoring  write a repository's Prometheus rules, scrape config and Grafana dashboard again
  serve   run the local tritonserver (pip-distributed, no Docker)
  stop    stop a server started with `serve --detach`

Heavy imports happen inside the subcommands so `--help` is instant.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import List, Optional
import os
from pathlib import Path

from builder.cli.parser import build_parser, given_options
from builder.errors import BuilderError

log = logging.getLogger("builder")


def _cmd_repo(args) -> int:
    from builder import settings as s
    from builder.cli.args import field_default, model_source, parity
    from builder.repository.writer import build_repository

    _refuse_options_that_do_not_apply(args)
    _gpu_photo_path_setup(args)
    flavor = args.flavor or _existing_flavor(args.output, args.add_version) or "container"
    preprocess = s.default_preprocess_instances(args.preprocess, args.preprocess_instance_kind,
                                                args.preprocess_instances)
    # Not given: provisional until the engine is settled (the build then places it where the engine runs).
    kind = args.instance_kind or s.classifier_kind(flavor, args.engine, preprocess, None, args.gpus)
    queue = (args.max_queue_size, args.queue_timeout_us, args.priority_levels)
    settings = s.RepoSettings(
        source=model_source(args),
        output=args.output, flavor=flavor, name=args.name, opset=args.opset,
        classifier_batching=s.Batching(args.max_batch_size, args.preferred_batch_sizes, args.max_queue_delay_us,
                                       *queue),
        preprocess_batching=s.Batching(args.preprocess_max_batch_size or args.max_batch_size, (),
                                       args.max_queue_delay_us, *queue),
        classifier_instances=s.InstanceGroup(kind, args.instance_count, args.gpus),
        preprocess_instances=preprocess,
        preprocess=args.preprocess, engine=args.engine, torch_compile=args.torch_compile,
        gpu_photo_path=args.gpu_photo_path, gpu_decoder=args.gpu_decoder,
        hybrid_local_batch=args.hybrid_local_batch,
        inductor_precision=args.inductor_precision or "auto", window_attention=args.window_attention,
        compile_timeout_s=args.compile_timeout_s,
        onnxruntime_tensorrt=args.onnxruntime_tensorrt, response_cache=args.response_cache,
        parity=parity(args, field_default(s.RepoSettings, "parity")),
        version=args.version, version_policy=s.VersionPolicy.parse(args.version_policy),
        plan=args.plan, cuda_graphs=args.cuda_graphs, place_classifier_by_engine=args.instance_kind is None,
        photo_setup=_photo_setup(args),
    )
    build_repository(settings, add_version=args.add_version, overrides=args.given)
    return 0


def _photo_setup(args):
    """What the build measures for a GPU photo path: a value given by hand is the only one of its dimension."""
    from builder import settings as s

    grid = s.PhotoSetup()
    batches = tuple(b for b in grid.batches if b <= args.max_batch_size) or (args.max_batch_size,)
    return dataclasses.replace(
        grid, mode=args.photo_setup, budget_ms=args.photo_batch_budget_ms,
        processes=(args.preprocess_instances,) if "preprocess_instances" in args.given else grid.processes,
        batches=(args.preprocess_max_batch_size,) if "preprocess_max_batch_size" in args.given else batches)


_INDUCTOR = (lambda a: a.engine in ("inductor", "auto"), "the inductor engine", "--engine inductor (or auto)")
_GPU_PREPROCESS = (lambda a: a.preprocess == "gpu", "the gpu preprocessing", "--preprocess gpu")
# builder repo options that only some engines or preprocessings read: (applies, to what, the flag that makes it).
_APPLIES_TO = {
    "inductor_precision": _INDUCTOR, "window_attention": _INDUCTOR, "torch_compile": _INDUCTOR,
    "compile_timeout_s": _INDUCTOR,
    "gpu_photo_path": _GPU_PREPROCESS, "gpu_decoder": _GPU_PREPROCESS, "photo_setup": _GPU_PREPROCESS,
    "photo_batch_budget_ms": _GPU_PREPROCESS,
    "hybrid_local_batch": (lambda a: a.preprocess == "gpu" and a.gpu_photo_path in ("hybrid", "auto"),
                           "the hybrid photo path", "--preprocess gpu --gpu-photo-path hybrid (or auto)"),
    "cuda_graphs": (lambda a: bool(a.plan), "a TensorRT plan served natively", "--plan (container flavor)"),
}


def _refuse_options_that_do_not_apply(args) -> None:
    """An option given for an engine or preprocessing that was not chosen is a mistake, not a no-op: refused."""
    for dest in sorted(args.given & set(_APPLIES_TO)):
        applies, what, flag = _APPLIES_TO[dest]
        if not applies(args):
            option = "--" + dest.replace("_", "-")
            chosen = f"--engine {args.engine}, --preprocess {args.preprocess}" + (
                f", --gpu-photo-path {args.gpu_photo_path}" if args.preprocess == "gpu" else "")
            raise BuilderError(f"{dest}: {option} applies to {what}, which this build does not use ({chosen}); "
                               f"drop {option}, or pass {flag}")


def _gpu_photo_path_setup(args) -> None:
    """A GPU photo path gets the measured setup (`settings.GPU_PHOTO_PATH_SETUP`) for every option not given."""
    from builder.settings import GPU_PHOTO_PATH_SETUP

    if args.preprocess != "gpu" or args.preprocess_instance_kind not in (None, "KIND_GPU"):
        return
    taken = {dest: value for dest, value in GPU_PHOTO_PATH_SETUP.items() if dest not in args.given}
    largest = taken.get("max_batch_size", args.max_batch_size)  # a batch limit given bounds the setup's sizes
    if "preferred_batch_sizes" in taken:
        taken["preferred_batch_sizes"] = tuple(b for b in taken["preferred_batch_sizes"] if b <= largest)
    if "preprocess_max_batch_size" in taken:
        taken["preprocess_max_batch_size"] = min(taken["preprocess_max_batch_size"], largest)
    for dest, value in taken.items():
        setattr(args, dest, value)
    if taken:
        shown = {dest: ",".join(map(str, v)) if isinstance(v, tuple) else v for dest, v in taken.items()}
        log.info("GPU photo path setup (measured on H100/H200; an option given wins): %s",
                 ", ".join(f"--{dest.replace('_', '-')} {value}" for dest, value in shown.items()))


def _existing_flavor(output: str, add_version: bool):
    """The flavor of the repository already at `output` (kept unless --flavor is given), or None."""
    from builder.repository.output import is_our_repository
    from builder.core.manifest import read_manifest

    if not (add_version or is_our_repository(Path(output))):
        return None
    flavor = read_manifest(Path(output)).get("flavor")
    if flavor:
        log.info("keeping %s's %s flavor (pass --flavor to change it)", output, flavor)
    return flavor


def _cmd_export(args) -> int:
    from builder import settings as s
    from builder.cli.args import field_default, model_source, parity
    from builder.export.onnx_export import export_onnx, reference_data, validate_onnx
    from builder.export.model import load_model
    from builder.core.contract import Contract

    if (args.reference or args.calibration) and not (args.images or args.noise):
        raise BuilderError("images: --reference and --calibration need --images DIR (real photos), or --noise "
                           "to use random data on purpose")
    if (args.images or args.noise) and not (args.reference or args.calibration):
        raise BuilderError("images: --images/--noise feed --reference or --calibration; pass one of them too")
    if args.images and not Path(args.images).exists():
        raise BuilderError(f"images: {args.images} does not exist; pass a folder of photos")
    if args.reference_batch < 1:
        raise BuilderError(f"reference_batch: is {args.reference_batch}; use 1 or more")
    for option, path in (("output", args.output), ("reference", args.reference), ("calibration", args.calibration)):
        _writable(option, path)
    source = model_source(args)
    model = load_model(source)
    _, height, width = model.data_config["input_size"]
    contract = Contract(source.model_name, (int(height), int(width)), model.num_classes)
    path = export_onnx(model, contract, Path(args.output), args.opset)
    validate_onnx(path, model, contract, parity(args, field_default(s.RepoSettings, "parity")))
    if args.reference or args.calibration:
        reference_data(model, contract, None if args.noise else args.images, args.reference_batch,
                       args.reference, args.calibration)
    return 0


def _writable(option: str, path) -> None:
    """Fails fast (before any model loads) on an output file that cannot be written."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise BuilderError(f"{option}: {path} is a folder; pass a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuilderError(f"{option}: cannot create {target.parent} ({exc.strerror or exc}); "
                           "pass a path in a folder you can write") from None
    if not os.access(target.parent, os.W_OK):
        raise BuilderError(f"{option}: {target.parent} is not writable; pass a path in a folder you can write")


def _existing_file(option: str, path: str, kind: str) -> None:
    if not os.path.isfile(path):
        raise BuilderError(f"{option}: {path} does not exist; pass {kind}")


def _cmd_quantize(args) -> int:
    _existing_file("onnx", args.onnx, "the model.onnx to quantize (builder export writes one)")
    _existing_file("calibration", args.calibration, "the .npy that `builder export --calibration` writes")
    if args.reference:
        _existing_file("reference", args.reference, "the .npz that `builder export --reference` writes")
    _writable("output", args.output)

    if Path(args.output).resolve() == Path(args.onnx).resolve():
        raise BuilderError(f"output: {args.output} is the --onnx model itself; the FP32 export would be "
                           "overwritten: pass another path, e.g. model_int8.onnx")
    import numpy as np

    from builder import settings as settings_module
    from builder.cli.args import parity
    from builder.engines.quantize import count_qdq, quantize_int8, validate_quantized

    try:
        calibration = np.load(args.calibration)
    except (ValueError, OSError) as exc:
        raise BuilderError(f"calibration: {args.calibration} is not a .npy array ({exc}); "
                           "write one with `builder export --calibration`") from None
    try:
        import onnx

        graph = onnx.load(args.onnx, load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError: not an ONNX file, or a truncated one
        raise BuilderError(f"onnx: {args.onnx} is not a readable ONNX model ({type(exc).__name__}); "
                           "pass the model.onnx that `builder export` writes") from None
    _fits_the_input("calibration", args.calibration, graph, calibration)
    reference = _reference(args, graph) if args.reference else None  # checked before the quantization runs
    output = quantize_int8(args.onnx, calibration, args.output, args.high_precision)
    print(f"{output}: {count_qdq(output)} QuantizeLinear nodes")
    if reference is not None:
        figures = validate_quantized(output, reference, parity(args, settings_module.LOW_PRECISION_PARITY))
        print(figures)
    return 0


def _fits_the_input(option: str, path: str, graph, images) -> None:
    """Images (calibration, reference) must have the ONNX input's shape (batch aside), checked before ModelOpt."""
    initializers = {i.name for i in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    if not inputs:
        return
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    shape = list(images.shape)
    if len(shape) != len(dims) or any(d is not None and d != c for d, c in zip(dims[1:], shape[1:])):
        raise BuilderError(f"{option}: {path} holds images of shape {shape[1:]}, the ONNX input "
                           f"{inputs[0].name!r} takes {['N' if d is None else d for d in dims][1:]}; write them "
                           f"for this model with `builder export --{option}`")


def _reference(args, graph) -> dict:
    """quantize's --reference (inputs and PyTorch logits, `builder export --reference`), checked whole."""
    import numpy as np

    try:
        with np.load(args.reference) as data:
            reference = {key: data[key] for key in ("inputs", "logits")}
    except (ValueError, OSError, KeyError, AttributeError) as exc:
        raise BuilderError(f"reference: {args.reference} is not the .npz of inputs and logits that `builder "
                           f"export --reference` writes ({type(exc).__name__}: {exc})") from None
    _fits_the_input("reference", args.reference, graph, reference["inputs"])
    if len(reference["logits"]) != len(reference["inputs"]):
        raise BuilderError(f"reference: {args.reference} holds {len(reference['inputs'])} inputs but "
                           f"{len(reference['logits'])} rows of logits; write it again with `builder export "
                           "--reference`")
    return reference


def _cmd_docker(args) -> int:
    from builder.serving import docker
    from builder.serving.pod import PodSettings
    from builder.settings import check_model_name

    check_model_name("model", args.model)

    pod = PodSettings(args.gpus_per_pod, args.min_gpus, args.max_gpus, args.cpus_per_gpu, args.memory_gib_per_gpu,
                      args.cuda_memory_pool_mb)
    for path in docker.write(Path(args.output), docker.context(args.model, args.precision, pod)):
        print(path)
    return 0


def _cmd_monitoring(args) -> int:
    from builder.core.manifest import read_manifest
    from builder.repository import monitoring as M
    from builder.repository.monitoring_files import monitoring_dir, render, write_monitoring

    settings = M.MonitoringSettings(args.target, args.scrape_interval_s, args.rate_window, args.queue_budget_ms,
                                    args.failure_ratio, args.alert_after)
    manifest = read_manifest(Path(args.repository))
    folder = Path(args.output) if args.output else monitoring_dir(Path(args.repository))
    print(write_monitoring(folder, render(manifest["contract"], settings), settings))
    return 0


def _cmd_check(args) -> int:
    from builder.repository.check import check_repository, needs_torch

    if args.needs_torch:
        print(int(needs_torch(args.repository)))
        return 0
    problems = check_repository(args.repository)
    for problem in problems:
        print(f"error: {problem}")
    if problems:
        print(f"{args.repository}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.repository}: OK")
    return 0


def _server(args):
    from builder.core.mps import host_gpus
    from builder.serving import gpus
    from builder.serving.server import LocalServer, ServerSettings, admin_key

    pools: List[str] = []
    if args.command == "serve":
        host = host_gpus()
        problem = gpus.placement_problem(args.repository, host)
        if problem:  # in one line now, not a model that fails to load deep in the server log
            raise BuilderError(f"gpus: {problem}")
        pools = gpus.memory_pool_args(args.cuda_memory_pool_mb, host)
    # Model control is always locked behind the admin key ($TRITON_ADMIN_KEY or one made in the workdir).
    key = admin_key(args.workdir, create=True) if args.command == "serve" else None
    return LocalServer(ServerSettings(
        repository=args.repository, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, workdir=args.workdir,
        model_control=getattr(args, "model_control", "none"), poll_seconds=getattr(args, "poll_seconds", 2),
        admin_key=key, mps=_serve_with_mps(args), metrics=getattr(args, "metrics", "counters"), extra_args=tuple(
            pools + ([f"--cache-config=local,size={args.cache_mb << 20}"] if getattr(args, "cache_mb", 0) else []))))


def _cmd_serve(args) -> int:
    from builder.repository.check import check_repository

    if Path(args.repository).is_dir():  # refused in words before the server prints its log for the same cause
        problems = check_repository(args.repository)
        if problems:
            said = "; ".join(p.rstrip(".") for p in problems)
            raise BuilderError(f"{args.repository} would not load: {said}; fix that (`builder check` lists each "
                               "problem) or rebuild it with `make repo FLAVOR=local`")
    server = _server(args)
    if args.detach:
        server.start(wait=True, timeout=args.timeout, detach=True)
        print(f"tritonserver running (pid {server.process.pid}): HTTP {server.http_url}, gRPC {server.grpc_url}; "
              f"log {server.log_path}; stop with `make stop`")
        return 0
    # In the foreground, Ctrl-C or SIGTERM is how the server is meant to end, also while it is starting (start()
    # then takes it down before it returns): stopped, exit 0.
    try:
        server.start(wait=True, timeout=args.timeout)
        print(f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}; Ctrl-C stops it")
        code = server.process.wait()
    except KeyboardInterrupt:
        server.stop()
        print("tritonserver stopped", file=sys.stderr)
        return 0
    raise BuilderError(f"tritonserver exited with code {code}; log {server.log_path}:\n{server.log_tail()}")


def _serve_with_mps(args) -> bool:
    """--mps or --no-mps as given, else as the build chose (manifest.json's serve.mps)."""
    if getattr(args, "mps", None) is not None or args.command != "serve":
        return bool(getattr(args, "mps", False))

    from builder.core.manifest import read_manifest

    try:
        chosen = bool((read_manifest(Path(args.repository)).get("serve") or {}).get("mps"))
    except BuilderError:  # not a repository of this tool: nothing chosen
        return False
    if chosen:
        log.info("serving under CUDA MPS, as the build chose for its GPU photo path (--no-mps, make serve MPS=0: "
                 "without)")
    return chosen


def _cmd_stop(args) -> int:
    from builder.serving.server import LocalServer, ServerSettings

    server = LocalServer(ServerSettings(workdir=args.workdir))
    if not server.running_pid():
        ended = server.end_leftovers()  # a killed server's stubs and MPS daemon
        print(f"no tritonserver is running from {server.workdir}"
              + (f" (ended {ended} model process(es) its server left)" if ended else ""))
        return 0
    server.stop()
    print("tritonserver stopped")
    return 0


COMMANDS = {"quantize": _cmd_quantize, "docker": _cmd_docker, "monitoring": _cmd_monitoring, "export": _cmd_export, "repo": _cmd_repo, "check": _cmd_check, "serve": _cmd_serve, "stop": _cmd_stop}


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the CLI; user errors print one line and return 1."""
    from builder.core.interrupt import sigterm_interrupts

    args = build_parser().parse_args(argv)
    args.given = given_options(argv) if args.command == "repo" else frozenset()  # only repo reads it
    sigterm_interrupts()  # a killed build removes its staging folder, a foreground server stops
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return COMMANDS[args.command](args)
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = "; the previous repository is untouched" if args.command == "repo" else ""
        print(f"interrupted{kept}", file=sys.stderr)
        return 130


def _run() -> int:
    """`main`, and 130 for an interrupt that lands while `main` reports the first one (a second SIGTERM or
    Ctrl-C): an interrupted command ends with 130 and its one line, never a KeyboardInterrupt out of the module
    (which makes Python end by SIGINT, -2)."""
    try:
        return main()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_run())
