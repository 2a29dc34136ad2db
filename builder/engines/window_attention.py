"""Swin's window attention in one Triton kernel, as the torch op `swin_triton::window_attention`.

timm's `WindowAttention` runs, per block: q*scale, q @ kᵀ, + the relative-position bias, + the shift mask (shifted
blocks), softmax, @ v, then a transpose and reshape back to (windows, tokens, channels). Under torch.compile that
is several kernels, with the (windows, heads, 49, 49) scores written to memory and read back between them; timm's
`TIMM_FUSED_ATTN=2` (SDPA with the bias as a float mask) was slower on an H100 (9,808 against 10,882 img/s).

The kernel takes the qkv projection's output as it is, (windows, tokens, 3 * channels), and writes the output in the
(windows, tokens, channels) layout the next projection reads, so no permute or transpose is left: one program per
window, head and block of up to 64 query rows loads q, k and v (tokens padded to a power of two, at least 16), adds
the bias and the mask in registers, takes the softmax in FP32, multiplies by v and stores. The scores never reach
memory. On an H100 a timm Swin-T with every window attention pointed at it (`fuse_window_attention`) did 13,722
img/s at batch 128 against 11,075 for timm's, both compiled (perf/results/h100-as-built).

The op is a `torch.library.custom_op` with a fake (shape-only) implementation: `torch.export` stores it in a
program, and Inductor calls it as one opaque kernel and compiles the rest around it, CUDA graphs included. A stored
program that holds it loads where this module has been imported (it registers the op). Not a `triton_op`, which
Inductor traces into: compiled from a stored program with a dynamic batch (the served engine's way), that form failed
in every TorchInductor compile of `make test-gpu` on an H100 (torch 2.11, 2026-12-07), while the kernel itself passed;
Inductor does not fuse a user kernel with its own either way. On the CPU the op runs timm's own math (`reference`);
under `TRITON_INTERPRET=1` it runs the kernel itself (the tests). `perf/gpu/window_attention.py` and `fused_swin.py`
time it. Its FP8 form (`swin_triton::window_attention_fp8`) stores the output as the output projection's FP8 input
with the static scale of the fp8-static engine (`torch_runner.quantize_static_fp8` swaps it in).
"""

from __future__ import annotations

import os
import types
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _window_attention(qkv_ptr, bias_ptr, mask_ptr, out_ptr, inverse_ptr, bound, scale, tokens, channels,
                      windows_per_image, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_Q: tl.constexpr, HAS_MASK: tl.constexpr, QUANTIZE: tl.constexpr):
    program = tl.program_id(0)
    window, head = program // HEADS, program % HEADS
    queries = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # this program's query rows
    keys = tl.arange(0, BLOCK)  # every token of the window
    dims = tl.arange(0, HEAD_DIM)
    query_in, key_in = queries < tokens, keys < tokens
    # q, k and v of this head, read where the qkv projection left them: no permute.
    start = qkv_ptr + window * tokens * 3 * channels + head * HEAD_DIM
    q = tl.load(start + queries[:, None] * (3 * channels) + dims[None, :], mask=query_in[:, None], other=0.0)
    key_offsets = keys[:, None] * (3 * channels) + dims[None, :]
    k = tl.load(start + channels + key_offsets, mask=key_in[:, None], other=0.0)
    v = tl.load(start + 2 * channels + key_offsets, mask=key_in[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    pairs = queries[:, None] * tokens + keys[None, :]
    both = query_in[:, None] & key_in[None, :]
    scores += tl.load(bias_ptr + head * tokens * tokens + pairs, mask=both, other=0.0).to(tl.float32)
    if HAS_MASK:  # the shifted block's mask of this window (windows are image-major: window % windows_per_image)
        scores += tl.load(mask_ptr + (window % windows_per_image) * tokens * tokens + pairs, mask=both,
                          other=0.0).to(tl.float32)
    scores = tl.where(key_in[None, :], scores, float("-inf"))  # the padding tokens get no weight
    weights = tl.exp(scores - tl.max(scores, 1)[:, None])
    weights = weights / tl.sum(weights, 1)[:, None]
    out = tl.dot(weights.to(v.dtype), v)
    if QUANTIZE:  # the output projection's FP8 input, with its static scale: no pass of its own
        out = tl.clamp(out.to(tl.float32) * tl.load(inverse_ptr), -bound, bound)
    target = out_ptr + window * tokens * channels + head * HEAD_DIM + queries[:, None] * channels + dims[None, :]
    tl.store(target, out.to(out_ptr.dtype.element_ty), mask=query_in[:, None])


# Query rows per program: a window of 7 (49 tokens, padded to 64) is one program per head; a window of 12 (144
# tokens, padded to 256) three, so that one program's scores (rows x 256 in FP32) stay in registers.
MAX_QUERY_BLOCK = 64


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
    return _launch(_window_attention, qkv, bias.contiguous(), mask.contiguous() if mask is not None else None,
                   heads, scale)


def _launch(kernel, qkv: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], heads: int,
            scale: float, inverse: Optional[torch.Tensor] = None, bound: float = 0.0) -> torch.Tensor:
    """The kernel on one program per window, head and block of query rows; with `inverse` (a one-element tensor),
    the output is `clamp(out * inverse, -bound, bound)` in float8_e4m3fn."""
    windows, tokens, three_channels = qkv.shape
    channels = three_channels // 3
    dtype = qkv.dtype if inverse is None else torch.float8_e4m3fn
    out = torch.empty((windows, tokens, channels), dtype=dtype, device=qkv.device)
    block = max(16, triton.next_power_of_2(tokens))
    block_q = min(block, MAX_QUERY_BLOCK)
    kernel[(windows * heads, triton.cdiv(tokens, block_q))](
        qkv, bias, mask if mask is not None else bias, out, inverse if inverse is not None else bias, bound, scale,
        tokens, channels, mask.shape[0] if mask is not None else 1, HEADS=heads, HEAD_DIM=channels // heads,
        BLOCK=block, BLOCK_Q=block_q, HAS_MASK=mask is not None, QUANTIZE=inverse is not None)
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


@torch.library.custom_op("swin_triton::window_attention", mutates_args=())
def window_attention_op(qkv: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], heads: int,
                        scale: float) -> torch.Tensor:
    """`window_attention` as a torch op: one opaque kernel to torch.export and Inductor."""
    return _launch(_window_attention, qkv, bias, mask, heads, scale)


