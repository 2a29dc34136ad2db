"""`python -m perf`: benchmarks for the served model and the bare engine.

Subcommands:
  sweep    perf_analyzer over a grid of models, concurrency, batch, protocol, shared memory
  report   markdown table + PNG plots of a sweep (with serving efficiency vs a bare run)
  compare  ratios between two sweeps
  tune     search instance count / queue delay / batch sizes by live model reloads
  bare     the classifier run directly (PyTorch, ONNX Runtime, TensorRT)

Heavy imports happen inside the subcommands so `--help` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional


def _ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _words(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _cmd_bare(args) -> int:
    from perf import bare
    from perf.environment import describe, write_json

    rows = []
    if "torch" in args.engines:
        rows += bare.bench_torch(args.model, json.loads(args.model_kwargs), args.batches, args.device,
                                 args.warmup, args.iterations, args.compile)
    if "onnxruntime" in args.engines:
        if not args.onnx:
            raise SystemExit("error: --onnx is needed for the onnxruntime engine")
        rows += bare.bench_onnxruntime(args.onnx, args.batches, args.warmup, args.iterations)
    if "tensorrt" in args.engines:
        for plan in args.plans:
            rows += bare.bench_tensorrt(plan, args.batches, args.warmup, args.iterations)
    payload = {"kind": "bare", "environment": describe({"model": args.model, "model_kwargs": args.model_kwargs}),
               "results": rows}
    print(write_json(args.output, payload))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    from perf import cli_sweep

    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bare", help="time the classifier without a server")
    b.add_argument("--engines", type=_words, default=["onnxruntime"], help="torch,onnxruntime,tensorrt")
    b.add_argument("--model", default="swin_tiny_patch4_window7_224")
    b.add_argument("--model-kwargs", default="{}")
    b.add_argument("--onnx", default=None)
    b.add_argument("--plans", type=_words, default=[])
    b.add_argument("--device", default="cuda")
    b.add_argument("--compile", action="store_true", help="also torch.compile FP16")
    b.add_argument("--batches", type=_ints, default=[1, 8, 32])
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--iterations", type=int, default=50)
    b.add_argument("--output", default="perf/results/local-bare.json")
    b.set_defaults(func=_cmd_bare)
    cli_sweep.add_commands(sub, _ints, _words)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the CLI; user errors print one line and return 1."""
    from builder.errors import BuilderError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except BuilderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
