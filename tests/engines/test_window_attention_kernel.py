"""The fused window attention (`builder.engines.window_attention`) on Triton's CPU interpreter, against timm's own
attention math: windows of 7 and 12, shifted and unshifted blocks, batches of odd sizes, FP32 and FP16, and a whole
Swin; and a fused Swin stored by torch.export and loaded in a fresh process, as a served engine is."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run as written on the CPU under Triton's interpreter here, and on a GPU by tests/gpu (argv[1]: the device).
SCRIPT = """
import json, sys, torch
from builder.engines.window_attention import reference, shift_mask, window_attention
device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
rows = []
# (window, stage resolution, channels, heads, images, shifted, dtype)
for window, resolution, channels, heads, images, shifted, dtype in (
        (7, 14, 64, 2, 3, True, torch.float32), (7, 14, 64, 2, 1, False, torch.float32),
        (7, 7, 32, 1, 5, False, torch.float32), (12, 24, 64, 4, 1, True, torch.float32),
        (12, 12, 32, 2, 3, False, torch.float32), (7, 14, 64, 2, 3, True, torch.float16)):
    tokens, per_image = window * window, (resolution // window) ** 2
    qkv = torch.randn(images * per_image, tokens, 3 * channels).to(device, dtype)
    bias = torch.randn(heads, tokens, tokens).to(device, dtype)
    mask = shift_mask(resolution, window, window // 2, device).to(dtype) if shifted else None
    scale = (channels // heads) ** -0.5
    exact = reference(qkv.float(), bias.float(), mask.float() if mask is not None else None, heads, scale)
    ours = window_attention(qkv, bias, mask, heads, scale)
    rows.append({"window": window, "shifted": shifted, "windows": qkv.shape[0], "dtype": str(dtype),
                 "shape_ok": ours.shape == exact.shape, "max_abs": (ours.float() - exact).abs().max().item()})
# The FP8 form (the fp8-static engine's, the output projection's input), against the FP16 form quantized by torch.
for window, resolution, channels, heads, images, shifted in ((7, 14, 64, 2, 3, True), (12, 12, 32, 2, 3, False)):
    tokens, per_image = window * window, (resolution // window) ** 2
    qkv = torch.randn(images * per_image, tokens, 3 * channels).to(device, torch.float16)
    bias = torch.randn(heads, tokens, tokens).to(device, torch.float16)
    mask = shift_mask(resolution, window, window // 2, device).to(torch.float16) if shifted else None
    scale = (channels // heads) ** -0.5
    exact = reference(qkv.float(), bias.float(), mask.float() if mask is not None else None, heads, scale)
    inverse = (448.0 / exact.abs().max()).reshape(()).to(device)
    # The FP16 kernel's output quantized by torch: the same sums, so only the last rounding may differ.
    scaled = (window_attention(qkv, bias, mask, heads, scale).float() * inverse).clamp(-448.0, 448.0)
    want = scaled.to(torch.float8_e4m3fn).float()
    ours = torch.ops.swin_triton.window_attention_fp8(qkv, bias, mask, heads, scale, inverse, 448.0)
    dtype, ours = str(ours.dtype), ours.float()
    steps = (ours - want).abs() / want.abs().clamp(min=2.0 ** -6)  # e4m3: 3 mantissa bits
    cosine = torch.nn.functional.cosine_similarity((ours / inverse).flatten(), exact.flatten(), dim=0).item()
    rows.append({"window": window, "shifted": shifted, "fp8": dtype, "shape_ok": ours.shape == exact.shape,
                 "mismatch": (ours != want).float().mean().item(), "max_step": steps.max().item(), "cosine": cosine})
try:
    window_attention(torch.zeros(2, 49, 3 * 72, device=device), torch.zeros(3, 49, 49, device=device), None, 3, 0.2)
except ValueError as exc:
    rows.append({"refused": str(exc)})
print(json.dumps(rows))
"""


def check_fp8_rows(rows, exact_conversion: bool):
    """The FP8 form's rows of SCRIPT: FP8 output of the right shape, close to timm's math once the scale is taken
    back out, and equal to the FP16 form quantized by torch but for a value at a rounding boundary. Triton 3.8's
    interpreter converts to FP8 without the carry into the exponent and rounds on one bit (7.749 -> 4, not 7.5):
    only a GPU's conversion is held to one FP8 step everywhere."""
    assert len(rows) == 2
    for row in rows:
        assert row["fp8"] == "torch.float8_e4m3fn" and row["shape_ok"], row
        assert row["cosine"] > (0.999 if exact_conversion else 0.99), row
        assert row["mismatch"] < (0.01 if exact_conversion else 0.05), row
        assert row["max_step"] <= 0.13 or not exact_conversion, row


def test_the_fused_window_attention_matches_timms_math_on_the_interpreter():
    """The kernel against timm's math, and its FP8 form against its FP16 form quantized with the same scale."""
    import json

    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    *rows, refused = json.loads(result.stdout.strip().splitlines()[-1])
    fp8 = [row for row in rows if "fp8" in row]
    check_fp8_rows(fp8, exact_conversion=False)
    for row in rows[:-len(fp8)]:
        assert row["shape_ok"], row
        assert row["max_abs"] < (2e-2 if row["dtype"] == "torch.float16" else 1e-5), row
    assert {(r["window"], r["shifted"]) for r in rows} == {(7, True), (7, False), (12, True), (12, False)}
    assert "head size is a power of two" in refused["refused"]  # 72 channels over 3 heads: 24


WHOLE_MODEL = """
import json, sys, torch, timm
from builder.engines.window_attention import fuse_window_attention
device = sys.argv[1] if len(sys.argv) > 1 else "cpu"
torch.manual_seed(0)
kwargs = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 1, 1, 1])  # shifted blocks in stages 1-3
timms = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
fused = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
fused.load_state_dict(timms.state_dict())
modules = fuse_window_attention(fused)
timms, fused = timms.to(device), fused.to(device)
x = torch.randn(3, 3, 224, 224, device=device)
with torch.inference_mode():
    a, b = timms(x), fused(x)
odd = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=[1, 1, 1, 1],
                        num_heads=[1, 1, 1, 1])
try:
    fuse_window_attention(odd)
    refused = ""
except ValueError as exc:
    refused = str(exc)
print(json.dumps({"modules": modules, "max_abs": (a - b).abs().max().item(),
                  "top1": bool((a.argmax(1) == b.argmax(1)).all()), "refused": refused}))
"""


def test_a_whole_swin_with_the_fused_attention_gives_timms_logits():
    """`fuse_window_attention`: every WindowAttention of a timm Swin (shifted and unshifted blocks) pointed at
    the kernel's torch op gives timm's own logits, on Triton's CPU interpreter; a head size it does not take is
    refused."""
    import json

    result = subprocess.run([sys.executable, "-c", WHOLE_MODEL], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["modules"] == 8 and figures["top1"] and figures["max_abs"] < 1e-5, figures
    assert "head size 24" in figures["refused"]


ROUND_TRIP = """
import json, sys, torch, timm
from builder.engines.window_attention import fuse_window_attention
torch.manual_seed(0)
kwargs = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 1, 1, 1])
timms = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
fused = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
fused.load_state_dict(timms.state_dict())
fuse_window_attention(fused)
x = torch.randn(2, 3, 224, 224)
program = torch.export.export(fused, (x,))
ops = sorted({str(n.target) for n in program.graph.nodes if "swin_triton" in str(n.target)})
gathers = sum(str(n.target).startswith("aten.index") for n in program.graph.nodes)
torch.export.save(program, sys.argv[1])
torch.save({"x": x, "logits": timms(x).detach()}, sys.argv[2])
print(json.dumps({"ops": ops, "gathers": gathers}))
"""
LOAD = """
import json, sys, torch
import builder.engines.window_attention  # registers the op, as the served engine does before it loads
program = torch.export.load(sys.argv[1]).module()
saved = torch.load(sys.argv[2])
with torch.inference_mode():
    got = program(saved["x"])
print(json.dumps({"max_abs": (got - saved["logits"]).abs().max().item()}))
"""


def test_a_fused_swin_is_stored_by_torch_export_and_loads_where_the_op_is_registered(tmp_path):
    """The op survives torch.export, a saved program and a fresh process (a stub's), on the CPU (where the op runs
    timm's math), with each block's relative-position bias stored gathered; without the op's module imported the
    program does not load."""
    import json

    program, data = str(tmp_path / "model.pt2"), str(tmp_path / "data.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    made = subprocess.run([sys.executable, "-c", ROUND_TRIP, program, data], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    made = json.loads(made.stdout.strip().splitlines()[-1])
    assert made["ops"] == ["swin_triton.window_attention.default"]
    assert made["gathers"] == 0  # each block's bias is a constant of the program, not gathered at every call
    loaded = subprocess.run([sys.executable, "-c", LOAD, program, data], capture_output=True, text=True,
                            timeout=600, cwd=ROOT, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1])["max_abs"] < 1e-5
    bare = subprocess.run([sys.executable, "-c", LOAD.replace("import builder.engines.window_attention", "pass"),
                           program, data], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert bare.returncode != 0  # the op is part of the stored program: its module must be imported first


def test_every_swin_v1_timm_ships_is_taken_and_swin_v2_is_left_to_timm():
    """Every `swin_*` timm ships (windows of 7 and 12, 224 and 384 inputs, tiny to large, the S3 searches) has all
    its window attention taken by the kernel; a Swin V2 (cosine attention) has none, so `auto` keeps timm's
    program for it (the race's row says why)."""
    import timm
    import torch
    from timm.models.swin_transformer import WindowAttention

    from builder.engines.window_attention import fuse_window_attention

    names = timm.list_models("swin_*")
    assert {"swin_tiny_patch4_window7_224", "swin_large_patch4_window12_384"} <= set(names)
    for name in names:
        with torch.device("meta"):  # shapes only: no weights are made
            model = timm.create_model(name, pretrained=False)
        modules = sum(isinstance(m, WindowAttention) for m in model.modules())
        assert fuse_window_attention(model) == modules > 0, name
    with torch.device("meta"):
        assert fuse_window_attention(timm.create_model("swinv2_tiny_window8_256", pretrained=False)) == 0


def test_the_fused_swin_benchmarks_variants_keep_timms_sums_on_the_cpu():
    """perf/gpu/fused_swin.py's candidates for the memory-bound rest: the patch embedding as one matrix product and
    fc1 with its GELU in the GEMM's epilogue give timm's logits (on the CPU the epilogue's GELU is exact), and
    torch.export stores the epilogue op whole."""
    import timm
    import torch

    from perf.gpu.fused_swin import apply_variant

    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    x = torch.randn(2, 3, 224, 224)
    want = reference(x)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    model.load_state_dict(reference.state_dict())
    apply_variant(model, "patchify+gelu")
    assert (model(x) - want).abs().max().item() < 1e-5
    program = torch.export.export(model, (x,))
    assert sum("linear_gelu" in str(node.target) for node in program.graph.nodes) == 4  # one per block's MLP


def test_the_fused_swin_benchmarks_fp8_variant_is_the_engines_static_fp8():
    """perf/gpu/fused_swin.py's `fp8` candidate is the engine's fp8-static: the model exported with a dynamic
    batch, every Linear layer but the head calibrated on the bundled photos and rewritten by the served runner; on
    the CPU in FP32 (torch's CPU FP8 matrix product), close to FP32 (random weights: cosine, not top-1). On the
    fused program each output projection takes its FP8 input from the attention op's FP8 form."""
    import timm
    import torch

    from builder.engines import static_fp8
    from builder.engines.torch_runner import _fp8_linear, _fp8_linear_quantized
    from perf.gpu.fused_swin import apply_variant, photos, static_fp8_program

    torch.manual_seed(0)
    kwargs = dict(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 1, 1, 1])
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    images = photos(reference)
    amax = static_fp8.calibrate(reference, images.numpy())
    assert len(amax) == 35 and "head.fc" not in amax and all(value > 0 for value in amax.values())
    module = static_fp8_program(reference, amax, images[:2])
    assert sum(n.target is _fp8_linear for n in module.graph.nodes) == 35
    fused = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs).eval()
    fused.load_state_dict(reference.state_dict())
    apply_variant(fused, "fused")
    fused = static_fp8_program(fused, amax, images[:2])
    # The 8 blocks' output projections read the attention kernel's FP8 output: no quantize of their own.
    targets = [str(n.target) for n in fused.graph.nodes] + [n.target for n in fused.graph.nodes]
    assert targets.count(_fp8_linear) == 27 and targets.count(_fp8_linear_quantized) == 8
    assert targets.count("swin_triton.window_attention_fp8.default") == 8
    with torch.inference_mode():
        want = reference(images)
        for quantized in (module, fused):
            cosine = torch.nn.functional.cosine_similarity(quantized(images), want, dim=1).min().item()
            assert cosine > 0.99, cosine
