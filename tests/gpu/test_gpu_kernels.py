"""The fused window attention's Triton kernel on the GPU: the scripts the CPU tests run under Triton's interpreter
(tests/engines/test_window_attention_kernel.py), here compiled for this GPU; and a fused Swin-T against timm's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engines.test_window_attention_kernel import SCRIPT, WHOLE_MODEL, check_fp8_rows

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def _run(script: str) -> list:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", script, "cuda"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_kernel_matches_timms_math_on_the_gpu():
    """Windows of 7 and 12, shifted and unshifted, odd window counts, FP32 (TF32 products) and FP16; the FP8 form
    within one FP8 step of the FP16 form quantized by torch."""
    *rows, refused = _run(SCRIPT)
    fp8 = [row for row in rows if "fp8" in row]
    check_fp8_rows(fp8, exact_conversion=True)
    for row in rows[:-len(fp8)]:
        assert row["shape_ok"], row
        assert row["max_abs"] < 2e-2, row  # tl.dot takes FP32 as TF32 on tensor cores
    assert {(r["window"], r["shifted"]) for r in rows} == {(7, True), (7, False), (12, True), (12, False)}
    assert "head size is a power of two" in refused["refused"]
    print("window attention on the GPU:", json.dumps(rows))


def test_a_fused_swin_gives_timms_logits_on_the_gpu():
    figures = _run(WHOLE_MODEL)
    assert figures["modules"] == 8 and figures["top1"] and figures["max_abs"] < 5e-2, figures
    print("fused Swin on the GPU:", json.dumps(figures))


def test_a_stored_fused_program_compiles_and_replays_as_served(tiny_model, tmp_path):
    """What failed on an H100 while the op was a `triton_op`: a stored program holding the op, compiled by
    TorchInductor with a dynamic batch and replayed from the engine's own CUDA graphs (the served engine's way),
    in FP16, against the same model with timm's attention in FP32 eager, at every batch size."""
    import copy

    import torch

    from builder.compare import compare_logits
    from builder.core.contract import Contract
    from builder.engines.inductor import export_program
    from builder.engines.torch_runner import TorchEngine
    from builder.engines.window_attention import fuse_window_attention
    from conftest import MAX_BATCH

    fused = copy.deepcopy(tiny_model)
    assert fuse_window_attention(fused.module) > 0
    export_program(fused, Contract("swin_tiny_patch4_window7_224", (224, 224), 1000), tmp_path / "model.pt2",
                   MAX_BATCH)
    params = {"precision": "fp16", "batch_buckets": "1,2,4,8", "input_dims": "3,224,224", "intra_op_threads": "1",
              "compile": "reduce-overhead", "window_attention": "fused"}
    engine = TorchEngine(str(tmp_path), "cuda", params, MAX_BATCH)
    assert sorted(engine.graphs) == [1, 2, 4, 8]
    reference = copy.deepcopy(tiny_model.module).cuda()
    torch.manual_seed(0)
    for rows in (1, 3, 8):
        x = torch.randn(rows, 3, 224, 224, device="cuda")
        with torch.inference_mode():
            want = reference(x)
        figures = compare_logits(want.cpu().numpy(), engine(x).cpu().numpy())
        assert figures["min_cosine"] > 0.999 and figures["max_abs"] < 0.05, (rows, figures)
