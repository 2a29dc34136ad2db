"""The Python-backend models the repository serves (each copied as a version's model.py), and the modules each
one imports from beside it."""

from pathlib import Path
from typing import Dict, Optional

# What each served model copies beside its model.py, by role (the stub imports these copies, not the project):
# `models` copies them, `check` reports a served version that lacks one (`served_role` tells the role from a
# config), the tests read them.
_GPU_IMAGING = ("imaging.py", "gpu_imaging.py", "gpu_transform.py")
SERVED_MODULES = {
    "preprocess": ("imaging.py", "served.py"),
    "preprocess_gpu": (*_GPU_IMAGING, "served.py"),
    "classifier": (),
    "classifier_torch": ("torch_runner.py", "window_attention.py"),
    "postprocess": (),
    # torch_runner.py in every design: its head (softmax) serves the BLS path's logits too.
    "photo_path": (*_GPU_IMAGING, "served.py", "torch_runner.py", "window_attention.py"),
}


def served_role(parameters: Dict[str, str], version_dir: Path) -> Optional[str]:
    """Which `SERVED_MODULES` entry a Python-backend model's config parameters and version folder are."""
    if parameters.get("classifier"):
        return "photo_path"
    if parameters.get("preprocess") == "gpu":
        return "preprocess_gpu"
    if "scale_size" in parameters:
        return "preprocess"
    if (version_dir / "model.pt2").is_file():
        return "classifier_torch"
    if (version_dir / "model.onnx").is_file() or (version_dir / "model.plan").is_file():
        return "classifier"
    return "postprocess"

