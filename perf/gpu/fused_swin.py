"""Candidate: timm's Swin with every window attention in one Triton kernel, whole model, against timm's own (JSON).

    python perf/gpu/fused_swin.py --output build/fused-swin.json [--batches 1,32,128] [--model swin_tiny_...]

The kernel is the torch op `swin_triton::window_attention` of `builder.engines.window_attention`
(a `torch.library.custom_op`: torch.compile and Inductor call it as one kernel and compile the rest around it), and
`fuse_window_attention(model)` points every `WindowAttention.forward` of a timm Swin at it: the qkv projection,
the op, the output projection; no permute, score tensor or softmax pass is left between them.

Two more candidates for the memory-bound rest, on top of the fused attention (`--variants`): `patchify`, the
patch embedding's 4x4/4 convolution as a reshape and one matrix product (the same sums; cuDNN ran it as a slow
`precomputed_convolve_sgemm` in the H200 kernel mix), and `gelu`, each MLP's fc1 with its bias and GELU in
cuBLASLt's epilogue (`torch._addmm_activation`, tanh-approximated GELU, in a custom op so that Inductor keeps it
whole) instead of a separate pass over the 4C-wide hidden activations. `fp8`: every Linear layer but the head as
an FP8 (e4m3) matrix product with **static** scales (`torch._scaled_mm`, per-tensor): the weights' from their own
absolute maximum, each layer's input scale calibrated once on the bundled photos (`calibrate_fp8`), so no amax
pass runs per batch and Inductor can fold the quantization (scale, clamp, cast) into the kernel that produces the
layer's input (LayerNorm, GELU).

Every model is compiled alike (FP16, torch.compile in Inductor's default mode), checked
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
from builder.core.contract import DEFAULT_MODEL  # noqa: E402
from builder.engines.window_attention import fuse_window_attention  # noqa: E402
import triton  # noqa: E402


@torch.library.custom_op("swin_exp::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x @ weightᵀ + bias) with the bias and the (tanh) GELU in cuBLASLt's epilogue."""
    rows = x.reshape(-1, x.shape[-1])
    return torch._addmm_activation(bias, rows, weight.t(), use_gelu=True).view(*x.shape[:-1], weight.shape[0])


@linear_gelu.register_fake
def _linear_gelu_shape(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _mlp_forward(self, x):
    x = self.drop1(torch.ops.swin_exp.linear_gelu(x, self.fc1.weight, self.fc1.bias))
    return self.drop2(self.fc2(self.norm(x)))


def _patchify_forward(self, x):
    """timm's PatchEmbed (NHWC out) with its stride-p pxp convolution as patches x flattened kernel."""
    batch, channels, height, width = x.shape
    p = self.patch_size[0]
    patches = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch, height // p, width // p, channels * p * p)
    out = torch.nn.functional.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
    return self.norm(out)


FP8_MAX = 448.0  # the largest float8_e4m3fn


class StaticFP8Linear(torch.nn.Module):
    """A Linear layer as one FP8 matrix product with static per-tensor scales; bias and output in `dtype`."""

    def __init__(self, linear: torch.nn.Linear, input_amax: float, dtype: torch.dtype):
        super().__init__()
        weight = linear.weight.detach().float()
        weight_scale = weight.abs().amax().clamp(min=1e-12) / FP8_MAX
        # (out, in) row-major: its transpose is the column-major right operand _scaled_mm takes.
        self.register_buffer("weight", (weight / weight_scale).to(torch.float8_e4m3fn))
        self.register_buffer("weight_scale", weight_scale.reshape(()))
        input_scale = torch.tensor(max(input_amax, 1e-12) / FP8_MAX, device=weight.device)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("input_inverse", 1.0 / input_scale)
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        quantized = (rows.float() * self.input_inverse).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=self.input_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=self.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])


def calibrate_fp8(model, photos: torch.Tensor, keep=("head",)) -> dict:
    """Each Linear layer's input absolute maximum over `photos` (one eager pass), by module name."""
    amax, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith(keep):
            def record(_, inputs, __, name=name):
                amax[name] = max(amax.get(name, 0.0), inputs[0].detach().abs().max().item())
            hooks.append(module.register_forward_hook(record))
    with torch.inference_mode():
        model(photos)
    for hook in hooks:
        hook.remove()
    return amax


def to_static_fp8(model, amax: dict, dtype: torch.dtype) -> int:
    """Replaces every calibrated Linear layer of `model` with a StaticFP8Linear; the number replaced."""
    for name, value in amax.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, StaticFP8Linear(getattr(parent, child), value, dtype))
    return len(amax)


