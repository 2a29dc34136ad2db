"""Candidate: Swin's window attention in one Triton kernel, timed against timm's own attention math (JSON).

    python perf/gpu/window_attention.py --output build/window-attention.json [--batch 128] [--repeats 50]

timm's `WindowAttention` runs, per block: q*scale, q @ kᵀ, + the relative-position bias, + the shift mask (shifted
blocks), softmax, @ v, then a transpose and reshape back to (windows, tokens, channels). Under torch.compile that
is several kernels, with the (windows, heads, 49, 49) scores written to memory and read back between them; timm's
`TIMM_FUSED_ATTN=2` (SDPA with the bias as a float mask) was slower on an H100 (9,808 against 10,882 img/s).

This kernel takes the qkv projection's output as it is, (windows, tokens, 3 * channels), and writes the output in
the (windows, tokens, channels) layout the next projection reads, so no permute or transpose is left: one program
per window and head loads q, k and v (tokens padded to a power of two, at least 16), adds the bias and the mask
in registers, takes the softmax in FP32, multiplies by v and stores. The scores never reach memory.

Timed here on Swin-T's four stages at `--batch` images (windows of 7, head size 32), each as timm's eager code,
that code under torch.compile, SDPA with a float mask, and the kernel, with CUDA events; the kernel's figures
against timm's eager FP32 math on the same inputs. Runs on the CPU under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path: the checkout's perf package


@triton.jit
def _window_attention(qkv_ptr, bias_ptr, mask_ptr, out_ptr, scale, tokens, channels, windows_per_image,
                      HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_MASK: tl.constexpr):
    program = tl.program_id(0)
    window, head = program // HEADS, program % HEADS
    rows = tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    inside = rows < tokens
    # q, k and v of this head, read where the qkv projection left them: no permute.
    start = qkv_ptr + window * tokens * 3 * channels + head * HEAD_DIM
    offsets = rows[:, None] * (3 * channels) + dims[None, :]
    q = tl.load(start + offsets, mask=inside[:, None], other=0.0)
    k = tl.load(start + channels + offsets, mask=inside[:, None], other=0.0)
    v = tl.load(start + 2 * channels + offsets, mask=inside[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    pairs = rows[:, None] * tokens + rows[None, :]
    both = inside[:, None] & inside[None, :]
    scores += tl.load(bias_ptr + head * tokens * tokens + pairs, mask=both, other=0.0).to(tl.float32)
    if HAS_MASK:  # the shifted block's mask of this window (windows are image-major: window % windows_per_image)
        scores += tl.load(mask_ptr + (window % windows_per_image) * tokens * tokens + pairs, mask=both,
                          other=0.0).to(tl.float32)
    scores = tl.where(inside[None, :], scores, float("-inf"))  # the padding tokens get no weight
    weights = tl.exp(scores - tl.max(scores, 1)[:, None])
    weights = weights / tl.sum(weights, 1)[:, None]
    out = tl.dot(weights.to(v.dtype), v)
    target = out_ptr + window * tokens * channels + head * HEAD_DIM + rows[:, None] * channels + dims[None, :]
    tl.store(target, out.to(out_ptr.dtype.element_ty), mask=inside[:, None])


def window_attention(qkv: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], heads: int,
                     scale: float) -> torch.Tensor:
    """Window attention of timm's `WindowAttention` from its qkv projection's output, in one kernel.

    Args:
        qkv: (windows, tokens, 3 * channels), contiguous: the output of `attn.qkv`.
        bias: (heads, tokens, tokens): `attn._get_rel_pos_bias()` without its leading 1.
        mask: (windows per image, tokens, tokens) of the shifted block (0 or -100), or None.
        heads: Attention heads; channels / heads is the head size (a power of two, at least 16).
        scale: head size ** -0.5.

    Returns:
        (windows, tokens, channels), as timm's `(attn @ v).transpose(1, 2).reshape(...)` gives it.
    """
    windows, tokens, three_channels = qkv.shape
    channels = three_channels // 3
    head_dim = channels // heads
    if not qkv.is_contiguous() or head_dim * heads != channels or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"window_attention takes a contiguous qkv whose head size is a power of two >= 16 "
                         f"(got {tuple(qkv.shape)} with {heads} heads)")
    if mask is not None and windows % mask.shape[0]:
        raise ValueError(f"{windows} windows are not whole images of {mask.shape[0]} windows")
    out = torch.empty((windows, tokens, channels), dtype=qkv.dtype, device=qkv.device)
    block = max(16, triton.next_power_of_2(tokens))
    _window_attention[(windows * heads,)](
        qkv, bias.contiguous(), mask.contiguous() if mask is not None else bias, out, scale, tokens, channels,
        mask.shape[0] if mask is not None else 1, HEADS=heads, HEAD_DIM=head_dim, BLOCK=block,
        HAS_MASK=mask is not None)
    return out


def reference(qkv: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], heads: int,
              scale: float) -> torch.Tensor:
    """timm's `WindowAttention.forward` from the qkv projection on (its non-fused path), without the projections."""
    windows, tokens, three_channels = qkv.shape
    qkv = qkv.reshape(windows, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
    if mask is not None:
        count = mask.shape[0]
        attn = attn.view(-1, count, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, tokens, tokens)
    attn = attn.softmax(-1)
    return (attn @ v).transpose(1, 2).reshape(windows, tokens, -1)


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


def shift_mask(resolution: int, window: int, shift: int, device) -> torch.Tensor:
    """The shifted block's mask as timm builds it: (windows, tokens, tokens) of 0 and -100."""
    regions = torch.zeros(resolution, resolution, device=device)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[rows, cols] = count
            count += 1
    tiles = regions.view(resolution // window, window, resolution // window, window).permute(0, 2, 1, 3)
    tiles = tiles.reshape(-1, window * window)
    mask = tiles.unsqueeze(1) - tiles.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


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
