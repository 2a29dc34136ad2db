"""Explicit INT8 quantization of the exported ONNX with NVIDIA ModelOpt (post-training, Q/DQ).

The result is an ONNX model with QuantizeLinear/DequantizeLinear pairs that
TensorRT >= 10 builds strongly typed (`builder.engines.trt` detects the Q/DQ nodes),
the route TensorRT 11 keeps after dropping implicit INT8 calibration.
Calibration runs on the CPU with ONNX Runtime over preprocessed real images
(`python -m builder export --calibration`). ModelOpt is imported lazily:
`make venv` installs it without the CUDA-only extras its `[onnx]` extra pins.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from builder.compare import gate
from builder.settings import LOW_PRECISION_PARITY, Parity
from builder.core.contract import LOGITS, PIXELS
from builder.errors import BuilderError

log = logging.getLogger("builder")


def quantize_int8(onnx_path: Path, calibration: np.ndarray, output: Path, high_precision: str = "fp16") -> Path:
    """Inserts INT8 Q/DQ nodes calibrated on `calibration` (N, 3, H, W).

    Args:
        onnx_path: The FP32 export.
        calibration: Preprocessed images, float32.
        output: Where to write the quantized model.
        high_precision: dtype of the layers left unquantized (fp16 for TensorRT, fp32 for portability).

    Returns:
        The written path.

    Raises:
        BuilderError: ModelOpt missing, or bad calibration data.
    """
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise BuilderError(f"NVIDIA ModelOpt is not importable ({exc}); run `make venv`, which installs "
                           "nvidia-modelopt from requirements-modelopt.txt") from None
    if calibration.ndim != 4 or calibration.dtype != np.float32 or len(calibration) < 1:
        raise BuilderError(f"calibration: need float32 (N, 3, H, W) images, got {calibration.dtype} "
                           f"{calibration.shape}")
    if high_precision not in ("fp16", "fp32"):
        raise BuilderError("high_precision: use fp16 or fp32")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info("quantizing %s to INT8 Q/DQ with %d calibration images ...", onnx_path, len(calibration))
    with tempfile.TemporaryDirectory(prefix="quantize-") as work:
        # ModelOpt writes and deletes files beside its input and its output (seen: the input model changed;
        # `model_reconciled.onnx` written into the output folder and removed, a user's file of that name with
        # it), so both live in a folder of the tool's own: nothing of the user's is touched but `output`.
        source, result = Path(work) / "model.onnx", Path(work) / "out" / "model_int8.onnx"
        result.parent.mkdir()
        shutil.copy2(onnx_path, source)
        quantize(str(source), quantize_mode="int8", calibration_data={PIXELS: calibration},
                 calibration_eps=["cpu"], output_path=str(result), high_precision_dtype=high_precision,
                 log_level="WARNING")
        # A name of the tool's own beside `output`, then one rename: never a half-written model under the real
        # name, and no user's file is replaced but `output`.
        handle, staged = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
        os.close(handle)
        try:
            shutil.copyfile(result, staged)
            os.replace(staged, output)
        except BaseException:
            Path(staged).unlink(missing_ok=True)
            raise
    log.info("wrote %s in %.1f s", output, time.perf_counter() - started)
    return output


def validate_quantized(path: Path, reference: Dict[str, np.ndarray], parity: Parity = LOW_PRECISION_PARITY
                       ) -> Dict[str, float]:
    """Runs the quantized model with ONNX Runtime on reference inputs and compares with reference logits.

    Raises:
        BuilderError: A threshold is missed.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run([LOGITS], {PIXELS: reference["inputs"]})[0].astype(np.float32)
    figures = gate(f"{path} (INT8)", "PyTorch FP32", reference["logits"], logits, parity)
    log.info("INT8 ONNX vs PyTorch FP32: max abs %.3g, min cosine %.5f, top-1 %.3f", figures["max_abs"],
             figures["min_cosine"], figures["top1_agreement"])
    return figures


def count_qdq(path: Path) -> Optional[int]:
    """Number of QuantizeLinear nodes in an ONNX file."""
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "QuantizeLinear")
