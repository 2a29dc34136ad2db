"""What a result was measured on: CPU, GPU, versions, command line."""

from __future__ import annotations

import json
import os
from pathlib import Path
import platform
import subprocess
import sys
import time
from typing import Dict, Optional
import logging

from builder.meta import package_versions


def gpu() -> Dict[str, str]:
    """GPU name, driver and memory from nvidia-smi ({} without a GPU)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        name, driver, memory, cap = (v.strip() for v in out.stdout.strip().splitlines()[0].split(","))
        return {"gpu": name, "gpu_driver": driver, "gpu_memory": memory, "gpu_compute_capability": cap}
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return {}


def cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def command_line() -> str:
    """This process's command line as typed: `python3 -m <package> ...` for a package's __main__, else the script."""
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) == "__main__.py":
        run = ["-m", os.path.basename(os.path.dirname(script))]
    else:
        run = [os.path.relpath(script) if os.path.isabs(script) and script.startswith(os.getcwd()) else script]
    return " ".join([os.path.basename(sys.executable), *run, *sys.argv[1:]])


def describe(extra: Optional[Dict] = None) -> Dict:
    """A flat description of this machine and run."""
    return {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu": cpu(),
        "cpu_count": os.cpu_count(),
        **gpu(),
        "python": platform.python_version(),
        "versions": package_versions("torch", "timm", "onnxruntime", "tensorrt", "tritonclient", "numpy"),
        "command": command_line(),
        **(extra or {}),
    }


def check_output(path: str, folder: bool = False) -> None:
    """Fails before any measurement on an output that cannot be written (a minute of work is not lost).

    Args:
        path: The --output given.
        folder: The command writes a folder of files there (else one file).

    Raises:
        BuilderError: The path is the wrong kind, or its folder cannot be created or written.
    """
    from builder.errors import BuilderError

    target = Path(path).expanduser()
    if folder and target.exists() and not target.is_dir():
        raise BuilderError(f"output: {path} is a file; pass a folder for --output")
    if not folder and target.is_dir():
        raise BuilderError(f"output: {path} is a folder; pass a file path for --output")
    parent = target if folder else target.parent
    existing = parent.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BuilderError(f"output: {parent} cannot be created or written ({existing} is not a writable "
                           "folder); pass an --output in a folder you can write")


def write_json(path: str, payload: Dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def bundled_photos() -> str:
    """The bundled parity photos' folder, wherever the command runs from (the `--images` default)."""
    from builder.core.photos import PHOTOS

    return str(PHOTOS)


def image_paths(paths) -> list:
    """The image files a perf command measures with: folders expanded, what is not an image named and skipped.

    Raises:
        BuilderError: A path that does not exist, or no image at all (one line, before any work).
    """
    from builder.errors import BuilderError
    from clients.settings import IMAGE_SUFFIXES

    found, skipped = [], []
    for item in paths:
        path = Path(item)
        if not path.exists():
            raise BuilderError(f"images: {item} does not exist; pass image files or folders of them")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            (found if file.suffix.lower() in IMAGE_SUFFIXES else skipped).append(file)
    if skipped:
        logging.getLogger("perf").warning("images: skipping %d file(s) that are not images (by suffix): %s",
                                          len(skipped), ", ".join(str(p) for p in skipped[:5])
                                          + (" ..." if len(skipped) > 5 else ""))
    if not found:
        raise BuilderError(f"images: no image files under {', '.join(map(str, paths))}; pass JPEG, PNG, WebP, "
                           "GIF, BMP or TIFF files or folders of them")
    return found