@window_attention_op.register_fake
def _window_attention_shape(qkv, bias, mask, heads, scale):
    """What tracing (torch.export, Inductor) sees: the output's shape and dtype, (windows, tokens, channels)."""
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3))


def _window_attention_cpu(qkv, bias, mask, heads, scale):
    """On the CPU (CPU instances, the tests): timm's own math, so a fused program runs wherever it is loaded."""
    return reference(qkv, bias, mask, heads, scale)


@torch.library.custom_op("swin_triton::window_attention_fp8", mutates_args=())
def window_attention_fp8_op(qkv: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], heads: int,
                            scale: float, inverse: torch.Tensor, bound: float) -> torch.Tensor:
    """The op writing its output as the output projection's FP8 (e4m3) input, `clamp(out * inverse, -bound,
    bound)`: the static scale's quantize in the kernel that produces the input (the served runner's fp8-static
    rewrite puts it there, `torch_runner.quantize_static_fp8`), not a pass of its own after the opaque op."""
    return _launch(_window_attention, qkv, bias, mask, heads, scale, inverse, bound)


@window_attention_fp8_op.register_fake
def _window_attention_fp8_shape(qkv, bias, mask, heads, scale, inverse, bound):
    """The output's shape, (windows, tokens, channels), in float8_e4m3fn."""
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3), dtype=torch.float8_e4m3fn)


def _window_attention_fp8_cpu(qkv, bias, mask, heads, scale, inverse, bound):
    """On the CPU: timm's math, then the same quantize."""
    out = reference(qkv, bias, mask, heads, scale).float() * inverse.float()
    return out.clamp(-bound, bound).to(torch.float8_e4m3fn)


if os.environ.get("TRITON_INTERPRET") != "1":  # under Triton's interpreter the kernel itself runs on the CPU
    window_attention_op.register_kernel("cpu")(_window_attention_cpu)
    window_attention_fp8_op.register_kernel("cpu")(_window_attention_fp8_cpu)


def _fused_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's `WindowAttention.forward`, with the attention between the projections as one kernel."""
    qkv = self.qkv(x).contiguous()
    # No cast to qkv's dtype: torch.export stores a cast as an assertion of the dtype it saw (FP32), and the served
    # engine converts the whole program, the bias and the mask buffers with it, to FP16 after export; the
    # stored FP32 assertion then failed every TorchInductor compile of the fused program on an H100.
    bias = self.fused_bias  # (heads, tokens, tokens), taken from the table once by `fuse_window_attention`
    if mask is not None:
        mask = mask.contiguous()
    out = torch.ops.swin_triton.window_attention(qkv, bias, mask, self.num_heads, float(self.scale))
    return self.proj_drop(self.proj(out))


def fuse_window_attention(model: torch.nn.Module) -> int:
    """Points every timm Swin V1 `WindowAttention` of `model` at the kernel; the number of modules changed.

    Each module's relative-position bias is gathered from its table once, here, into a buffer (`fused_bias`, not
    in the state dict), instead of by a kernel of its own in every block of every forward pass (timm's way; 12
    launches a batch for Swin-T): fuse a model after its weights are loaded.

    Raises:
        ValueError: a head size the kernel does not take (a power of two, at least 16).
    """
    from timm.models.swin_transformer import WindowAttention

    changed = 0
    for module in model.modules():
        if isinstance(module, WindowAttention):
            head_dim = module.qkv.out_features // 3 // module.num_heads
            if head_dim < 16 or head_dim & (head_dim - 1):
                raise ValueError(f"head size {head_dim}: the kernel takes powers of two from 16")
            with torch.no_grad():
                bias = module._get_rel_pos_bias()[0].contiguous()
            module.register_buffer("fused_bias", bias, persistent=False)
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed
