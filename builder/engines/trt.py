"""TensorRT plans from the exported ONNX: build, validate, time, inspect, on NVIDIA's Polygraphy.

Plans must be built where the serving TensorRT lives (NVIDIA's TensorRT
container of the tritonserver release, which ships Polygraphy, or a TensorRT
8.6 wheel with polygraphy on Python 3.9), so this module imports only the
standard library, numpy, tensorrt and polygraphy (plus the project's
numpy-only `builder.compare`), and runs on Python >= 3.9. Polygraphy's
TensorRT backend does the version-dependent work: the network from ONNX
(explicit batch before TensorRT 10, strongly typed for Q/DQ models in 10+),
the builder config (precisions, profile, workspace, optimization level,
timing cache, tactic sources, INT8 calibration), engine building and loading,
device memory, and the runner. The few flags that TensorRT 11 removes
(weakly-typed FP16/INT8, implicit calibration) are detected here by name so
that the error says what to do instead. Running and timing plans is in
`builder.engines.plan_runner`.

    python -m builder.engines.trt build --onnx model.onnx --plan model.plan --precision fp16 --max-batch 32
    python -m builder.engines.trt validate --plan model.plan --reference reference.npz
    python -m builder.engines.trt time --plan model.plan --batches 1,8,32 --json timings.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple
import re

import numpy as np

from builder.cli.args import add_parity_args, ints
from builder.compare import Thresholds, gate
from builder.engines.plan_check import sha256
from builder.engines.plan_runner import PlanRunner, load_engine, polygraphy_errors, tensorrt_module
from builder.errors import BuilderError
from builder.settings import LOW_PRECISION_PARITY, TENSORRT_PRECISIONS
from builder.timing import timing_batches

log = logging.getLogger("builder.engines.trt")
PRECISIONS = TENSORRT_PRECISIONS


def trt_major() -> int:
    """Major version of the installed TensorRT."""
    return int(tensorrt_module().__version__.split(".")[0])


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
    return tuple(timing_batches(preferred, largest))




def _onnx_has_qdq(path: str) -> bool:
    # Cheap scan for QuantizeLinear op names in the protobuf bytes: no onnx import needed.
    with open(path, "rb") as f:
        return b"QuantizeLinear" in f.read()


def _precision_flags(trt, precision: str, qdq: bool, calibration: Optional[str]) -> Dict[str, bool]:
    """CreateConfig's precision arguments, or an error saying what this TensorRT needs instead.

    Polygraphy would only warn and build something else where TensorRT lacks a
    flag; here a missing flag is an error that names the way out.
    """
    weakly_typed = hasattr(trt.BuilderFlag, "FP16")  # gone in TensorRT 11: precision comes from the ONNX types
    if precision == "fp32":
        return {"tf32": False}  # strict FP32: Polygraphy clears TF32, which TensorRT enables by default
    if precision == "tf32":
        return {"tf32": True}
    if not weakly_typed:
        raise BuilderError(f"TensorRT {trt.__version__} removed weakly-typed {precision.upper()}; export an FP16 "
                           "ONNX (or a ModelOpt-quantized one) and build it strongly typed")
    if precision == "fp16":
        return {"fp16": True}
    if precision == "fp8" and (trt_major() < 10 or not hasattr(trt.BuilderFlag, "FP8")):
        raise BuilderError(f"fp8 needs TensorRT >= 10 (this is {trt.__version__}) and an FP8 Q/DQ ONNX")
    if not qdq:
        if precision == "fp8" or not calibration:
            raise BuilderError(f"{precision}: the ONNX has no Q/DQ nodes; quantize it with ModelOpt "
                               "(explicit, preferred) or pass --calibration images.npy (implicit INT8, TensorRT < 11)")
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise BuilderError(f"TensorRT {trt.__version__} has no implicit INT8 calibration; quantize the ONNX "
                               "with NVIDIA ModelOpt (explicit Q/DQ) and build that instead")
    return {"fp16": True, precision: True}  # layers left unquantized may run in FP16


def _calibration(options: PlanOptions, shape: Tuple[int, ...]):
    """Polygraphy's entropy calibrator over the images, and a config step that sets its fixed-batch profile.

    Polygraphy calibrates at the serving profile's opt batch; a profile of its
    own lets a short image file (fewer images than opt) still calibrate.
    """
    from polygraphy.backend.trt import Calibrator, PostprocessConfig, Profile
    from polygraphy.backend.trt import util as trt_util

    images = np.load(options.calibration).astype(np.float32)
    batch = min(len(images), options.opt_batch or options.max_batch, 32)
    batches = [{options.input_name: images[i:i + batch]} for i in range(0, len(images) - batch + 1, batch)]
    calibrator = Calibrator(batches, cache=options.plan + ".calib")
    fixed = (batch, *shape)

    def set_profile(builder, network, config):
        profile = Profile().add(options.input_name, min=fixed, opt=fixed, max=fixed)
        config.set_calibration_profile(profile.to_trt(builder, network))
        trt_util.try_setup_polygraphy_calibrator(config, network)  # the calibrator checks batches against it

    return calibrator, lambda config: PostprocessConfig(config, set_profile)


def build_plan(options: PlanOptions) -> Dict:
    """Builds a plan and writes it with its sidecars.

    Args:
        options: What to build.

    Returns:
        The sidecar dict (also written as `plan.json` beside the plan).

    Raises:
        BuilderError: Parse failure, unsupported precision, failed build.
    """
    trt = tensorrt_module()
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath

    qdq = _onnx_has_qdq(options.onnx)
    flags = _precision_flags(trt, options.precision, qdq, options.calibration)
    # A Q/DQ model on a TensorRT without weakly-typed flags must be built strongly typed.
    strongly_typed = qdq and not hasattr(trt.BuilderFlag, "FP16")
    try:
        network = NetworkFromOnnxPath(options.onnx, strongly_typed=strongly_typed)()  # (builder, network, parser)
    except polygraphy_errors() as exc:
        raise BuilderError(f"TensorRT could not parse {options.onnx}: {exc}") from None
    shape = tuple(network[1].get_input(0).shape)[1:]
    if any(d < 0 for d in shape):
        raise BuilderError(f"input {options.input_name!r} has dynamic non-batch dims {shape}; export with a fixed size")
    opt = options.opt_batch or options.max_batch
    config = _builder_config(trt, options, flags, qdq, shape, opt)
    log.info("building %s plan from %s (profile %d/%d/%d) with TensorRT %s ...", options.precision, options.onnx,
             options.min_batch, opt, options.max_batch, trt.__version__)
    start = time.perf_counter()
    try:
        serialized = EngineBytesFromNetwork(network, config, save_timing_cache=options.timing_cache)()
    except polygraphy_errors() as exc:
        raise BuilderError(f"TensorRT failed to build the plan: {exc}") from None
    build_s = time.perf_counter() - start
    parity = _write_validated(options, serialized)
    log.info("built %s (%.1f MB) in %.0f s", options.plan, os.path.getsize(options.plan) / 1e6, build_s)
    sidecar = _sidecar(trt, options, qdq, shape, opt, build_s, parity)
    with open(os.path.join(os.path.dirname(os.path.abspath(options.plan)), "plan.json"), "w") as f:
        json.dump(sidecar, f, indent=2)
    return sidecar


def _builder_config(trt, options: PlanOptions, flags: Dict, qdq: bool, shape: tuple, opt: int):
    """Polygraphy's builder-config loader: precision flags, the batch profile, calibration, pools, tactics."""
    from polygraphy.backend.trt import CreateConfig, Profile

    tactics = []
    for name in options.tactic_sources:
        source = getattr(trt.TacticSource, name.upper(), None)
        if source is None:
            raise BuilderError(f"tactic_sources: TensorRT {trt.__version__} has no TacticSource.{name.upper()}")
        tactics.append(source)
    calibrator, with_calibration_profile = (_calibration(options, shape) if flags.get("int8") and not qdq
                                            else (None, lambda config: config))
    return with_calibration_profile(CreateConfig(
        **flags,
        profiles=[Profile().add(options.input_name, min=(options.min_batch, *shape), opt=(opt, *shape),
                                max=(options.max_batch, *shape))],
        calibrator=calibrator,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * (1 << 30))},
        builder_optimization_level=options.opt_level,
        load_timing_cache=options.timing_cache,
        tactic_sources=tactics or None,
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED if options.inspect else None))


