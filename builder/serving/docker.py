"""Renders docker/ (Dockerfiles, compose file) from builder/serving/templates with jinja2.

The NGC release and its versions are pinned once, in `builder.settings`;
`python -m builder docker` writes the files and a test fails when the
committed ones differ from a fresh render, so they cannot drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from builder.repository.contract import Contract
from builder.serving.server import ADMIN_HEADER, ADMIN_KEY_ENV, RESTRICTED
from builder.settings import DEFAULT_MODEL, TENSORRT_VERSION, TRITON_RELEASE, TRITON_VERSION

TEMPLATES = Path(__file__).parent / "templates"
DOCKER_FILES = ("Dockerfile.tritonserver", "Dockerfile.tensorrt", "compose.yaml")
PILLOW_VERSION = "11.0.0"  # has wheels for the Python 3.10 in tritonserver 24.10
# For --preprocess gpu / --engine inductor in the container: the newest pair with cp310 CUDA 12.6 wheels.
TORCH_VERSION, TORCHVISION_VERSION = "2.7.1", "0.22.1"


def context(model_name: str = DEFAULT_MODEL, precision: str = "fp16") -> Dict:
    """Values the templates use."""
    return {"release": TRITON_RELEASE, "triton_version": TRITON_VERSION, "tensorrt_version": TENSORRT_VERSION,
            "pillow_version": PILLOW_VERSION, "torch_version": TORCH_VERSION,
            "torchvision_version": TORCHVISION_VERSION, "http_port": 8000, "grpc_port": 8001, "metrics_port": 8002,
            "repository": "model_repository", "classifier": Contract.named(model_name).classifier,
            "precision": precision,
            # Model control locked as in `make serve`: the key comes from the environment, never the files.
            "restricted": f"{','.join(RESTRICTED)}:{ADMIN_HEADER}", "admin_key_env": ADMIN_KEY_ENV}


def render(values: Dict) -> Dict[str, str]:
    """File name -> rendered text."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return {name: env.get_template(f"{name}.j2").render(**values) for name in DOCKER_FILES}


def write(output: Path, values: Dict) -> list:
    """Writes the rendered files into `output` (normally docker/)."""
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render(values).items():
        (output / name).write_text(text, encoding="utf-8")
        paths.append(output / name)
    return paths
