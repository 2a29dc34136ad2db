"""Candidate: timm's Swin with every window attention in one Triton kernel, whole model, against timm's own (JSON).

    python perf/gpu/fused_swin.py --output build/fused-swin.json [--batches 1,32,128] [--model swin_tiny_...]

The kernel is the torch op `swin_triton::window_attention` of `builder.engines.window_attention`
(a `torch.library.custom_op`: torch.compile and Inductor call it as one kernel and compile the rest around it), and
`fuse_window_attention(model)` points every `WindowAttention.forward` of a timm Swin at it: the qkv projection,
the op, the output projection; no permute, score tensor or softmax pass is left between them.

Both models, timm's and the fused one, are compiled alike (FP16, torch.compile in Inductor's default mode), checked
against timm's FP32 eager logits (max abs, cosine, top-1 agreement) and timed at each batch size with CUDA
events. Random weights
(seed 0) unless --checkpoint. On the CPU, `TRITON_INTERPRET=1` runs the same op eagerly (the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from builder.core.contract import DEFAULT_MODEL  # noqa: E402
from builder.engines.window_attention import fuse_window_attention  # noqa: E402
import triton  # noqa: E402


def measure(model_name: str, batches, repeats: int, checkpoint: Optional[str] = None) -> Dict:
    """Both engines, gated against FP32 eager and timed per batch size."""
    import timm

    from perf.gpu.transform_speed import timed

    torch.manual_seed(0)
    reference = timm.create_model(model_name, pretrained=False, checkpoint_path=checkpoint or "").eval().cuda()
    timm_half = timm.create_model(model_name, pretrained=False).eval().cuda().half()
    timm_half.load_state_dict(reference.state_dict())
    fused = timm.create_model(model_name, pretrained=False).eval().cuda().half()
    fused.load_state_dict(reference.state_dict())
    modules = fuse_window_attention(fused)
    engines = {"timm": torch.compile(timm_half), "fused": torch.compile(fused)}
    rows = []
    with torch.inference_mode():
        x = torch.randn(max(batches), 3, 224, 224, device="cuda")
        exact = reference(x[:32]).float()
        for name, engine in engines.items():
            got = engine(x[:32].half()).float()
            cosine = torch.nn.functional.cosine_similarity(got, exact, dim=1).min().item()
            rows.append({"engine": name, "max_abs": (got - exact).abs().max().item(), "min_cosine": cosine,
                         "top1_agreement": (got.argmax(1) == exact.argmax(1)).float().mean().item()})
        for batch in batches:
            xb = x[:batch].half().contiguous()
            for name, engine in engines.items():
                ms = timed(lambda: engine(xb), repeats)
                rows.append({"engine": name, "batch": batch, "ms": ms, "img_per_s": batch * 1000 / ms})
                print(json.dumps(rows[-1]), flush=True)
    return {"model": model_name, "fused_modules": modules, "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    result = measure(args.model, [int(b) for b in args.batches.split(",")], args.repeats, args.checkpoint)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
