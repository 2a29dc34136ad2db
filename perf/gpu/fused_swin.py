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
whole) instead of a separate pass over the 4C-wide hidden activations. `fp8`: the engine's `fp8-static`, every
Linear layer but the head as an FP8 (e4m3) matrix product with **static** per-tensor scales (`torch._scaled_mm`):
the weights' from their own absolute maximum, each layer's input scale calibrated once on the bundled photos
(`builder/engines/static_fp8.py`), so no amax pass runs per batch and Inductor can fold the quantization (scale,
clamp, cast) into the kernel that produces the layer's input (LayerNorm, GELU).

Every model is compiled alike (FP16, torch.compile in Inductor's default mode), checked
against timm's FP32 eager logits on the bundled photos (max abs, cosine, top-1 agreement) and timed at each
batch size with CUDA events. Random weights
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
from builder.engines import static_fp8  # noqa: E402
from builder.engines.torch_runner import TUNINGS, quantize_static_fp8  # noqa: E402
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
        # The bundled photos, repeated to the first timed size (no other shape is compiled for the check): the fp8
        # variants' scales were calibrated on photos, and random inputs would saturate them.
        shots = photos(reference).cuda()
        checked = shots.repeat(-(-batches[0] // len(shots)), 1, 1, 1)[:batches[0]]
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
    """The variant's FP16 model compiled (lazily: at its first call), and its FP8 calibration if any. `fp8` is the
    engine's own fp8-static: the model exported with a dynamic batch, its Linear calls rewritten by the served
    runner (`torch_runner.quantize_static_fp8`) with the build's calibration on the bundled photos."""
    import timm

    model = timm.create_model(model_name, pretrained=False).eval().cuda().half()
    model.load_state_dict(reference.state_dict())
    apply_variant(model, variant)
    # `autotune`: Inductor's max-autotune (the engine's `--inductor-tuning max-autotune`), whose Triton matrix
    # product templates can take the pointwise work after a product (GELU, FP8 quantize) into their epilogue.
    options = TUNINGS["max-autotune"] if "autotune" in variant.split("+") else None
    if "fp8" not in variant.split("+"):
        return torch.compile(model, options=options), None
    amax = static_fp8.calibrate(reference, photos(reference).numpy())
    module = static_fp8_program(model, amax, torch.zeros(2, 3, 224, 224, device="cuda", dtype=torch.float16))
    return torch.compile(module, dynamic=True, options=options), {"layers": len(amax), "input_amax": amax}


def static_fp8_program(model, amax: Dict[str, float], sample: torch.Tensor):
    """`model` exported (batch dynamic, as the engine's program) with its calibrated Linear calls in FP8."""
    from torch.export import Dim

    program = torch.export.export(model, (sample,), dynamic_shapes=({0: Dim("batch", min=1, max=1024)},))
    module = program.module()
    quantize_static_fp8(module, amax)  # on a fused model, the projections read the attention kernel's FP8
    return module


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
                        "fused+gelu, fused+patchify+gelu, fused+fp8, fused+autotune, fused+fp8+autotune, ...")
    args = parser.parse_args()
    result = measure(args.model, [int(b) for b in args.batches.split(",")], args.repeats, args.checkpoint,
                     args.variants.split(","))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
