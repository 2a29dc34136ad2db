"""The PyTorch 2 engine: `torch.export` of the timm model with a dynamic batch, served by torch (+ TorchInductor).

Why this route: an ExportedProgram (`model.pt2`) is one file that loads without
timm or the model's Python code, keeps a symbolic batch dimension, and can be
compiled by TorchInductor where it is served. AOTInductor packages would skip
the compile, but on the serving GPU host (torch 2.11) `aoti_load_package`
segfaults at load, so the served model compiles with `torch.compile` and
reuses Inductor's stored artifacts when they were made by the same torch on the
same GPU (`engine.json` says which; others are ignored with a log line).

The parity gate is the ONNX one: the exported program against the eager model
on the same inputs (max abs, cosine, top-1), before anything is written.
"""

from __future__ import annotations

import logging
import platform
import time
from pathlib import Path
from typing import Dict

import numpy as np

from builder.compare import check_parity, compare_logits
from builder.contract import Contract
from builder.errors import BuilderError
from builder.model import LoadedModel
from builder.settings import Parity

log = logging.getLogger("builder")
FILE = "model.pt2"
SIDECAR = "engine.json"


def export_program(model: LoadedModel, contract: Contract, path: Path, max_batch: int) -> Path:
    """Exports the classifier with `torch.export` (batch 1..max_batch symbolic) and saves it.

    Raises:
        BuilderError: torch.export cannot capture the model.
    """
    import torch
    from torch.export import Dim

    started = time.perf_counter()
    sample = torch.zeros(2, *contract.pixels.dims)
    # timm's Swin checks the batch in Python only through shapes, so one symbolic batch dimension covers 1..max.
    batch = Dim("batch", min=1, max=max(max_batch, 2))
    try:
        with torch.no_grad():
            program = torch.export.export(model.module, (sample,), dynamic_shapes=({0: batch},))
    except Exception as exc:
        raise BuilderError(f"torch.export could not capture {contract.name} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}); use --engine onnxruntime") from None
    torch.export.save(program, str(path))
    log.info("exported %s (%.1f MB) with torch.export in %.1f s", Path(path).name, Path(path).stat().st_size / 1e6,
             time.perf_counter() - started)
    return Path(path)


def validate_program(path: Path, model: LoadedModel, contract: Contract, parity: Parity) -> Dict[str, float]:
    """The saved program, loaded back, against the eager model (same inputs as the ONNX gate)."""
    import torch

    program = torch.export.load(str(path)).module()
    batch = np.random.default_rng(0).standard_normal((parity.batch, *contract.pixels.dims), dtype=np.float32)
    with torch.no_grad():
        candidate = program(torch.from_numpy(batch)).numpy()
        reference = model.module(torch.from_numpy(batch)).numpy()
    figures = compare_logits(reference, candidate)
    problems = check_parity(figures, parity.max_abs, parity.min_cosine, parity.min_top1)
    if problems:
        raise BuilderError("the exported program fails parity with PyTorch: " + "; ".join(problems))
    log.info("torch.export program vs PyTorch: max abs %.3g, min cosine %.7f", figures["max_abs"],
             figures["min_cosine"])
    return figures


def environment() -> Dict[str, str]:
    """What compiled artifacts are tied to: torch, CUDA and the GPU."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"torch": torch.__version__, "cuda": str(torch.version.cuda), "gpu": gpu,
            "python": platform.python_version()}
