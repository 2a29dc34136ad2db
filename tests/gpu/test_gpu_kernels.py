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


@pytest.mark.parametrize("precision", ["fp16", "fp8-static"])
def test_a_stored_fused_program_compiles_and_replays_as_served(tiny_model, tmp_path, precision):
    """What failed on an H100 while the op was a `triton_op`: a stored program holding the op, compiled by
    TorchInductor with a dynamic batch and replayed from the engine's own CUDA graphs (the served engine's way),
    in FP16, against the same model with timm's attention in FP32 eager, at every batch size, on the bundled
    photos. fp8-static: calibrated on those photos as the build does, each output projection fed FP8 by the
    attention kernel's FP8 form, held to the quantized gate's cosine."""
    import copy
    import json

    import torch

    from builder.compare import compare_logits
    from builder.core.contract import Contract
    from builder.core.imaging import PreprocessParams
    from builder.core.photos import photo_batch
    from builder.engines import static_fp8
    from builder.engines.inductor import export_program
    from builder.engines.torch_runner import TorchEngine
    from builder.engines.window_attention import fuse_window_attention
    from conftest import MAX_BATCH

    photos = photo_batch(PreprocessParams.from_timm(tiny_model.data_config))[:MAX_BATCH]
    fused = copy.deepcopy(tiny_model)
    blocks = fuse_window_attention(fused.module)
    assert blocks > 0
    export_program(fused, Contract("swin_tiny_patch4_window7_224", (224, 224), 1000), tmp_path / "model.pt2",
                   MAX_BATCH)
    if precision == "fp8-static":
        amax = static_fp8.calibrate(tiny_model.module, photos)
        (tmp_path / "engine.json").write_text(json.dumps({"quantization": static_fp8.quantization_record(
            amax, len(photos))}))
    params = {"precision": precision, "batch_buckets": "1,2,4,8", "input_dims": "3,224,224",
              "intra_op_threads": "1", "compile": "reduce-overhead", "window_attention": "fused"}
    said = []
    engine = TorchEngine(str(tmp_path), "cuda", params, MAX_BATCH, log=said.append)
    assert sorted(engine.graphs) == [1, 2, 4, 8]
    if precision == "fp8-static":
        assert any(f"({blocks} fed FP8 by the window attention kernel)" in line for line in said), said
    reference = copy.deepcopy(tiny_model.module).cuda()
    for rows in (1, 3, len(photos)):  # 6 bundled photos: the last in the bucket of 8
        x = torch.from_numpy(photos[:rows]).cuda()
        with torch.inference_mode():
            want = reference(x)
        figures = compare_logits(want.cpu().numpy(), engine(x).cpu().numpy())
        if precision == "fp16":
            assert figures["min_cosine"] > 0.999 and figures["max_abs"] < 0.05, (rows, figures)
        else:
            assert figures["min_cosine"] > 0.99, (rows, figures)
        print(f"fused {precision} engine, {rows} photos:", json.dumps(figures))
