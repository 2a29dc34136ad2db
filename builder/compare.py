"""Numerical comparison of two sets of logits (Polygraphy-style figures)."""

from __future__ import annotations

from typing import Dict

import numpy as np


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
