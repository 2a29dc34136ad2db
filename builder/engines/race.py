"""The engine race: build the classifier's candidate engines, gate and time them on the GPU, settle `auto`.

`repository.writer` calls `race` once per build; the result carries the settings with the engine resolved,
the engines' gate figures and the record the manifest and the repository's README show.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from importlib.metadata import PackageNotFoundError, version

from builder.core.contract import Contract
from builder.engines import choice as ec
from builder.engines import inductor, static_fp8
from builder.engines.torch_runner import STATIC_FP8
from builder.errors import BuilderError
from builder.settings import (FUSED_RACED_PRECISIONS, LOW_PRECISION_PARITY, QUANTIZED_PRECISIONS,
                              RACED_PRECISIONS, TORCHAO_PRECISIONS, RepoSettings, torch_threads)
from builder.timing import timing_batches

log = logging.getLogger("builder")


@dataclass(frozen=True)
class RaceResult:
    """What the engine race settled.

    Attributes:
        settings: The build's settings with `engine` resolved (`auto` replaced by the winner, a losing plan
            and compile mode dropped).
        gates: The engines' parity figures by gate name (`inductor_vs_pytorch`, ...), for the manifest.
        choice: The race's record: requested, chosen, why, the GPU, batch sizes and every candidate's row.
    """

    settings: RepoSettings
    gates: Dict[str, Dict]
    choice: Dict


FINE_BUCKETS_UP_TO = 64  # batches this small pad by at most 3 rows


def batch_buckets(max_batch: int, preferred=()) -> list:
    """The batch sizes the inductor engine captures a CUDA graph for: a batch pads to the next one.

    1, 2, then every multiple of 4 up to 64, then every multiple of a coarser step (8 up to a max of 128, at
    most ~16 of them above 64), the preferred sizes and the max. Sparse buckets made batches of 2-8 cost a
    batch of 32 at low load (measured on an H100: served throughput fell from concurrency 1 to 8); powers of
    two alone ran the batches of ~36 that six photo-path instances form under load as batches of 64 (these
    buckets' step of 8 served 9% more one-image requests on an H200, perf/results/h200-photo-buckets); the
    classifier's batches of ~25 from eight instances padded to 32 with a step of 8, and a step of 4 up to 64
    served 5% more (7,375 against 7,033-7,046 img/s, perf/results/h200-photo-batching). Each bucket is one
    CUDA graph, captured at load (26 at a max of 128).
    """
    fine = {1, 2, *range(4, min(FINE_BUCKETS_UP_TO, max_batch) + 1, 4)}
    step = max(8, 1 << max(0, (max_batch - 1) // 16).bit_length())
    coarse = {b for b in range(step, max_batch + 1, step) if b > FINE_BUCKETS_UP_TO}
    return sorted(b for b in fine | coarse | {*preferred, max_batch} if b <= max_batch)


def torch_parameters(settings: RepoSettings, contract: Contract) -> Dict[str, str]:
    """Config parameters of the torch-engine classifier."""
    batching = settings.classifier_batching
    buckets = batch_buckets(batching.max_batch_size, batching.preferred_batch_sizes)
    return {"precision": settings.served_precision, "window_attention": settings.served_attention,
            "compile": settings.compile_mode,
            "batch_buckets": ",".join(str(b) for b in buckets),
            "input_dims": ",".join(str(d) for d in contract.pixels.dims),
            "intra_op_threads": torch_threads(settings.classifier_instances),
            # Inputs stay where the preprocess model left them (the GPU): no copy through the host.
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}


def race(settings: RepoSettings, model, contract: Contract, params, onnx_file: Path,
         onnx_parity: Dict) -> RaceResult:
    """Builds the classifier engine(s), gates and times them where there is a GPU, and settles `auto`.

    Args:
        settings: The build's settings (`engine` may be `auto`).
        model: The loaded timm model (the reference of every gate).
        contract: Names and tensors.
        params: The exact preprocessing's parameters (the gates run on the bundled photos through it).
        onnx_file: The validated ONNX export; the inductor files are written beside it.
        onnx_parity: The ONNX gate's figures.

    Returns:
        The race's result; a losing program's files are removed from beside `onnx_file`.

    Raises:
        BuilderError: The engine asked for fails, or no candidate of `auto` could be built and timed.
    """
    gates: Dict[str, Dict] = {}
    batching = settings.classifier_batching
    batches = timing_batches(batching.preferred_batch_sizes, batching.max_batch_size)
    gpu = _gpu_name()
    requested, names, reason = _entrants(settings, gpu, batches)
    candidates: List[ec.Candidate] = []
    for name in names:
        started = time.perf_counter()
        try:
            if name == "inductor":
                # A precision asked for by name fails the build; raced ones fail their row.
                strict = requested != "auto" and settings.inductor_precision != "auto"
                rows, figures = inductor_candidates(settings, model, contract, params, onnx_file.parent, gpu,
                                                     batches, strict=strict)
            else:
                row, figures = _candidate(name, settings, onnx_file, onnx_parity, gpu, batches)
                rows = [row]
            gates.update(figures)
        except BuilderError as exc:
            if requested != "auto":
                raise
            rows = [ec.Candidate(name, "failed", str(exc))]
            log.warning("engine candidate %s failed: %s", name, exc)
        for candidate in rows:  # a plan's build_s comes from its sidecar, an inductor's from its compile
            if candidate.build_s is None and candidate.status != "skipped":
                candidate.build_s = round(time.perf_counter() - started, 1)
        candidates.extend(rows)
    winner = _winner(candidates, gpu, requested)
    chosen = winner.engine
    _keep_winner(onnx_file.parent, winner, gates)
    log.info("classifier engine: %s (%s)", winner.label, reason)
    settings = dataclasses.replace(
        settings, engine=chosen, plan=settings.plan if chosen == "tensorrt" else None,
        torch_compile=settings.torch_compile if chosen == "inductor" else None,
        inductor_precision=(winner.precision or settings.served_precision) if chosen == "inductor" else "auto",
        window_attention=(winner.attention or settings.served_attention) if chosen == "inductor" else "auto")
    choice = {"requested": requested, "chosen": chosen, "precision": winner.precision or None, "reason": reason,
              "gpu": gpu, "batch_sizes": batches, "calibration": _calibration(winner, settings, onnx_file.parent),
              "thresholds": {"float": dataclasses.asdict(settings.engine_parity),
                             "quantized": dataclasses.asdict(LOW_PRECISION_PARITY)},
              "candidates": [c.to_dict() for c in candidates]}
    return RaceResult(settings, gates, choice)


def _entrants(settings: RepoSettings, gpu: Optional[str], batches) -> Tuple[str, List[str], str]:
    """What was asked (`auto` settled where it cannot race), the engines that enter, and why."""
    requested = settings.engine
    if requested == "auto" and settings.onnxruntime_tensorrt:  # the accelerator is ONNX Runtime's: no race
        requested = "onnxruntime"
    if requested == "auto" and gpu is None:
        return requested, ["tensorrt" if settings.plan else "onnxruntime"], (
            "no GPU on the build host: nothing to time, so "
            + ("the given plan is served" if settings.plan else "ONNX Runtime is served"))
    if requested == "auto":
        return (requested, ["onnxruntime", "inductor"] + (["tensorrt"] if settings.plan else []),
                f"fastest measured on {gpu} at batch sizes {batches}")
    if requested == "inductor" and settings.inductor_precision == "auto" and gpu is not None:
        return requested, ["inductor"], f"the fastest inductor precision measured on {gpu} at batch sizes {batches}"
    return requested, [requested], "asked for"


def _winner(candidates: List[ec.Candidate], gpu: Optional[str], requested: str) -> ec.Candidate:
    """The fastest candidate that passed its gate where there was a race, else the only one (marked chosen)."""
    if gpu is None or len(candidates) < 2:
        candidates[0].chosen = True
        return candidates[0]
    try:
        winner = ec.choose(candidates)
    except ValueError:
        raise BuilderError("engine: no candidate engine could be built and timed on this host: "
                           + "; ".join(f"{c.label}: {c.reason}" for c in candidates)) from None
    log.info("engine %s: %s", requested, ", ".join(
        f"{c.label} {c.best['throughput_img_per_s']:,.0f} img/s" if c.best else f"{c.label} {c.status}"
        for c in candidates))
    return winner


def _calibration(winner: ec.Candidate, settings: RepoSettings, staging: Path) -> Optional[str]:
    """What the served engine's quantization was calibrated on (None: not quantized)."""
    if winner.engine == "inductor" and winner.precision in QUANTIZED_PRECISIONS:
        sidecar = json.loads((staging / inductor.SIDECAR).read_text(encoding="utf-8"))
        return sidecar.get("quantization", {}).get("calibration", DYNAMIC_CALIBRATION)
    if winner.engine == "tensorrt" and settings.plan:
        sidecar = Path(settings.plan).with_name("plan.json")
        if sidecar.is_file():
            return json.loads(sidecar.read_text(encoding="utf-8")).get("calibration_source")
    return None


def _gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _candidate(name: str, settings: RepoSettings, onnx_file: Path, onnx_parity: Dict, gpu: Optional[str],
               batches) -> Tuple[ec.Candidate, Dict[str, Dict]]:
    """ONNX Runtime's or the given plan's choice-table row (timed on a GPU) and its gates' figures."""
    if name == "onnxruntime":
        if gpu is None:
            return ec.Candidate(name, "built", "the exported ONNX (gated against PyTorch)", parity=onnx_parity), {}
        return ec.measure_onnxruntime(str(onnx_file), batches, onnx_parity), {}
    sidecar_path = Path(settings.plan).with_name("plan.json")
    sidecar = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.is_file() else {}
    if gpu is None:
        return ec.Candidate(name, "built", f"the given plan ({settings.plan})", parity=sidecar.get("parity") or {},
                            build_s=sidecar.get("build_s")), {}
    return ec.recorded_tensorrt(sidecar, gpu, batches), {}


def raced_precisions(settings: RepoSettings, wanted: Optional[Sequence[str]] = None) -> Dict[str, Optional[str]]:
    """The inductor precisions this build tries, each with why it cannot run here (None: it can)."""
    import torch

    if wanted is None:
        wanted = (dict.fromkeys(RACED_PRECISIONS + FUSED_RACED_PRECISIONS) if settings.inductor_precision == "auto"
                  else (settings.inductor_precision,))
    found: Dict[str, Optional[str]] = {}
    for precision in wanted:
        found[precision] = None
        if precision in QUANTIZED_PRECISIONS and settings.flavor == "container":
            found[precision] = ("needs torch >= 2.11 where it is served; the container image's torch is older "
                                "(docker/Dockerfile.tritonserver)")
        elif precision in TORCHAO_PRECISIONS and importlib.util.find_spec("torchao") is None:
            found[precision] = "needs torchao in the build's and the server's Python (pip install torchao)"
        elif precision.startswith("fp8") and torch.cuda.get_device_capability(0) < (8, 9):
            found[precision] = (f"FP8 needs compute capability 8.9 or newer (Ada, Hopper); "
                                f"{torch.cuda.get_device_name(0)} has {torch.cuda.get_device_capability(0)}")
    return found


def raced_variants(settings: RepoSettings, precisions: Dict[str, Optional[str]],
                   listed: bool = False) -> List[Tuple[str, str]]:
    """The (precision, window attention) pairs this build tries: under `auto`, timm's attention at
    RACED_PRECISIONS and the fused one at FUSED_RACED_PRECISIONS (static FP8 is 8-bit on the fused engine);
    a precision named (or `listed` by a caller: the GPU benchmarks) is tried with both; `fused` or `timm` named,
    with that one only."""
    named = listed or settings.inductor_precision != "auto"
    timms = [] if settings.window_attention == "fused" else [
        (p, "timm") for p in precisions if named or p in RACED_PRECISIONS]
    if settings.window_attention == "timm" or settings.flavor == "container":
        return timms
    fused = [(p, "fused") for p in precisions
             if settings.window_attention == "fused" or p in FUSED_RACED_PRECISIONS]
    return timms + fused


def variant_key(precision: str, attention: str) -> str:
    """A candidate's folder under `precisions/` (`fp16`, `fp16-fused`)."""
    return precision if attention == "timm" else f"{precision}-{attention}"


def _fused_program(model, contract: Contract, staging: Path, max_batch: int, settings: RepoSettings):
    """The program with every window attention in the kernel, and its gate; or None and why it cannot be."""
    from builder.engines import window_attention

    fused = copy.deepcopy(model)
    try:
        count = window_attention.fuse_window_attention(fused.module)
    except ValueError as exc:
        return None, f"the fused window attention does not take this model: {exc}", {}
    if not count:
        return None, "the fused window attention covers timm's Swin V1 window attention; this model has none", {}
    folder = staging / "fused"
    folder.mkdir(parents=True, exist_ok=True)
    try:  # a failure here is the fused rows' (timm's program still races), unless the fused one was named
        program = inductor.export_program(fused, contract, folder / inductor.FILE, max_batch)
        gate = inductor.validate_program(program, model, contract, settings.parity)
    except BuilderError as exc:
        return None, f"the fused program: {exc}", {}
    log.info("fused window attention: %d window-attention modules in one Triton kernel each", count)
    return program, "", {"inductor_fused_vs_pytorch": gate}


def inductor_candidates(settings: RepoSettings, model, contract: Contract, params, staging: Path,
                        gpu: Optional[str], batches, strict: bool, precisions: Optional[Sequence[str]] = None
                        ) -> Tuple[List[ec.Candidate], Dict[str, Dict]]:
    """The torch.export program, and on a GPU one engine per precision and window attention: compiled side by
    side, timed in turn.

    Each variant builds in `staging/precisions/<variant_key>/` (its program hard-linked); `_keep_winner` moves
    the served one's files beside the ONNX file. A variant that fails (compile, time box, gate) is a failed row
    unless it was asked for by name (`strict`).
    """
    max_batch = settings.classifier_batching.max_batch_size
    if settings.window_attention == "fused":  # only the fused program is built, raced and served
        program, gates = _named_fused_program(model, contract, staging, max_batch, settings)
    else:
        program = inductor.export_program(model, contract, staging / inductor.FILE, max_batch)
        gates = {"inductor_vs_pytorch": inductor.validate_program(program, model, contract, settings.parity)}
    if gpu is None:  # no GPU to time on: the program is compiled where it is served
        return [_unraced_candidate(settings, model, params, staging, gates["inductor_vs_pytorch"])], gates
    import torch

    from builder.core.photos import photo_batch

    photos = photo_batch(params)
    with torch.no_grad():
        reference = model.module(torch.from_numpy(photos)).numpy()
    whys = raced_precisions(settings, precisions)
    variants = raced_variants(settings, whys, listed=precisions is not None)
    calibrated = _static_calibration(model, photos, variants, whys)
    programs = {settings.served_attention: (program, "")}
    if "fused" not in programs and any(attention == "fused" for _, attention in variants):
        fused, why_not, fused_gate = _fused_program(model, contract, staging, max_batch, settings)
        programs["fused"] = (fused, why_not)
        gates.update(fused_gate)
    rows, folders, engine_params = _stage_variants(settings, contract, staging, variants, whys, programs, gates,
                                                   strict, calibrated)
    compiled = _compile_side_by_side(folders, engine_params, max_batch, settings.compile_timeout_s)
    for key, folder in folders.items():
        precision, attention = engine_params[key]["precision"], engine_params[key]["window_attention"]
        try:
            if isinstance(compiled[key], BuilderError):
                raise compiled[key]
            # A quantized precision is gated with thresholds sized for quantization, a float one like FP16.
            thresholds = LOW_PRECISION_PARITY if precision in QUANTIZED_PRECISIONS else settings.engine_parity
            built = inductor.load_engine(folder, engine_params[key], max_batch, batches, photos, reference,
                                         thresholds, compiled[key], settings.compile_timeout_s)
        except BuilderError as exc:
            # Asked for by name (a named precision; the fused attention only where it was named too) fails the
            # build; the rest fail their row.
            if strict and (attention == "timm" or settings.window_attention == "fused"):
                raise
            rows[key] = ec.Candidate("inductor", "failed", str(exc), precision=precision, attention=attention)
            continue
        program_gate = gates["inductor_fused_vs_pytorch" if attention == "fused" else "inductor_vs_pytorch"]
        _write_sidecar(folder, precision, settings, program_gate, built, attention=attention, calibrated=calibrated)
        starts = f"start {built['start_from_scratch_s']} s cold, {built['start_with_artifacts_s']} s from inductor.bin"
        how = ", window attention in one Triton kernel" if attention == "fused" else ""
        note = f"torch {torch.__version__} {_described(precision)}{how}, compile={settings.compile_mode}; {starts}"
        rows[key] = ec.Candidate("inductor", "measured", note, built["timings"], built["start_from_scratch_s"],
                                 built["parity_served"], precision=precision, attention=attention)
    return [rows[variant_key(p, a)] for p, a in variants], gates


def _unraced_candidate(settings: RepoSettings, model, params, staging: Path, gate: Dict) -> ec.Candidate:
    """A build with no GPU: the program's sidecar (the served precision's calibration where it is static) and its
    row, compiled where it is served."""
    from builder.core.photos import photo_batch

    precision = settings.served_precision
    # The photos are decoded only for a static precision: every other CPU build writes its sidecar as before.
    calibrated = (_static_calibration(model, photo_batch(params), [(precision, "")], {precision: None})
                  if precision == STATIC_FP8 else None)
    _write_sidecar(staging, precision, settings, gate, calibrated=calibrated)
    return ec.Candidate("inductor", "built", "torch.export program; compiled where it is served (no GPU here)",
                        parity=gate, precision=precision, attention=settings.served_attention)


def _named_fused_program(model, contract: Contract, staging: Path, max_batch: int, settings: RepoSettings):
    """`--window-attention fused`: the fused program in the served program's place, and its gate under both names
    (it is the only program); or the one-line error."""
    fused, why_not, fused_gate = _fused_program(model, contract, staging, max_batch, settings)
    if fused is None:
        raise BuilderError(f"window_attention: {why_not}; build with --window-attention timm")
    program = staging / inductor.FILE
    os.replace(fused, program)
    gate = fused_gate["inductor_fused_vs_pytorch"]
    return program, {"inductor_vs_pytorch": gate, "inductor_fused_vs_pytorch": gate}


def _stage_variants(settings: RepoSettings, contract: Contract, staging: Path, variants, whys, programs,
                    gates: Dict[str, Dict], strict: bool, calibrated: Optional[Dict] = None):
    """Each variant's folder (its program linked, its sidecar) and config parameters; rows for those skipped.

    Raises:
        BuilderError: A precision asked for by name (`strict`), or the fused attention asked for by name, cannot
            be built here.
    """
    rows: Dict[str, ec.Candidate] = {}
    folders: Dict[str, Path] = {}
    engine_params: Dict[str, Dict[str, str]] = {}
    for precision, attention in variants:
        key = variant_key(precision, attention)
        source, why_not = programs[attention]
        if whys[precision] and strict:
            raise BuilderError(f"inductor_precision: {precision} {whys[precision]}")
        if why_not and settings.window_attention == "fused":
            raise BuilderError(f"window_attention: {why_not}; build with --window-attention timm")
        why_not = whys[precision] or why_not
        if why_not:
            rows[key] = ec.Candidate("inductor", "skipped", why_not, precision=precision, attention=attention)
            log.info("engine candidate inductor %s: skipped (%s)", key, why_not)
            continue
        folder = folders[key] = staging / "precisions" / key
        folder.mkdir(parents=True)
        os.link(source, folder / inductor.FILE)
        engine_params[key] = dict(torch_parameters(settings, contract), precision=precision,
                                  window_attention=attention)
        _write_sidecar(folder, precision, settings, gates["inductor_vs_pytorch"], attention=attention,
                       calibrated=calibrated)
    return rows, folders, engine_params


# What a torchao-quantized engine was calibrated on: nothing, its activation scales are computed per batch.
DYNAMIC_CALIBRATION = "none: torchao dynamic quantization, activation scales computed per batch at run time"


def _static_calibration(model, photos, variants, whys) -> Optional[Dict]:
    """Static FP8's calibration on the bundled photos (the sidecar's `quantization`), where a variant needs it."""
    if not any(precision == STATIC_FP8 and not whys[precision] for precision, _ in variants):
        return None
    started = time.perf_counter()
    amax = static_fp8.calibrate(model.module, photos)
    log.info("fp8-static: %d Linear layers' input scales calibrated on %d photos in %.1f s", len(amax), len(photos),
             time.perf_counter() - started)
    return static_fp8.quantization_record(amax, len(photos))


def _described(precision: str) -> str:
    return {"int8": "INT8 Linear layers (torchao, dynamic per-token scales), FP16 elsewhere",
            "fp8-static": "FP8 Linear layers (static per-tensor scales calibrated on photos), FP16 elsewhere",
            "fp8": "FP8 Linear layers (torchao, rowwise dynamic scales), BF16 elsewhere",
            "fp8-tensor": "FP8 Linear layers (torchao, per-tensor dynamic scales), FP16 elsewhere"}.get(
        precision, precision.upper())


def _write_sidecar(folder: Path, precision: str, settings: RepoSettings, program_parity: Dict,
                   built: Optional[Dict] = None, attention: Optional[str] = None,
                   calibrated: Optional[Dict] = None) -> None:
    """engine.json: what the stored artifacts are tied to (checked at load), the engine's figures, and a static
    precision's calibration (`calibrated`, which the served runner reads)."""
    sidecar = {"environment": inductor.environment(), "parity": program_parity,
               "precision": f"{precision} on GPU, fp32 on CPU", "compile": settings.compile_mode,
               "window_attention": attention or settings.served_attention}
    if precision == STATIC_FP8:
        sidecar["quantization"] = calibrated
    elif precision in QUANTIZED_PRECISIONS:
        sidecar["quantization"] = {"library": "torchao", "version": _version("torchao"),
                                   "layers": _described(precision),
                                   "calibration": DYNAMIC_CALIBRATION}
    if built:
        sidecar.update({k: v for k, v in built.items() if k != "parity_served"}, parity_served=built["parity_served"])
    (folder / inductor.SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")


def _version(package: str) -> Optional[str]:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _compile_side_by_side(folders: Dict[str, Path], params: Dict[str, Dict[str, str]], max_batch: int,
                          timeout_s: float) -> Dict[str, object]:
    """Each variant's compile in its own process, all at once (CPU work); start seconds or the error."""
    def one(key: str):
        try:
            return inductor.compile_engine(folders[key], params[key], max_batch, timeout_s)
        except BuilderError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(len(folders), 1)) as pool:
        return dict(zip(folders, pool.map(one, folders)))


def _keep_winner(staging: Path, winner: ec.Candidate, gates: Dict[str, Dict]) -> None:
    """Moves the served inductor variant's files beside the ONNX file (its program too: the fused one replaces
    timm's); drops the rest (and the program if lost)."""
    precisions = staging / "precisions"
    served = precisions / variant_key(winner.precision, winner.attention or "timm")
    if winner.engine == "inductor" and served.is_dir():
        for name in (inductor.FILE, inductor.SIDECAR, inductor.ARTIFACTS):
            if (served / name).is_file():
                os.replace(served / name, staging / name)
        gates["inductor_served_vs_pytorch"] = winner.parity
    fused_gate = gates.pop("inductor_fused_vs_pytorch", None)
    if winner.attention == "fused" and fused_gate:  # the served program's own gate
        gates["inductor_vs_pytorch"] = fused_gate
    shutil.rmtree(precisions, ignore_errors=True)
    shutil.rmtree(staging / "fused", ignore_errors=True)
    if winner.engine != "inductor":  # a losing program does not ship
        for name in inductor.FILES:
            (staging / name).unlink(missing_ok=True)
        gates.pop("inductor_vs_pytorch", None)
        gates.pop("inductor_served_vs_pytorch", None)