def _write_validated(options: PlanOptions, serialized) -> Dict:
    """Writes the plan under a temporary name, gates it against the reference, then renames it into place.

    Returns:
        The parity figures ({} without a reference).
    """
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
    return parity


def _sidecar(trt, options: PlanOptions, qdq: bool, shape: tuple, opt: int, build_s: float, parity: Dict) -> Dict:
    """`plan.json`: how the plan was built, on what, its layers' precisions, parity and timings."""
    layers = inspect_plan(options.plan) if options.inspect else {}
    # Timed here, where the plan was built for this GPU, so `--engine auto` can compare it with engines
    # built in another Python (TensorRT and torch rarely share one).
    with PlanRunner(options.plan) as runner:
        timings = [runner.time(b, warmup=10, iterations=50)
                   for b in (options.timing_batches or sorted({options.min_batch, opt, options.max_batch}))]
    return {
        "tensorrt_version": trt.__version__,
        **gpu_info(),
        "precision": options.precision,
        "explicit_quantization": qdq,
        "profile": {"input": options.input_name, "min": options.min_batch, "opt": opt, "max": options.max_batch,
                    "shape": list(shape)},
        "workspace_gib": options.workspace_gib,
        "opt_level": options.opt_level,
        "build_s": round(build_s, 1),
        "onnx_sha256": sha256(options.onnx),
        "plan_sha256": sha256(options.plan),
        "layer_precisions": layers.get("precisions", {}),
        "parity": parity,
        "timings": timings,
        "calibration_source": _calibration_source(options.calibration),
        "options": asdict(options),
    }


