"""A repository's manifest.json: its name, reading it, and the file hashes it records (standard library only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict

from builder.core.contract import Contract
from builder.errors import BuilderError

MANIFEST = "manifest.json"


def file_hashes(root: Path) -> Dict[str, str]:
    """sha256 of every file under `root` but the manifest, keyed by relative path."""
    hashes = {}
    for path in sorted(p for p in Path(root).rglob("*")
                       if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        hashes[path.relative_to(root).as_posix()] = digest.hexdigest()
    return hashes


def write_manifest_file(root: Path, manifest: dict) -> Path:
    """Writes `manifest` with the hashes of every file under `root` (written last: it describes them)."""
    path = Path(root) / MANIFEST
    path.write_text(json.dumps({**manifest, "files": file_hashes(root)}, indent=2, default=str) + "\n",
                    encoding="utf-8")
    return path


def manifest_contract(manifest: dict) -> Contract:
    """The model names of the repository a manifest describes (`.classifier`, `.preprocess`, ...)."""
    return Contract.named(manifest["contract"]["ensemble"])


def read_manifest(root: Path) -> dict:
    """Reads a repository's manifest.json.

    Raises:
        BuilderError: No manifest (not a repository written by this tool), or a damaged one.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BuilderError(f"{path} does not exist; build the repository with `make repo` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BuilderError(f"{path} cannot be read ({exc}); rebuild the repository with `make repo`") from None
    required = {"contract", "flavor", "files", "settings"}
    if not isinstance(manifest, dict) or not required <= set(manifest) or not isinstance(manifest["contract"], dict):
        missing = sorted(required - set(manifest)) if isinstance(manifest, dict) else ["everything: not an object"]
        raise BuilderError(f"{path} is damaged (lacks {', '.join(missing) or 'its contract'}); rebuild the "
                           "repository with `make repo`")
    return manifest
