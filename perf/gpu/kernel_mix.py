"""Where a batch's GPU time goes, by kernel kind, for one inductor precision: the matmuls against the rest.

    python perf/gpu/kernel_mix.py --output build/mix-fp16.json --precision fp16 [--batch 128]
        [--window-attention fused]

Swin-T (random weights, seed 0), exported and compiled as the served engine is (TorchInductor, here without
CUDA graphs so the profiler sees every kernel), then 10 batches under torch.profiler. Needs a CUDA GPU, torch,
timm and, for int8/fp8, torchao. If the matmuls are a small share, a faster matmul precision cannot pay off.
"""

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from builder.core.contract import DEFAULT_MODEL  # noqa: E402

# Kernel names of the matrix products: cuBLAS/cuBLASLt (nvjet, sm90_xmma, gemm), CUTLASS, torch's scaled/int mm.
MATMUL = re.compile(r"gemm|nvjet|xmma|cutlass|scaled_mm|_int_mm|matmul|sm90_|sm80_|s16816|f8f8", re.I)


def kind(name: str) -> str:
    # Inductor's Triton kernels first: it names them after every op they fuse, so a dynamic-quantization kernel
    # (amax, scale, cast) that feeds a scaled matmul has `_scaled_mm` in its name without being one, and a kernel
    # that feeds the fused attention op has `window_attention` in its name.
    if name.startswith("triton_"):
        return "activation quantization (Triton)" if "amax" in name else "fused elementwise/reduction (Triton)"
    if "window_attention" in name:  # builder.engines.window_attention's kernel (both forms): scores to values
        return "window attention (one Triton kernel)"
    if MATMUL.search(name):
        return "matmul"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--window-attention", choices=("timm", "fused"), default="timm")
    parser.add_argument("--wait-for", help="a file to wait for before profiling (another job's end)")
    args = parser.parse_args()

    import torch

    from builder.core.contract import Contract
    from builder.engines.inductor import export_program
    from builder.core.imaging import PreprocessParams
    from builder.core.photos import photo_batch
    from builder.engines import static_fp8
    from builder.engines.torch_runner import STATIC_FP8, TorchEngine
    from builder.export.model import load_model
    from builder.settings import ModelSource

    model = load_model(ModelSource(DEFAULT_MODEL))
    if args.window_attention == "fused":
        from builder.engines.window_attention import fuse_window_attention

        fuse_window_attention(model.module)
    with tempfile.TemporaryDirectory() as tmp:
        export_program(model, Contract(DEFAULT_MODEL, (224, 224), 1000), Path(tmp) / "model.pt2",
                       args.batch)
        if args.precision == STATIC_FP8:  # its calibration, as the build records it
            photos = photo_batch(PreprocessParams.from_timm(model.data_config))
            record = static_fp8.quantization_record(static_fp8.calibrate(model.module, photos), len(photos))
            (Path(tmp) / "engine.json").write_text(json.dumps({"quantization": record}))
        params = {"precision": args.precision, "compile": "default", "batch_buckets": str(args.batch),
                  "input_dims": "3,224,224", "intra_op_threads": "1", "window_attention": args.window_attention}
        engine = TorchEngine(tmp, "cuda", params, args.batch, log=print)
    while args.wait_for and not Path(args.wait_for).exists():
        time.sleep(1)
    x = torch.randn(args.batch, 3, 224, 224, device="cuda")
    for _ in range(5):
        engine(x)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine(x)
        torch.cuda.synchronize()
    totals, kernels = defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[kind(event.name)] += event.device_time / 10 / 1000  # ms per batch
            kernels[event.name] += event.device_time / 10 / 1000
    total = sum(totals.values())
    report = {"precision": args.precision, "window_attention": args.window_attention, "batch": args.batch,
              "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "gpu_ms_per_batch": round(total, 3),
              "by_kind_ms": {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
              "by_kind_share": {k: round(v / total, 3) for k, v in totals.items()},
              "top_kernels_ms": {k[:120]: round(v, 3) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:15]},
              "command": " ".join(sys.argv)}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("precision", "gpu_ms_per_batch", "by_kind_ms")}))


if __name__ == "__main__":
    main()
