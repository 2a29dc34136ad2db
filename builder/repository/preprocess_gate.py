"""The parity gate of the non-exact preprocessings (`gpu`, `draft`): the same photos through each and the exact path.

Figures: the input tensors (max and mean absolute difference), and the logits
the built model gives for each (max abs, cosine, top-1 agreement), on real
photos in the formats uploads come in (640x480 and 2048x1536 JPEGs, baseline
and progressive, grayscale, EXIF-rotated, CMYK, PNG). The `gpu` preprocessing runs
on the GPU when there is one, else on the CPU (same code, libjpeg-turbo
decode), which is what CI runs; `draft` is the exact path with JPEGs decoded
at a reduced scale.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from builder.compare import gate
from builder.errors import BuilderError
from builder.core.photos import photo_batch, photo_files
from builder.settings import Parity

log = logging.getLogger("builder")
def preprocess_parity(module, params, parity: Parity, variant: str = "gpu", images_dir: Optional[Path] = None,
                      device: Optional[str] = None) -> Dict:
    """Compares a preprocessing variant with the exact one; raises outside the thresholds.

    Args:
        module: The classifier (torch, eval mode, CPU).
        params: `imaging.PreprocessParams` of the exact path.
        parity: Thresholds on the logits (max_abs, min_cosine, min_top1).
        variant: `gpu` (the batched GPU decode and transform) or `draft` (JPEGs decoded at a reduced scale).
        images_dir: Photos to compare on (default: the bundled set).
        device: Where the GPU preprocessing runs (default: cuda if available, else cpu).

    Returns:
        The figures, with what each variant did: for `gpu` the device, decoder and the number of images
        on each path; for `draft` the number of photos decoded at a reduced scale.

    Raises:
        BuilderError: A threshold is missed, or the parameters cannot run on the GPU.
    """
    import torch

    if variant not in ("gpu", "draft"):
        raise ValueError(f"variant {variant!r}: the gated preprocessings are gpu and draft")
    files = photo_files(images_dir)
    items = [p.read_bytes() for p in files]
    if variant == "gpu":
        candidate, errors, details, how = _gpu_candidate(params, items, device)
    else:
        candidate, errors, details, how = _draft_candidate(params, items)
    failed = [f"{f.name}: {e}" for f, e in zip(files, errors) if e]
    if failed:
        raise BuilderError(f"preprocess: the {variant} preprocessing failed on parity photos: " + "; ".join(failed))
    exact = photo_batch(params, images_dir)
    diff = np.abs(candidate - exact)
    with torch.no_grad():
        reference, logits = (module(torch.from_numpy(x)).numpy() for x in (exact, candidate))
    figures = gate(f"preprocess: the {variant} preprocessing", "the exact one", reference, logits, parity,
                   inputs=f"{len(items)} bundled photos, both preprocessings",
                   extra=dict(tensor_max_abs=float(diff.max()), tensor_mean_abs=float(diff.mean()),
                              images=len(items), **details),
                   fix="the previous repository is left in place")
    log.info("%s preprocessing vs exact on %d photos (%s): tensor max abs %.3g, logits cosine %.6f, top-1 %.3f",
             variant, len(items), how, figures["tensor_max_abs"], figures["min_cosine"], figures["top1_agreement"])
    return figures


def _gpu_candidate(params, items, device: Optional[str]):
    """The GPU preprocessing's tensors of `items`, their errors, what it did (figures and in words)."""
    import torch

    from builder.repository.triton_models import gpu_imaging, gpu_transform

    problem = gpu_transform.supported(params)
    if problem:
        raise BuilderError(f"preprocess: {problem}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preprocessor = gpu_imaging.GpuPreprocessor(params, device)
    tensors, errors = preprocessor(items)
    details = dict(on_gpu_path=preprocessor.counts["gpu"], on_exact_path=preprocessor.counts["exact"], device=device,
                   decoder=preprocessor.decoder.backend)
    return tensors.cpu().numpy(), errors, details, f"{device}, {preprocessor.decoder.backend}"


def _draft_candidate(params, items):
    """The draft preprocessing's tensors of `items` (None when one failed), their errors, what it did."""
    from builder.core import imaging

    drafted_params = dataclasses.replace(params, jpeg_draft=True)
    results = [imaging.try_preprocess(data, drafted_params) for data in items]
    errors = [error for _, error in results]
    candidate = np.stack([pixels for pixels, _ in results]) if not any(errors) else None
    drafted = sum(imaging.decodes_reduced(data, drafted_params) for data in items)
    return candidate, errors, dict(decoded_at_reduced_scale=drafted), f"{drafted} decoded at a reduced scale"
