"""Numerical comparison of two sets of logits (Polygraphy-style figures)."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import numpy as np

from builder.errors import BuilderError


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> Dict[str, float]:
    """Compares candidate logits with reference logits, row by row.

    Args:
        reference: (batch, classes) logits of the reference (e.g. PyTorch).
        candidate: Logits of the same inputs from the system under test.

    Returns:
        Flat figures: max_abs, mean_abs, min_cosine, top1_agreement, rows.

    Raises:
        ValueError: The shapes differ.
    """
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: reference {reference.shape}, candidate {candidate.shape}")
    reference = reference.reshape(len(reference), -1)
    candidate = candidate.reshape(len(candidate), -1)
    diff = np.abs(reference - candidate)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    cosine = np.where(norms > 0, (reference * candidate).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    return {
        "max_abs": float(diff.max(initial=0.0)),
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "min_cosine": float(cosine.min(initial=1.0)),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "rows": int(len(reference)),
    }


def check_parity(figures: Dict[str, float], max_abs: float, min_cosine: float, min_top1: float) -> list:
    """Lists the thresholds the figures miss (empty when all are met)."""
    problems = []
    if figures["max_abs"] > max_abs:
        problems.append(f"max abs error {figures['max_abs']:.3g} > {max_abs:g}")
    if figures["min_cosine"] < min_cosine:
        problems.append(f"min cosine {figures['min_cosine']:.6f} < {min_cosine:g}")
    if figures["top1_agreement"] < min_top1:
        problems.append(f"top-1 agreement {figures['top1_agreement']:.3f} < {min_top1:g}")
    return problems


class Thresholds(NamedTuple):
    """Parity thresholds (the same fields as `builder.settings.Parity`, for modules that run without it)."""

    max_abs: float
    min_cosine: float
    min_top1: float


def gate(name: str, against: str, reference: np.ndarray, candidate: np.ndarray, parity, *, inputs: str = "",
         extra: Optional[Dict] = None, fix: str = "") -> Dict:
    """The parity gate every non-exact variant passes: figures of `candidate` against `reference`, or an error.

    Args:
        name: What is gated, as the message names it ("ONNX export", "the TorchInductor engine", a plan's path).
        against: What it is compared with ("PyTorch", "the exact one").
        reference: The reference's logits.
        candidate: The variant's logits for the same inputs.
        parity: Thresholds: `max_abs`, `min_cosine`, `min_top1` (a `Parity` or `Thresholds`).
        inputs: What the inputs were, recorded with the figures.
        extra: Figures to record too, applied before the check (e.g. Polygraphy's own max abs).
        fix: What the user can do, appended to the message.

    Returns:
        The figures: max_abs, mean_abs, min_cosine, top1_agreement, rows, and `inputs`/`extra`.

    Raises:
        BuilderError: A threshold is missed; the message names each one with its figure.
    """
    figures = compare_logits(reference, candidate)
    figures.update(extra or {})
    if inputs:
        figures["inputs"] = inputs
    problems = check_parity(figures, parity.max_abs, parity.min_cosine, parity.min_top1)
    if problems:
        raise BuilderError(f"{name} fails parity with {against}: " + "; ".join(problems) + (f"; {fix}" if fix else ""))
    return figures
