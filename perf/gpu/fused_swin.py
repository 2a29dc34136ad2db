"""Candidate: timm's Swin with every window attention in one Triton kernel, whole model, against timm's own (JSON).

    python perf/gpu/fused_swin.py --output build/fused-swin.json [--batches 1,32,128] [--model swin_tiny_...]

The kernel of `perf/gpu/window_attention.py` becomes the torch op `swin_candidate::window_attention`
(`torch.library.triton_op`, so torch.compile and Inductor see the kernel in the graph instead of a black box), and
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
import types
from pathlib import Path
from typing import Dict, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from perf.gpu.window_attention import _window_attention  # noqa: E402  (the kernel, and its checks below)
import triton  # noqa: E402


@torch.library.triton_op("swin_candidate::window_attention", mutates_args=())
def window_attention_op(qkv: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], heads: int,
                        scale: float) -> torch.Tensor:
    """`perf.gpu.window_attention.window_attention` as a torch op that Inductor traces into."""
    windows, tokens, three_channels = qkv.shape
    channels = three_channels // 3
    out = torch.empty((windows, tokens, channels), dtype=qkv.dtype, device=qkv.device)
    block = max(16, triton.next_power_of_2(tokens))
    torch.library.wrap_triton(_window_attention)[(windows * heads,)](
        qkv, bias, mask if mask is not None else bias, out, scale, tokens, channels,
        mask.shape[0] if mask is not None else 1, HEADS=heads, HEAD_DIM=channels // heads, BLOCK=block,
        HAS_MASK=mask is not None)
    return out


def _fused_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """timm's `WindowAttention.forward`, with the attention between the projections as one kernel."""
    qkv = self.qkv(x).contiguous()
    bias = self._get_rel_pos_bias()[0].to(qkv.dtype).contiguous()  # (heads, tokens, tokens)
    if mask is not None:
        mask = mask.to(qkv.dtype).contiguous()
    out = torch.ops.swin_candidate.window_attention(qkv, bias, mask, self.num_heads, float(self.scale))
    return self.proj_drop(self.proj(out))


def fuse_window_attention(model: torch.nn.Module) -> int:
    """Points every timm Swin V1 `WindowAttention` of `model` at the kernel; the number of modules changed.

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
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed


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
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    result = measure(args.model, [int(b) for b in args.batches.split(",")], args.repeats, args.checkpoint)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
