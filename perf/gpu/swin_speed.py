"""Swin at Hopper's speed, in one run on one GPU: the engines, where their GPU time goes, the next candidates.

    python perf/gpu/swin_speed.py --output build/swin-speed [--steps engines,mix,variants,tuned] [--summary-only]

Steps (each a script of this folder, its JSON and log under --output; one that fails is reported and the rest run):
- `engines`: `precisions.py`, the inductor engine as the build's race makes it, at FP16 and static FP8
  (`fp8-static`) with timm's window attention and with the fused one, compiled side by side and timed in turn at
  batch 1, 32 and 128, each with its parity against PyTorch FP32 on the bundled photos;
- `mix`: `kernel_mix.py`, where a batch of 128's GPU time goes (matmuls, the window-attention kernel, the
  memory-bound rest) for each of those four engines;
- `variants`: `fused_swin.py --variants`, the candidates not yet in the engine (patch embedding as one matrix
  product, fc1's bias and GELU in cuBLASLt's epilogue, static FP8) beside timm's and the fused Swin, compiled alike;
- `tuned`: the fused Swin in FP16 and static FP8 under Inductor's max-autotune, whose matrix product templates may
  take GELU and the FP8 quantize into their epilogue (last: its compiles are the longest).

Then `summary.md` and `summary.json`: the figures beside the issue's targets (`TARGETS`), met or not. Swin-T with
random weights (seed 0; the hub may be unreachable), inputs random or the bundled photos as each script says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
# The engines of the `engines` and `mix` steps: (precision, window attention).
ENGINES = (("fp16", "timm"), ("fp8-static", "timm"), ("fp16", "fused"), ("fp8-static", "fused"))
VARIANTS = "timm,fused,fused+patchify,fused+gelu,fused+fp8"
# The `tuned` step, last (its compiles time every matrix product template): the fused engine in FP16 and static FP8
# under Inductor's max-autotune.
TUNED = "fused+autotune,fused+fp8+autotune"
# Issue "Swin at Hopper's speed" (one H200, Swin-T 224, batch 128): fused FP16 img/s, its memory-bound share of
# GPU time, its batch-1 latency, and 8-bit on the fused engine against fused FP16.
TARGETS = {"fused_fp16_img_per_s": 18_000, "fused_fp16_memory_bound_share": 0.35, "fused_fp16_b1_ms": 0.45,
           "fused_8bit_speedup": 1.25}
MEMORY_BOUND = ("fused elementwise/reduction (Triton)", "activation quantization (Triton)")


def steps(output: Path, python: str) -> Dict[str, List[List[str]]]:
    """Each step's commands."""
    script = lambda name: str(HERE / name)  # noqa: E731
    return {
        "engines": [[python, script("precisions.py"), "--output", str(output / "engines.json"), "--precisions",
                     "fp16,fp8-static", "--batches", "1,32,128", "--window-attention", "both"]],
        "mix": [[python, script("kernel_mix.py"), "--output", str(output / f"mix-{p}-{a}.json"), "--precision", p,
                 "--window-attention", a] for p, a in ENGINES],
        "variants": [[python, script("fused_swin.py"), "--output", str(output / "variants.json"), "--batches",
                      "128", "--variants", VARIANTS]],
        "tuned": [[python, script("fused_swin.py"), "--output", str(output / "tuned.json"), "--batches", "128",
                   "--variants", TUNED]],
    }


def run(output: Path, wanted: List[str], python: str) -> Dict[str, str]:
    """Runs the wanted steps in order; each step's status ("ok", or what failed)."""
    status = {}
    for name, commands in steps(output, python).items():
        if name not in wanted:
            continue
        started = time.perf_counter()
        print(f"[swin_speed] {name}: {len(commands)} command(s) ...", flush=True)
        with open(output / f"{name}.log", "w") as log:
            codes = [subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode for command in commands]
        failed = [Path(command[1]).name for command, code in zip(commands, codes) if code]
        status[name] = "ok" if not failed else f"failed: {', '.join(failed)} (see {name}.log)"
        print(f"[swin_speed] {name}: {status[name]} in {time.perf_counter() - started:.0f} s", flush=True)
    return status


def _read(path: Path) -> Optional[Dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _at(candidate: Dict, batch: int) -> Optional[Dict]:
    return next((t for t in candidate.get("timings") or [] if t["batch_size"] == batch), None)


def summarize(output: Path) -> Dict:
    """The figures of a run's JSON files beside TARGETS (what is missing is None)."""
    engines = _read(output / "engines.json") or {}
    rows = {f"{c['precision']} {c.get('attention') or 'timm'}": c for c in engines.get("candidates", [])}
    mixes = {f"{p} {a}": _read(output / f"mix-{p}-{a}.json") for p, a in ENGINES}
    fused, static = rows.get("fp16 fused", {}), rows.get("fp8-static fused", {})
    fused_128, static_128 = _at(fused, 128), _at(static, 128)
    fused_mix = mixes.get("fp16 fused") or {}
    shares = fused_mix.get("by_kind_share", {})
    figures = {
        "fused_fp16_img_per_s": fused_128 and fused_128["throughput_img_per_s"],
        "fused_fp16_memory_bound_share": round(sum(shares.get(k, 0) for k in MEMORY_BOUND), 3) if shares else None,
        "fused_fp16_b1_ms": fused.get("latency_b1_ms"),
        "fused_8bit_speedup": (round(static_128["throughput_img_per_s"] / fused_128["throughput_img_per_s"], 3)
                               if fused_128 and static_128 else None),
    }
    met = {k: None if v is None else (v <= TARGETS[k] if k.endswith(("_share", "_ms")) else v >= TARGETS[k])
           for k, v in figures.items()}
    return {"gpu": engines.get("gpu"), "torch": engines.get("torch"), "figures": figures, "targets": TARGETS,
            "met": met, "engines": rows, "mix": mixes,
            "variants": [row for name in ("variants", "tuned") for row in (_read(output / f"{name}.json") or {}).get(
                "rows", [])]}


def markdown(summary: Dict) -> str:
    """summary.md: the targets, the engines at batch 1/32/128 with parity, the kernel mixes, the variants."""
    lines = [f"GPU: {summary['gpu']}, torch {summary['torch']}", "", "| target | measured | wanted | met |",
             "|---|---|---|---|"]
    for key, wanted in summary["targets"].items():
        lines.append(f"| {key} | {_fmt(summary['figures'][key])} | {'<=' if key.endswith(('_share', '_ms')) else '>='}"
                     f" {wanted:g} | {_fmt(summary['met'][key])} |")
    lines += ["", "| engine | status | b1 ms | b32 img/s | b128 img/s | max abs | min cosine | top-1 |",
              "|---|---|---|---|---|---|---|---|"]
    for label, row in summary["engines"].items():
        parity = row.get("parity") or {}
        speeds = [_at(row, b) for b in (32, 128)]
        lines.append(f"| {label} | {row['status']} | {_fmt(row.get('latency_b1_ms'))} | "
                     + " | ".join(_fmt(t and t["throughput_img_per_s"]) for t in speeds)
                     + f" | {_fmt(parity.get('max_abs'))} | {_fmt(parity.get('min_cosine'))} | "
                       f"{_fmt(parity.get('top1_agreement'))} |")
    lines += ["", "| kernel mix, batch 128 | GPU ms | " + " | ".join(_kinds(summary)) + " |",
              "|---|---|" + "---|" * len(_kinds(summary))]
    for label, mix in summary["mix"].items():
        if mix:
            shares = mix["by_kind_share"]
            lines.append(f"| {label} | {mix['gpu_ms_per_batch']} | "
                         + " | ".join(_fmt(shares.get(k)) for k in _kinds(summary)) + " |")
    variants = summary.get("variants") or []
    if variants:
        lines += ["", "| variant | b128 img/s | max abs | min cosine | error |", "|---|---|---|---|---|"]
        for name in dict.fromkeys(r["engine"] for r in variants):
            own = [r for r in variants if r["engine"] == name]
            speed = next((r["img_per_s"] for r in own if r.get("batch") == 128), None)
            parity = next((r for r in own if "min_cosine" in r), {})
            error = next((r["error"][:120] for r in own if "error" in r), "")
            lines.append(f"| {name} | {_fmt(speed)} | {_fmt(parity.get('max_abs'))} | "
                         f"{_fmt(parity.get('min_cosine'))} | {error} |")
    return "\n".join(lines) + "\n"


def _kinds(summary: Dict) -> List[str]:
    return sorted({k for mix in summary["mix"].values() if mix for k in mix["by_kind_share"]})


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 100 else f"{value:.4g}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", default="engines,mix,variants,tuned")
    parser.add_argument("--summary-only", action="store_true", help="summarize an earlier run's files")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    status = {} if args.summary_only else run(output, args.steps.split(","), sys.executable)
    summary = summarize(output)
    summary["steps"] = status
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output / "summary.md").write_text(markdown(summary))
    print(markdown(summary))


if __name__ == "__main__":
    main()