def inspect_plan(plan: str) -> Dict:
    """Writes `<plan>.layers.json` (TensorRT's engine inspector) and counts layer output precisions.

    TensorRT's inspector directly: Polygraphy's `inspect model` prints the same
    information as text, and the sidecar needs it as JSON.
    """
    trt = tensorrt_module()
    engine = load_engine(plan)
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
                kind = next((k for k in ("Int8", "FP8", "Half", "Float", "Int32", "Bool") if k.lower() in fmt.lower()),
                            fmt)
                precisions[kind] = precisions.get(kind, 0) + 1
    return {"precisions": precisions}


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

    Polygraphy's comparator gives the elementwise error statistics (max, mean
    and median absolute and relative error); it has no row-wise cosine or
    top-1 agreement rate, which come from `builder.compare`.

    Args:
        plan: The plan.
        reference: .npz with `inputs` (N,3,H,W) and `logits` (N,C) from PyTorch or ONNX Runtime.
        max_abs, min_cosine, min_top1: Thresholds.

    Returns:
        The comparison figures.

    Raises:
        BuilderError: A threshold is missed.
    """
    from polygraphy.comparator import CompareFunc, IterationResult

    data = np.load(reference)
    with PlanRunner(plan) as runner:
        profile_max = runner.engine.get_tensor_profile_shape(runner.inputs[0], 0)[2][0]
        outputs = [runner(data["inputs"][start:start + profile_max])[runner.outputs[0]].astype(np.float32)
                   for start in range(0, len(data["inputs"]), profile_max)]
    candidate, expected = np.concatenate(outputs), data["logits"].astype(np.float32)
    name = runner.outputs[0]
    stats = CompareFunc.simple(atol=max_abs, rtol=0.0, check_error_stat="max")(
        IterationResult({name: expected}, runner_name="reference"),
        IterationResult({name: candidate}, runner_name="tensorrt"))[name]
    # Polygraphy's own statistics replace ours where both exist; `inputs` says what the inputs were (real
    # photos or noise asked for on purpose), carried into the sidecar and manifest.
    return gate(str(plan), "the reference", expected, candidate, Thresholds(max_abs, min_cosine, min_top1),
                inputs=str(data["source"]) if "source" in data.files else "unrecorded",
                extra=dict(max_abs=float(stats.max_absdiff), mean_abs=float(stats.mean_absdiff),
                           median_abs=float(stats.median_absdiff), max_rel=float(stats.max_reldiff)))


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
    add_parity_args(b, LOW_PRECISION_PARITY, what="the plan (with --reference)")
    b.add_argument("--workspace-gib", type=float, default=4.0)
    b.add_argument("--opt-level", type=int, default=3)
    b.add_argument("--timing-cache", default=None)
    b.add_argument("--calibration", default=None, help=".npy of preprocessed images (implicit INT8)")
    b.add_argument("--tactic-sources", default="", help="e.g. edge_mask_convolutions,jit_convolutions")
    b.add_argument("--timing-batches", type=ints, default=(),
                   help="batch sizes to time the plan at, recorded in plan.json (default: 1, each preferred "
                        "size and max from --triton-config, else min/opt/max)")
    v = sub.add_parser("validate", help="compare a plan with reference logits")
    v.add_argument("--plan", required=True)
    v.add_argument("--reference", required=True, help=".npz with inputs and logits")
    add_parity_args(v, LOW_PRECISION_PARITY, what="the plan (with --reference)")
    t = sub.add_parser("time", help="time a plan at several batch sizes")
    t.add_argument("--plan", required=True)
    t.add_argument("--batches", type=ints, default=(1, 8, 32))
    t.add_argument("--iterations", type=int, default=200)
    t.add_argument("--json", default=None, help="write results here")
    i = sub.add_parser("inspect", help="write the plan's layer information")
    i.add_argument("--plan", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        # Polygraphy prints its warnings on stdout; this CLI's stdout is JSON only.
        with contextlib.redirect_stdout(sys.stderr):
            result = _run_command(args)
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


def _run_command(args: argparse.Namespace):
    """Runs one CLI command; returns what it prints as JSON."""
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
        return {k: sidecar[k] for k in ("tensorrt_version", "gpu", "precision", "build_s", "layer_precisions",
                                        "parity", "timings")}
    if args.command == "validate":
        return validate_plan(args.plan, args.reference, args.max_abs, args.min_cosine, args.min_top1)
    if args.command == "time":
        with PlanRunner(args.plan) as runner:
            rows = []
            for batch in args.batches:
                rows.append(runner.time(batch, iterations=args.iterations))
                log.info("%s", json.dumps(rows[-1]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return rows
    return inspect_plan(args.plan)


if __name__ == "__main__":
    sys.exit(main())
