"""The bundled parity photos, and their batch through the exact transform: what every gate runs on."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

PHOTOS = Path(__file__).parents[1] / "parity_images"


def photo_files(images_dir: Optional[Path] = None) -> list:
    """The parity photos (default: the bundled set), sorted by name."""
    return sorted(p for p in Path(images_dir or PHOTOS).iterdir() if p.is_file() and p.suffix != ".md")


def load_photo_files() -> list:
    """The bundled 640x480 JPEGs: the load the GPU measurements send (`perf/gpu/gpu_repo.sh` copies the same)."""
    return [p for p in photo_files() if p.name.endswith("_640x480.jpg")]


def photo_batch(params, images_dir: Optional[Path] = None) -> np.ndarray:
    """The parity photos through the exact preprocessing: the inputs every engine gate runs on."""
    from builder.core import imaging

    return np.stack([imaging.preprocess(p.read_bytes(), params) for p in photo_files(images_dir)])
