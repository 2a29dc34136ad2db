"""Explicit INT8 quantization with NVIDIA ModelOpt: real calibration on real photos, checked with ONNX Runtime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from builder.export.onnx_export import reference_data
from builder.engines.quantize import count_qdq, quantize_int8, validate_quantized
from builder.engines.trt import _onnx_has_qdq
from builder.settings import Parity

# Random weights make the tiny model's logits nearly uniform, so top-1 flips under any quantization
# noise; the gate here is the logits' direction (cosine). Real weights are gated on top-1 too (CLI default 0.9).
MIN_COSINE = 0.99


def test_quantize_calibrates_on_photos_and_keeps_the_logits(local_repo, contract, tiny_model, photo_paths, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in photo_paths:
        (images / path.name).write_bytes(path.read_bytes())
    reference_data(tiny_model, contract, str(images), 16, tmp_path / "ref.npz", tmp_path / "calib.npy")
    onnx = local_repo / contract.classifier / "1" / "model.onnx"
    before = onnx.read_bytes()
    out = quantize_int8(onnx, np.load(tmp_path / "calib.npy"), tmp_path / "model.int8.onnx")
    assert count_qdq(out) > 20 and _onnx_has_qdq(str(out)) and not _onnx_has_qdq(str(onnx))
    assert onnx.read_bytes() == before  # the served model is never modified
    figures = validate_quantized(out, dict(np.load(tmp_path / "ref.npz")),
                                 Parity(max_abs=1e9, min_cosine=MIN_COSINE, min_top1=0.0))
    assert figures["min_cosine"] >= MIN_COSINE and figures["rows"] == 16
    assert figures["max_abs"] > 0  # really quantized, not a copy

    # The user's files beside the output stay as they were (ModelOpt writes and deletes model_reconciled.onnx
    # beside its output: it does so in a folder of the tool's own).
    (tmp_path / "model_reconciled.onnx").write_bytes(b"the user's own file")
    before_files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    cli = subprocess.run([sys.executable, "-m", "builder", "quantize", "--onnx", str(onnx), "--calibration",
                          str(tmp_path / "calib.npy"), "--output", str(tmp_path / "cli.onnx"), "--reference",
                          str(tmp_path / "ref.npz"), "--min-top1", "0"], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert "QuantizeLinear nodes" in cli.stdout and "min_cosine" in cli.stdout
    after_files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert set(after_files) == set(before_files) | {"cli.onnx"}  # nothing left beside it either
    assert all(after_files[name] == data for name, data in before_files.items())
    strict = subprocess.run([sys.executable, "-m", "builder", "quantize", "--onnx", str(onnx), "--calibration",
                             str(tmp_path / "calib.npy"), "--output", str(tmp_path / "strict.onnx"), "--reference",
                             str(tmp_path / "ref.npz"), "--min-cosine", "0.9999999"],
                            capture_output=True, text=True, timeout=300)
    assert strict.returncode == 1 and "(INT8) fails parity with PyTorch FP32" in strict.stderr and "Traceback" not in strict.stderr
