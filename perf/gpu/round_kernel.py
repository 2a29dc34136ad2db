"""Candidate: Pillow's per-pass rounding of the GPU transform as one hand-written Triton kernel.

`gpu_transform.pillow_round(high, low)` runs seven elementwise kernels in eager mode; `torch.compile` fuses
them into one, but its per-call host time (about 1 ms a batch on an H200, `perf/results/h200-photo-batching`)
cancels the gain at the photo path's batch sizes. This kernel is the fused one without guards: one launch,
the two halves read where `tensor_split` left them (rows of `high` and `low` with their own strides), the
same integer arithmetic: (high * 4096 + low + 2**21) >> 22, clipped to 0..255, as int32. Measured by
`perf/gpu/transform_speed.py` (candidate `triton rounding`); runs on the CPU under `TRITON_INTERPRET=1`.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _round(high_ptr, low_ptr, out_ptr, n, cols, high_row, low_row, SPLIT: tl.constexpr, SHIFT: tl.constexpr,
           BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = i < n
    row, col = i // cols, i % cols
    high = tl.load(high_ptr + row * high_row + col, mask=inside, other=0.0).to(tl.int32)
    low = tl.load(low_ptr + row * low_row + col, mask=inside, other=0.0).to(tl.int32)
    total = (high * SPLIT + low + (1 << (SHIFT - 1))) >> SHIFT
    tl.store(out_ptr + i, tl.minimum(tl.maximum(total, 0), 255), mask=inside)


def pillow_round(high: torch.Tensor, low: torch.Tensor, split: int = 4096, shift: int = 22) -> torch.Tensor:
    """`gpu_transform.pillow_round` in one kernel: 2-D views whose rows are contiguous (as tensor_split gives)."""
    if high.shape != low.shape or high.dim() != 2 or high.stride(1) != 1 or low.stride(1) != 1:
        raise ValueError("pillow_round takes two 2-D views of the same shape with contiguous rows")
    out = torch.empty(high.shape, dtype=torch.int32, device=high.device)
    n = out.numel()
    _round[(triton.cdiv(n, BLOCK),)](high, low, out, n, high.shape[1], high.stride(0), low.stride(0),
                                     SPLIT=split, SHIFT=shift, BLOCK=BLOCK)
    return out
