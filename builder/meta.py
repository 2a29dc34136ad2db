"""Stdlib-only facts about the running environment, shared by the builder and the benchmarks."""

from __future__ import annotations

from importlib import metadata
from typing import Dict, Optional


def package_versions(*names: str) -> Dict[str, Optional[str]]:
    """Installed versions of the given distributions (None when absent)."""
    found: Dict[str, Optional[str]] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
