"""`python -m perf`: benchmarks for the served model and the bare engine.

Subcommands:
  sweep    perf_analyzer over a grid of models, concurrency, batch, protocol, shared memory
  report   markdown table + PNG plots of a sweep (with serving efficiency vs a bare run)
  compare  ratios between two sweeps
  tails    PNG of the latency tails of sweeps run with --request-count
  tune     search instance count / queue delay / batch sizes by live model reloads
  bare     the classifier run directly (PyTorch, ONNX Runtime, TensorRT)
  preprocess the preprocessings run directly (gpu; exact and draft on the CPU)
  first-request  first-request latency after a model load, with and without warm-up
  analyze  Triton's Model Analyzer on the repository, with the local tritonserver

Heavy imports happen inside the subcommands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional
from pathlib import Path

from builder.core import contract as C
from perf.environment import bundled_photos


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _counts(text: str) -> List[int]:
    """A comma list of integers >= 1 (batch sizes, concurrencies, instance counts)."""
    values = _ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use integers of 1 or more, e.g. 1,8,32")
    return values


def _at_least(minimum: int):
    """An argparse type: one integer >= `minimum` (1 for iterations and repeats, 0 for warm-up rounds)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: use {minimum} or more")
        return value
    return parse


_count, _natural = _at_least(1), _at_least(0)


CPU_PREPROCESSINGS = ("exact", "draft")
DECODERS = ("auto", "nvimgcodec", "torchvision", "none")


def _choices(allowed):
    """A comma list whose every word is one of `allowed`."""
    def parse(text: str) -> List[str]:
        words = _words(text)
        unknown = [w for w in words if w not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)} unknown; use a comma list of {', '.join(allowed)}")
        return words
    return parse


