"""Swin's window attention in one Triton kernel (`builder.engines.window_attention`), timed per Swin-T stage against
timm's own attention math (JSON).

    python perf/gpu/window_attention.py --output build/window-attention.json [--batch 128] [--repeats 50]

Timed here on Swin-T's four stages at `--batch` images (windows of 7, head size 32), each as timm's eager code,
that code under torch.compile, SDPA with a float mask, and the kernel, with CUDA events; the kernel's figures
against timm's eager FP32 math on the same inputs. Runs on the CPU under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path: the checkout's packages
from builder.engines.window_attention import reference, shift_mask, window_attention  # noqa: E402


def sdpa(qkv, bias, mask, heads, scale):
    """timm's fused path (`TIMM_FUSED_ATTN`): SDPA with the bias and the mask as one float mask."""
    windows, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    float_mask = bias.unsqueeze(0).expand(windows, -1, -1, -1)
    if mask is not None:
        count = mask.shape[0]
        float_mask = (float_mask.view(-1, count, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)).view(
            windows, heads, tokens, tokens)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=float_mask.to(q.dtype), scale=scale)
    return out.transpose(1, 2).reshape(windows, tokens, -1)


# Swin-T at 224: (resolution of the stage in tokens, channels, heads); windows of 7, shift 3 but in the last stage.
SWIN_T_STAGES = ((56, 96, 3), (28, 192, 6), (14, 384, 12), (7, 768, 24))


def measure(batch: int, repeats: int, window: int = 7) -> Dict:
    """Per stage (shifted where timm shifts): ms per call of each candidate, and the kernel's error."""
    from perf.gpu.transform_speed import timed

    torch.manual_seed(0)
    compiled = torch.compile(reference)
    stages = []
    for resolution, channels, heads in SWIN_T_STAGES:
        tokens, per_image = window * window, (resolution // window) ** 2
        shifted = resolution > window
        qkv = torch.randn(batch * per_image, tokens, 3 * channels, device="cuda", dtype=torch.float16)
        bias = torch.randn(heads, tokens, tokens, device="cuda", dtype=torch.float16)
        mask = shift_mask(resolution, window, window // 2, "cuda").half() if shifted else None
        scale = (channels // heads) ** -0.5
        exact = reference(qkv.float(), bias.float(), mask.float() if mask is not None else None, heads, scale)
        ours = window_attention(qkv, bias, mask, heads, scale)
        row = {"resolution": resolution, "channels": channels, "heads": heads, "windows": qkv.shape[0],
               "shifted": shifted,
               "kernel_max_abs": (ours.float() - exact).abs().max().item(),
               "eager_max_abs": (reference(qkv, bias, mask, heads, scale).float() - exact).abs().max().item(),
               "cosine": torch.nn.functional.cosine_similarity(ours.float().flatten(), exact.flatten(), 0).item()}
        for name, fn in (("eager", reference), ("compiled", compiled), ("sdpa", sdpa), ("kernel", window_attention)):
            row[f"{name}_ms"] = timed(lambda: fn(qkv, bias, mask, heads, scale), repeats)
        stages.append(row)
        print(json.dumps(row), flush=True)
    total = {name: sum(r[f"{name}_ms"] for r in stages) for name in ("eager", "compiled", "sdpa", "kernel")}
    return {"batch": batch, "repeats": repeats, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "stages": stages, "ms_per_forward_one_block_per_stage": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    result = measure(args.batch, args.repeats)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ms_per_forward_one_block_per_stage"]))


if __name__ == "__main__":
    main()
