"""`--engine auto`: the classifier engine chosen by measurement on the build host.

On a host with a GPU the builder builds the candidates it can build, gates
each against PyTorch, times each at the batch sizes the classifier's config
makes the server form, and serves the one with the best throughput (batch-1
latency breaks ties within 3%). Every candidate, served or not, goes into the
manifest and the repository README as one table row with its reason.

- `onnxruntime`: the exported ONNX in ONNX Runtime (CUDA provider when the
  build host's onnxruntime has it, else the CPU one; the row says which).
- `inductor`: the torch.export program compiled by TorchInductor as served
  (`builder.engines.inductor.build_inductor`), timed from its stored artifacts.
- `tensorrt`: a plan passed with `--plan`. TensorRT and torch rarely share a
  Python, so the plan is timed where it was built (`python -m builder.engines.trt
  build` records `timings` in `plan.json`); those timings count when they
  were taken on this host's GPU model, otherwise the plan is timed here if
  TensorRT imports, otherwise it is skipped with the reason.

Without a GPU, `auto` is ONNX Runtime, as before this option existed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from builder.timing import timed, timing_row

log = logging.getLogger("builder")
TIE = 0.03  # throughputs this close count as equal; the lower batch-1 latency wins


@dataclass
class Candidate:
    """One engine's row in the choice table.

    Attributes:
        engine: `onnxruntime`, `inductor` or `tensorrt`.
        status: `measured`, `skipped` (the host cannot build or time it) or
            `failed` (it did not build or failed its parity gate).
        reason: Why it was skipped or failed, or where it ran.
        timings: Rows of `batch_size`, `latency_p50_ms`, `throughput_img_per_s`.
        build_s: Seconds to build it (export, compile, plan build).
        parity: Its gate's figures (max abs, cosine, top-1 against PyTorch).
        chosen: Whether it is the served engine.
        precision: The inductor engine's precision (`fp16`, `int8`, `fp8`, ...); empty for the others.
        attention: The inductor engine's window attention (`timm` or `fused`); empty for the others.
    """

    engine: str
    status: str
    reason: str = ""
    timings: List[Dict] = field(default_factory=list)
    build_s: Optional[float] = None
    parity: Dict = field(default_factory=dict)
    chosen: bool = False
    precision: str = ""
    attention: str = ""

    @property
    def label(self) -> str:
        """The engine, with its precision when the race tried several (`inductor fp8`), and the fused window
        attention where it was used (`inductor fp16 fused-attention`)."""
        label = f"{self.engine} {self.precision}" if self.precision else self.engine
        return label + " fused-attention" if self.attention == "fused" else label

    @property
    def latency_b1_ms(self) -> Optional[float]:
        return next((r["latency_p50_ms"] for r in self.timings if r["batch_size"] == 1), None)

    @property
    def best(self) -> Optional[Dict]:
        return max(self.timings, key=lambda r: r["throughput_img_per_s"]) if self.timings else None

    def to_dict(self) -> Dict:
        best = self.best
        return {**asdict(self), "latency_b1_ms": self.latency_b1_ms,
                "best_throughput_img_per_s": best["throughput_img_per_s"] if best else None,
                "best_batch": best["batch_size"] if best else None}


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The measured candidate with the best throughput; within 3%, the lower batch-1 latency.

    Raises:
        ValueError: No candidate was measured.
    """
    measured = [c for c in candidates if c.status == "measured" and c.timings]
    if not measured:
        raise ValueError("no engine was measured")
    top = max(c.best["throughput_img_per_s"] for c in measured)
    close = [c for c in measured if c.best["throughput_img_per_s"] >= top * (1 - TIE)]
    winner = min(close, key=lambda c: (c.latency_b1_ms if c.latency_b1_ms is not None else float("inf"),
                                       -c.best["throughput_img_per_s"]))
    for c in candidates:
        c.chosen = c is winner
    return winner


