"""Static FP8 (`fp8-static`): each Linear layer's input scale, calibrated once at build time on photos.

torchao's FP8 and INT8 engines compute every activation's scale per batch: an absolute-maximum pass over each
Linear layer's input before its matrix product, which made them slower than FP16 on Swin-T (perf/results/
h200-precisions). Static scales take that pass out: the build runs the FP32 model once over the bundled photos,
through timm's eval transform, and records each layer's input absolute maximum in the engine's sidecar
(`engine.json`, `quantization.input_amax`); the served runner (`torch_runner.quantize_static_fp8`) turns them
into fixed scales, so the quantization (a multiply, a clamp and a cast) is pointwise work that Inductor fuses into
the kernel producing the layer's input. An input beyond the calibrated range saturates at FP8's largest value.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from builder.engines.torch_runner import KEEP, STATIC_FP8

# What the manifest says a static-FP8 engine was calibrated on (the count is filled in).
CALIBRATION = ("the {images} bundled photos (builder/parity_images) through timm's eval transform: each Linear "
               "layer's input absolute maximum, in engine.json")


def calibrate(module, photos: np.ndarray, keep=KEEP) -> Dict[str, float]:
    """Each Linear layer's input absolute maximum over `photos` (N, 3, H, W float32), by module name, run where the
    module's weights are; the head (`keep`) is left out, as the runner leaves it unquantized."""
    import torch

    device = next(module.parameters()).device
    amax: Dict[str, float] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and not name.startswith(keep):
            def record(_, inputs, __, name=name):
                amax[name] = max(amax.get(name, 0.0), float(inputs[0].detach().abs().max()))
            hooks.append(layer.register_forward_hook(record))
    try:
        with torch.inference_mode():
            module(torch.from_numpy(photos).to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return amax


def quantization_record(amax: Dict[str, float], images: int) -> Dict:
    """The sidecar's `quantization` entry of a static-FP8 engine: how, on what, and the calibration itself."""
    return {"library": "torch (torch._scaled_mm)", "scheme": STATIC_FP8,
            "layers": f"{len(amax)} Linear layers, e4m3 with per-tensor static scales; the head stays FP16",
            "calibration": CALIBRATION.format(images=images),
            "input_amax": dict(amax)}
