"""The GPU path's resize on its own: Pillow's weights, their float16 split, and the rounding candidates."""

import os
from pathlib import Path

import numpy as np
from PIL import Image

from builder.core import imaging
from builder.repository.triton_models import gpu_imaging, gpu_transform


def test_resample_weights_are_normalized():
    for in_size, out_size in ((640, 331), (480, 248), (100, 248), (37, 37)):
        for name in gpu_transform.FILTERS:
            weights = gpu_transform.resample_weights(in_size, out_size, name)
            assert weights.shape == (out_size, in_size)
            assert np.abs(weights.sum(1) - 1).max() < 1e-5


def test_split_weights_are_exact_in_float16_and_give_pillows_resize_to_the_bit(params):
    """The two-part weights rebuild Pillow's fixed-point ones, each part exact in float16; on the same pixels
    the transform is Pillow's resize, crop and normalization to the last bit (a photo, a phone's size, odd)."""
    import torch

    for in_size, out_size in ((640, 331), (480, 248), (3024, 248), (100, 248)):
        weights = gpu_transform.resample_weights(in_size, out_size, "bicubic")
        halves = gpu_transform.split_weights(weights)
        assert np.array_equal(halves.astype(np.float16).astype(np.float32), halves)
        rebuilt = halves[:out_size].astype(np.float64) * 4096 + halves[out_size:]
        assert np.array_equal(rebuilt / (1 << 22), weights.astype(np.float64))
    preprocessor, rng = gpu_imaging.GpuPreprocessor(params, "cpu"), np.random.default_rng(0)
    for width, height in ((640, 480), (4032, 3024), (333, 517), (100, 60)):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours = preprocessor._transform_group([torch.from_numpy(pixels).permute(2, 0, 1).contiguous()])[0].numpy()
        assert np.abs(ours - imaging.transform(Image.fromarray(pixels), params)).max() < 1e-6, (width, height)


def test_the_triton_rounding_candidate_rounds_as_the_eager_code(params):
    """`perf/gpu/round_kernel.py` (a benchmark candidate) on Triton's CPU interpreter: the same transform to the
    bit as `_pillow_round`'s seven eager kernels, on both passes' `tensor_split` views."""
    import dataclasses as dc
    import subprocess
    import sys

    script = f"""
import numpy as np, torch
from builder.core import imaging
from builder.repository.triton_models import gpu_imaging as g
from perf.gpu.round_kernel import pillow_round
params = imaging.PreprocessParams(**{dc.asdict(params)!r})
pipe, rng = g.GpuPreprocessor(params, "cpu"), np.random.default_rng(0)
eager_round = g.pillow_round
for width, height in ((640, 480), (333, 517)):
    images = [torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)) for _ in range(2)]
    eager = pipe._transform_group(images)
    g.pillow_round = pillow_round
    fused = pipe._transform_group(images)
    g.pillow_round = eager_round
    assert torch.equal(eager, fused), (width, height)
print("same")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2], env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.stdout.strip() == "same", result.stderr[-2000:]