def onnxruntime_timings(onnx_file: str, batches: Sequence[int], warmup: int = 2, iterations: int = 50,
                        budget_s: Optional[float] = 2.0, threads: int = 0):
    """Times ONNX Runtime (CUDA provider when present, else CPU) on `onnx_file`; (provider, timing rows)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = ort.InferenceSession(onnx_file, options, providers=providers)
    inp = session.get_inputs()[0]
    rows = []
    for batch in batches:
        x = np.random.default_rng(0).standard_normal((batch, *inp.shape[1:]), dtype=np.float32)
        samples = timed(lambda: session.run(None, {inp.name: x}), lambda: None, warmup, iterations, budget_s)
        rows.append(timing_row(batch, samples))
        log.info("onnxruntime batch %d: p50 %.2f ms, %.0f img/s", batch, rows[-1]["latency_p50_ms"],
                 rows[-1]["throughput_img_per_s"])
    return session.get_providers()[0], rows


def measure_onnxruntime(onnx_file: str, batches: Sequence[int], parity: Dict, budget_s: float = 2.0) -> Candidate:
    """ONNX Runtime on the exported model (already gated against PyTorch by the export)."""
    import onnxruntime as ort

    provider, rows = onnxruntime_timings(onnx_file, batches, budget_s=budget_s)
    return Candidate("onnxruntime", "measured", f"ONNX Runtime {ort.__version__}, {provider}", rows, parity=parity)


def recorded_tensorrt(plan_sidecar: Dict, gpu: str, batches: Sequence[int]) -> Candidate:
    """The given plan, from the timings `python -m builder.engines.trt build` recorded beside it.

    Args:
        plan_sidecar: The plan's `plan.json`.
        gpu: This host's GPU name (torch.cuda.get_device_name).
        batches: The batch sizes the config forms; recorded rows at other sizes are left out.
    """
    built_on = plan_sidecar.get("gpu", "")
    rows = [r for r in plan_sidecar.get("timings", []) if r.get("batch_size") in set(batches)]
    parity = plan_sidecar.get("parity") or {}
    version = plan_sidecar.get("tensorrt_version", "?")
    if not plan_sidecar.get("timings"):
        return Candidate("tensorrt", "skipped", "plan.json has no timings: rebuild the plan with this "
                         "project's `python -m builder.engines.trt build` (it times the plan where it is built)")
    if built_on != gpu:
        return Candidate("tensorrt", "skipped", f"the plan was built and timed on {built_on or 'an unnamed GPU'}, "
                         f"not this host's {gpu}: build it on this GPU model")
    if not rows:
        return Candidate("tensorrt", "skipped", f"plan.json has no timings at batch sizes {list(batches)}: rebuild "
                         "it with --triton-config (or --timing-batches) so they match the classifier's config")
    if not parity:
        return Candidate("tensorrt", "failed", "the plan has no parity figures: build it with --reference",
                         rows, plan_sidecar.get("build_s"))
    return Candidate("tensorrt", "measured", f"TensorRT {version} {plan_sidecar.get('precision', '')}, timed "
                     f"where it was built", rows, plan_sidecar.get("build_s"), parity)


def markdown_table(candidates: Sequence[Candidate]) -> str:
    """The choice as a markdown table (repository README)."""
    lines = ["| engine | status | batch 1 p50 (ms) | best img/s (batch) | build (s) | max abs | top-1 | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in candidates:
        best = c.best
        latency = f"{c.latency_b1_ms:.2f}" if c.latency_b1_ms is not None else "—"
        throughput = f"{best['throughput_img_per_s']:,.0f} ({best['batch_size']})" if best else "—"
        build = f"{c.build_s:.0f}" if c.build_s is not None else "—"
        max_abs = f"{c.parity['max_abs']:.3g}" if "max_abs" in c.parity else "—"
        top1 = f"{c.parity['top1_agreement']:.3f}" if "top1_agreement" in c.parity else "—"
        status = "**served**" if c.chosen else c.status
        lines.append(f"| {c.label} | {status} | {latency} | {throughput} | {build} | {max_abs} | {top1} | "
                     f"{c.reason} |")
    return "\n".join(lines) + "\n"