def apply_variant(model, variant: str) -> None:
    """Points `model`'s modules at the variant's code (`fused`, `+patchify`, `+gelu`, in any combination; `fp8` is
    applied by `measure`, after calibration)."""
    from timm.layers import Mlp

    parts = variant.split("+")
    if "fused" in parts:
        fuse_window_attention(model)
    if "patchify" in parts:
        embed = model.patch_embed
        assert embed.patch_size[0] == embed.patch_size[1] and not embed.flatten and not embed.dynamic_img_pad
        embed.forward = types.MethodType(_patchify_forward, embed)
    if "gelu" in parts:
        for module in model.modules():
            if isinstance(module, Mlp) and isinstance(module.act, torch.nn.GELU):
                module.forward = types.MethodType(_mlp_forward, module)


def measure(model_name: str, batches, repeats: int, checkpoint: Optional[str] = None,
            variants=("timm", "fused")) -> Dict:
    """Each variant, gated against FP32 eager and timed per batch size; a variant that fails (a candidate the
    GPU or torch does not take) is a row with its error, and the others still run."""
    import timm

    from perf.gpu.transform_speed import timed

    torch.manual_seed(0)
    reference = timm.create_model(model_name, pretrained=False, checkpoint_path=checkpoint or "").eval().cuda()
    rows, engines, calibration = [], {}, {}

    def failed(name: str, exc: Exception) -> None:
        engines.pop(name, None)
        rows.append({"engine": name, "error": f"{type(exc).__name__}: {exc}"[:800]})
        print(json.dumps(rows[-1]), flush=True)

    for variant in variants:
        try:
            engines[variant], calibration[variant] = _variant_engine(model_name, reference, variant)
        except Exception as exc:  # noqa: BLE001 (a candidate's failure is its row)
            failed(variant, exc)
    with torch.inference_mode():
        x = torch.randn(max(batches), 3, 224, 224, device="cuda")
        checked = x[:batches[0]]  # the first timed size, so that no other shape is compiled for the check
        exact = reference(checked).float()
        for name, engine in list(engines.items()):
            try:
                got = engine(checked.half()).float()  # each compiles here
            except Exception as exc:  # noqa: BLE001
                failed(name, exc)
                continue
            cosine = torch.nn.functional.cosine_similarity(got, exact, dim=1).min().item()
            rows.append({"engine": name, "max_abs": (got - exact).abs().max().item(), "min_cosine": cosine,
                         "top1_agreement": (got.argmax(1) == exact.argmax(1)).float().mean().item()})
            print(json.dumps(rows[-1]), flush=True)
        for batch in batches:
            xb = x[:batch].half().contiguous()
            for name, engine in engines.items():
                ms = timed(lambda: engine(xb), repeats)
                rows.append({"engine": name, "batch": batch, "ms": ms, "img_per_s": batch * 1000 / ms})
                print(json.dumps(rows[-1]), flush=True)
    return {"model": model_name, "fused_modules": sum(type(m).__name__ == "WindowAttention"
                                                      for m in reference.modules()),
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "rows": rows, "fp8_calibration": {k: v for k, v in calibration.items() if v}}


def _variant_engine(model_name: str, reference, variant: str):
    """The variant's FP16 model compiled (lazily: at its first call), and its FP8 calibration if any."""
    import timm

    model = timm.create_model(model_name, pretrained=False).eval().cuda().half()
    model.load_state_dict(reference.state_dict())
    apply_variant(model, variant)
    calibration = None
    if "fp8" in variant.split("+"):
        amax = calibrate_fp8(model, photos(reference).cuda().half())
        calibration = {"layers": to_static_fp8(model, amax, torch.float16),
                       "input_amax": {k: round(v, 4) for k, v in amax.items()}}
    return torch.compile(model), calibration


def photos(model) -> torch.Tensor:
    """The bundled photos through timm's eval transform (the exact preprocessing): the calibration set."""
    import timm

    from builder.core.imaging import PreprocessParams
    from builder.core.photos import photo_batch

    return torch.from_numpy(photo_batch(PreprocessParams.from_timm(timm.data.resolve_data_config({}, model=model))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--variants", default="timm,fused", help="comma-separated: timm, fused, fused+patchify, "
                        "fused+gelu, fused+patchify+gelu, fused+fp8, ...")
    args = parser.parse_args()
    result = measure(args.model, [int(b) for b in args.batches.split(",")], args.repeats, args.checkpoint,
                     args.variants.split(","))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