def _words(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


ENGINES = ("torch", "onnxruntime", "tensorrt", "program")


def _bare_inputs(args):
    """Resolves the ONNX file and timm model from the repository when they are not given."""
    from builder.errors import BuilderError

    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or not args.engines:
        raise BuilderError(f"engines: {', '.join(unknown) or 'none'} unknown; use a comma list of {', '.join(ENGINES)}")
    if "tensorrt" in args.engines and not args.plans:
        raise BuilderError("plans: the tensorrt engine needs --plans model.plan[,other.plan]")
    for plan in args.plans:
        if not Path(plan).is_file():
            raise BuilderError(f"plans: {plan} does not exist; build one with `python -m builder.engines.trt build`")
    from builder.core.manifest import MANIFEST, read_manifest

    manifest = {}
    repository = Path(args.repository)
    if (repository / MANIFEST).is_file():

        manifest = read_manifest(repository)
    model, kwargs = args.model, args.model_kwargs
    if model is None:
        model = manifest.get("model", {}).get("timm_name", C.DEFAULT_MODEL)
        kwargs = kwargs or json.dumps(manifest.get("model", {}).get("kwargs", {}))
    onnx = args.onnx
    if "onnxruntime" in args.engines and onnx is None:
        if not manifest:
            raise BuilderError(f"onnx: no --onnx given and {repository} is not a model repository; run `make repo` "
                               "or pass --onnx model.onnx")
        from builder.core.manifest import manifest_contract

        classifier = manifest_contract(manifest).classifier
        onnx = str(repository / classifier / str(manifest["model_version"]) / "model.onnx")
    if onnx is not None and not Path(onnx).is_file():
        raise BuilderError(f"onnx: {onnx} does not exist; pass the model.onnx to time")
    try:
        kwargs = json.loads(kwargs or "{}")
    except json.JSONDecodeError as exc:
        raise BuilderError(f"model_kwargs: not valid JSON ({exc.msg})") from None
    return model, kwargs, onnx


def _served_program(repository: str, compile_mode, tuning=None):
    """The repository's torch-engine classifier: version folder, config parameters, max batch."""
    from builder.repository import configs
    from builder.errors import BuilderError
    from builder.core.manifest import manifest_contract, read_manifest

    manifest = read_manifest(Path(repository))
    classifier = Path(repository) / manifest_contract(manifest).classifier
    version_dir = classifier / str(manifest["model_version"])
    if not (version_dir / "model.pt2").is_file():
        raise BuilderError(f"engines: {repository} has no inductor-engine classifier; build it with --engine inductor")
    config = configs.read(classifier / "config.pbtxt")
    params = configs.parameters(config)
    if compile_mode:
        params["compile"] = compile_mode
    if tuning:
        params["inductor_tuning"] = tuning
    return str(version_dir), params, config.max_batch_size


def _cmd_bare(args) -> int:
    from perf import bare
    from perf.environment import describe, write_json

    model, kwargs, onnx = _bare_inputs(args)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if "torch" in args.engines:
        rows += bare.bench_torch(model, kwargs, args.batches, device, args.warmup, args.iterations, args.compile)
    if "onnxruntime" in args.engines:
        rows += bare.bench_onnxruntime(onnx, args.batches, args.warmup, args.iterations)
    if "tensorrt" in args.engines:
        for plan in args.plans:
            rows += bare.bench_tensorrt(plan, args.batches, args.warmup, args.iterations)
    if "program" in args.engines:
        version_dir, params, max_batch = _served_program(args.repository, args.compile_mode, args.inductor_tuning)
        rows += bare.bench_program(version_dir, params, max_batch, args.batches, device, args.warmup,
                                   args.iterations)
    payload = {"kind": "bare", "environment": describe({"model": model, "model_kwargs": kwargs, "onnx": onnx,
                                                        "device": device}),
               "results": rows}
    print(write_json(args.output, payload))
    return 0


def _cmd_preprocess(args) -> int:
    from builder.errors import BuilderError
    from builder.core.imaging import PreprocessParams
    from perf.environment import describe, image_paths, write_json
    from perf.preprocess import bench_gpu

    from builder.core.manifest import MANIFEST

    images = image_paths(args.images)
    manifest = Path(args.repository) / MANIFEST
    if not manifest.is_file():
        raise BuilderError(f"repository: {args.repository} has no manifest.json; run `make repo` or pass --repository")
    params = PreprocessParams.from_parameters(json.loads(manifest.read_text())["preprocess"])
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    decoders = [d for d in args.decoders if d != "none"]
    rows = bench_gpu(images, params, args.batches, device, decoders, args.warmup, args.iterations)
    if args.cpu:
        from perf.preprocess import bench_cpu

        rows += bench_cpu(images, params, args.batches, args.cpu, args.threads, args.warmup, args.iterations)
    payload = {"kind": "preprocess", "environment": describe({"images": [str(p) for p in images], "device": device}),
               "results": rows}
    print(write_json(args.output, payload))
    return 0


def _cmd_first_request(args) -> int:
    from builder.core.manifest import read_manifest
    from perf.environment import describe, image_paths, write_json
    from perf.first_request import measure

    manifest = read_manifest(Path(args.repository))
    images = [p.read_bytes() for p in image_paths(args.images)]
    rows = []
    try:
        for warmup in (False, True):
            for _ in range(args.repeat):
                rows.append(measure(args.repository, images, manifest["contract"]["ensemble"], warmup))
                print(json.dumps(rows[-1]), flush=True)
    except KeyboardInterrupt:  # the server of the run in progress was stopped and its copy removed on the way out
        payload = {"kind": "first_request", "interrupted": True, "results": rows,
                   "environment": describe({"repository": manifest["settings"]})}
        print(write_json(args.output, payload))
        raise
    payload = {"kind": "first_request", "environment": describe({"repository": manifest["settings"]}),
               "results": rows}
    print(write_json(args.output, payload))
    return 0


def _cmd_analyze(args) -> int:
    from builder.core.manifest import read_manifest
    from builder.serving.server import LocalServer, ServerSettings, free_ports
    from perf.analyze import SearchSettings, analyzer_config, best_configs, has_gpu, run_analyzer
    from perf.environment import image_paths, write_json

    repository = Path(args.repository).resolve()
    names = read_manifest(repository)["contract"]["models"]  # preprocess, classifier, postprocess, ensemble
    chosen = {"classifier": names[1], "preprocess": names[0], "ensemble": names[3]}
    unknown = [m for m in args.models if m not in chosen and m not in names]
    if unknown or not args.models:
        from builder.errors import BuilderError

        raise BuilderError(f"models: {', '.join(unknown) or 'none given'} not in {repository}; use classifier, "
                           f"preprocess, ensemble or a model name ({', '.join(names)})")
    models = [chosen.get(m, m) for m in args.models]
    workdir = Path(args.output).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    images = [str(p) for p in image_paths(args.images)] if names[3] in models or names[0] in models else []
    gpu = has_gpu()
    ports = free_ports(3)  # not the defaults a running server may hold
    search = SearchSettings(args.search, args.max_instances, args.min_concurrency, args.max_concurrency,
                            args.min_batch, args.max_batch, args.measurement_interval_ms)
    config = analyzer_config(repository, models, workdir, images, search, ports, gpu,
                             composing=[names[0], names[1], names[2]] if names[3] in models else ())
    # The server the analyzer works against: ours, explicit model control, every model loaded, no admin key
    # (its ports are private to this run and only the analyzer talks to it).
    server = ServerSettings(str(repository), *ports, workdir=str(workdir / "server"), model_control="explicit")
    logging.getLogger("perf").info("starting tritonserver for Model Analyzer (%s instances)",
                                   "KIND_GPU" if gpu else "KIND_CPU")
    with LocalServer(server):
        reports = run_analyzer(args.analyzer, config, workdir)
    rows = best_configs(reports)
    print(write_json(str(workdir / "best.json"), {"kind": "model_analyzer", "models": models, "gpu": gpu,
                                                  "results": rows}))
    for row in rows[:5]:
        print(json.dumps(row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser: one function per command, the sweep's in `perf.cli_sweep`."""
    from perf import cli_sweep

    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_bare, _add_preprocess, _add_first_request, _add_analyze):
        add(sub)
    cli_sweep.add_commands(sub, _counts, _words, _ints)
    return parser


def _add_bare(sub) -> None:
    from builder.engines.torch_runner import TUNINGS  # a light module: torch loads when an engine starts

    b = sub.add_parser("bare", help="time the classifier without a server")
    b.add_argument("--engines", type=_words, default=["onnxruntime"],
                   help="torch,onnxruntime,tensorrt,program (the repository's inductor engine as served)")
    b.add_argument("--repository", default="model_repository",
                   help="where the ONNX file and timm model come from when --onnx/--model are not given")
    b.add_argument("--model", default=None, help="timm model for the torch engine (default: the repository's)")
    b.add_argument("--model-kwargs", default=None)
    b.add_argument("--onnx", default=None, help="default: the repository's classifier model.onnx")
    b.add_argument("--plans", type=_words, default=[])
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    b.add_argument("--compile", action="store_true", help="also torch.compile FP16")
    b.add_argument("--compile-mode", default=None, choices=("none", "default", "reduce-overhead"),
                   help="program engine: override the repository's torch compile mode")
    b.add_argument("--inductor-tuning", default=None, choices=tuple(TUNINGS),
                   help="program engine: TorchInductor's kernel tuning (a candidate; the repository's by default)")
    b.add_argument("--batches", type=_counts, default=[1, 8, 32])
    b.add_argument("--warmup", type=_natural, default=10)
    b.add_argument("--iterations", type=_count, default=50)
    b.add_argument("--output", default="perf/results/local-bare.json")
    b.set_defaults(func=_cmd_bare, output_kind="file")


def _add_preprocess(sub) -> None:
    g = sub.add_parser("preprocess", help="time the preprocessings alone (no server): gpu, and exact/draft on the CPU")
    g.add_argument("--images", type=_words, default=[bundled_photos()], help="image files or folders")
    g.add_argument("--repository", default="model_repository", help="its manifest gives the transform")
    g.add_argument("--batches", type=_counts, default=[1, 64, 256])
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--decoders", type=_choices(DECODERS), default=["auto"],
                   help="the gpu preprocessing's decoders: auto,nvimgcodec,torchvision, or none")
    g.add_argument("--cpu", type=_choices(CPU_PREPROCESSINGS), default=[],
                   help="CPU preprocessings to time too: exact,draft")
    g.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads of the CPU preprocessings (the preprocess model's default: min(8, cores))")
    g.add_argument("--warmup", type=_natural, default=3)
    g.add_argument("--iterations", type=_count, default=10)
    g.add_argument("--output", default="perf/results/local-preprocess.json")
    g.set_defaults(func=_cmd_preprocess, output_kind="file")


def _add_first_request(sub) -> None:
    f = sub.add_parser("first-request", help="first-request latency after a load, with and without warm-up")
    f.add_argument("--repository", default="model_repository")
    f.add_argument("--images", type=_words, default=[bundled_photos()])
    f.add_argument("--repeat", type=_count, default=1)
    f.add_argument("--output", default="perf/results/local-first-request.json")
    f.set_defaults(func=_cmd_first_request, output_kind="file")


def _add_analyze(sub) -> None:
    a = sub.add_parser("analyze", help="Triton's Model Analyzer on the repository (local tritonserver)")
    a.add_argument("--repository", default="model_repository")
    a.add_argument("--models", type=_words, default=["classifier"], help="classifier,preprocess,ensemble or names")
    a.add_argument("--analyzer", default=".venv-analyzer/bin/model-analyzer")
    a.add_argument("--images", type=_words, default=[bundled_photos()])
    a.add_argument("--search", choices=("brute", "quick"), default="brute", help="(the ensemble always uses quick)")
    a.add_argument("--max-instances", type=int, default=2)
    a.add_argument("--min-concurrency", type=int, default=1)
    a.add_argument("--max-concurrency", type=int, default=16)
    a.add_argument("--measurement-interval-ms", type=int, default=2000, help="perf_analyzer's time window")
    a.add_argument("--min-batch", type=int, default=1, help="smallest max_batch_size searched")
    a.add_argument("--max-batch", type=int, default=8, help="largest max_batch_size searched")
    a.add_argument("--output", default="perf/results/local-analyze")
    a.set_defaults(func=_cmd_analyze, output_kind="folder")


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the CLI; user errors print one line and return 1."""
    from builder.core.interrupt import sigterm_interrupts
    from builder.errors import BuilderError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # SIGTERM (a kill, a CI timeout) ends a run as Ctrl-C does: servers stopped, temp folders removed, rows kept.
    sigterm_interrupts()
    try:
        if getattr(args, "output_kind", None) and getattr(args, "output", None):
            from perf.environment import check_output

            check_output(args.output, folder=args.output_kind == "folder")
        return args.func(args)
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The interrupt may have landed inside a constructor (a gRPC client's): the half-built object's __del__
        # then fails when it is collected, and Python prints that traceback. The run is over; one line says so.
        sys.unraisablehook = lambda unraisable: None
        print("interrupted: the finished results were written, nothing is left running", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
