"""The engine race: build the classifier's candidate engines, gate and time them on the GPU, settle `auto`.

`repository.writer` calls `race` once per build; the result carries the settings with the engine resolved,
the engines' gate figures and the record the manifest and the repository's README show.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from builder.core.contract import Contract
from builder.engines import choice as ec
from builder.engines import inductor
from builder.errors import BuilderError
from builder.settings import RepoSettings
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


def torch_parameters(settings: RepoSettings, contract: Contract) -> Dict[str, str]:
    """Config parameters of the torch-engine classifier."""
    batching = settings.classifier_batching
    # Every power of two up to the max, and the preferred sizes: a batch pads to the next bucket, so sparse
    # buckets (1, 32, ...) made batches of 2-8 cost a batch of 32 at low load (measured on an H100: served
    # throughput fell from concurrency 1 to 8). Each bucket is one CUDA graph, captured at load.
    powers = {1 << i for i in range(batching.max_batch_size.bit_length()) if 1 << i <= batching.max_batch_size}
    buckets = sorted(powers | {*batching.preferred_batch_sizes, batching.max_batch_size})
    # A GPU instance only stacks and copies batches on the CPU. torch's default pool, one thread per core in
    # every instance's process, oversubscribed the cores: 2 instances on an H100 served 187 img/s with it and
    # 2,312 with one thread each (perf/results/h100-analyze/threads/). CPU instances compute there: torch decides.
    gpu = settings.classifier_instances.kind == "KIND_GPU"
    return {"precision": settings.inductor_precision, "compile": settings.compile_mode,
            "batch_buckets": ",".join(str(b) for b in buckets),
            "input_dims": ",".join(str(d) for d in contract.pixels.dims),
            "intra_op_threads": "1" if gpu else "0",
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
    requested = settings.engine
    if requested == "auto" and settings.onnxruntime_tensorrt:  # the accelerator is ONNX Runtime's: no race
        requested = "onnxruntime"
    if requested == "auto" and gpu is None:
        names = ["tensorrt" if settings.plan else "onnxruntime"]
        reason = "no GPU on the build host: nothing to time, so " + (
            "the given plan is served" if settings.plan else "ONNX Runtime is served")
    elif requested == "auto":
        names = ["onnxruntime", "inductor"] + (["tensorrt"] if settings.plan else [])
        reason = f"fastest measured on {gpu} at batch sizes {batches}"
    else:
        names, reason = [requested], "asked for"
    candidates = []
    for name in names:
        started = time.perf_counter()
        try:
            candidate, figures = _candidate(name, settings, model, contract, params, onnx_file, onnx_parity, gpu,
                                            batches)
            gates.update(figures)
        except BuilderError as exc:
            if requested != "auto":
                raise
            candidate = ec.Candidate(name, "failed", str(exc))
            log.warning("engine candidate %s failed: %s", name, exc)
        if candidate.build_s is None and candidate.status != "skipped":  # a plan's build_s comes from its sidecar
            candidate.build_s = round(time.perf_counter() - started, 1)
        candidates.append(candidate)
    if requested == "auto" and gpu is not None:
        try:
            chosen = ec.choose(candidates).engine
        except ValueError:
            raise BuilderError("engine: no candidate engine could be built and timed on this host: "
                               + "; ".join(f"{c.engine}: {c.reason}" for c in candidates)) from None
        log.info("engine auto: %s", ", ".join(
            f"{c.engine} {c.best['throughput_img_per_s']:,.0f} img/s" if c.best else f"{c.engine} {c.status}"
            for c in candidates))
    else:
        chosen = names[0]
        candidates[0].chosen = True
    if chosen != "inductor":  # a losing program does not ship
        for name in inductor.FILES:
            onnx_file.with_name(name).unlink(missing_ok=True)
        gates.pop("inductor_vs_pytorch", None)
        gates.pop("inductor_served_vs_pytorch", None)
    log.info("classifier engine: %s (%s)", chosen, reason)
    settings = dataclasses.replace(settings, engine=chosen, plan=settings.plan if chosen == "tensorrt" else None,
                                   torch_compile=settings.torch_compile if chosen == "inductor" else None)
    choice = {"requested": requested, "chosen": chosen, "reason": reason, "gpu": gpu, "batch_sizes": batches,
              "candidates": [c.to_dict() for c in candidates]}
    return RaceResult(settings, gates, choice)


def _gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _candidate(name: str, settings: RepoSettings, model, contract: Contract, params, onnx_file: Path,
               onnx_parity: Dict, gpu: Optional[str], batches) -> Tuple[ec.Candidate, Dict[str, Dict]]:
    """Builds (and on a GPU, gates and times) one engine: its choice-table row and its gates' figures."""
    if name == "onnxruntime":
        if gpu is None:
            return ec.Candidate(name, "built", "the exported ONNX (gated against PyTorch)", parity=onnx_parity), {}
        return ec.measure_onnxruntime(str(onnx_file), batches, onnx_parity), {}
    if name == "tensorrt":
        sidecar_path = Path(settings.plan).with_name("plan.json")
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.is_file() else {}
        if gpu is None:
            return ec.Candidate(name, "built", f"the given plan ({settings.plan})", parity=sidecar.get("parity") or {},
                                build_s=sidecar.get("build_s")), {}
        return ec.recorded_tensorrt(sidecar, gpu, batches), {}
    staging = onnx_file.parent
    program = inductor.export_program(model, contract, staging / inductor.FILE,
                                      settings.classifier_batching.max_batch_size)
    gates = {"inductor_vs_pytorch": inductor.validate_program(program, model, contract, settings.parity)}
    sidecar = {"environment": inductor.environment(), "parity": gates["inductor_vs_pytorch"],
               "precision": f"{settings.inductor_precision} on GPU, fp32 on CPU", "compile": settings.compile_mode}
    (staging / inductor.SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    if gpu is None:
        return ec.Candidate(name, "built", "torch.export program; compiled where it is served (no GPU here)",
                            parity=gates["inductor_vs_pytorch"]), gates
    import torch

    from builder.core.photos import photo_batch

    photos = photo_batch(params)
    with torch.no_grad():
        reference = model.module(torch.from_numpy(photos)).numpy()
    built = inductor.build_inductor(staging, torch_parameters(settings, contract),
                                    settings.classifier_batching.max_batch_size, batches, photos, reference,
                                    settings.engine_parity)
    gates["inductor_served_vs_pytorch"] = built["parity_served"]
    # Written before the build too: the fresh processes check stored artifacts against its environment.
    sidecar.update({k: v for k, v in built.items() if k != "parity_served"}, parity_served=built["parity_served"])
    (staging / inductor.SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    starts = f"start {built['start_from_scratch_s']} s cold, {built['start_with_artifacts_s']} s from inductor.bin"
    row = ec.Candidate(name, "measured", f"torch {torch.__version__} {settings.inductor_precision.upper()}, "
                       f"compile={settings.compile_mode}; {starts}", built["timings"], parity=built["parity_served"])
    return row, gates
