"""Shared fixtures: a tiny Swin, a real local-flavor repository, a real tritonserver, real photos."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

from builder import settings as s
from builder.serving.server import free_ports  # noqa: F401  (the tests take it from here)

# A Swin with timm's swin_tiny_patch4_window7_224 config (224 input, bicubic,
# crop_pct 0.9, ImageNet mean/std, 1000 classes) but tiny width and depth, so
# export, validation and serving stay fast on a 2-core CPU.
TINY_KWARGS = json.dumps({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
TINY_SOURCE = s.ModelSource(s.DEFAULT_MODEL, model_kwargs=TINY_KWARGS, seed=0)
MAX_BATCH = 8
# Logits through the served ensemble vs timm + PyTorch on the same photo. The
# preprocessing is bit-exact; the rest is ONNX Runtime vs PyTorch float32.
SERVED_LOGIT_ATOL = 1e-4


def project_copy(tmp_path: Path) -> Path:
    """The project's files (no venv, git or generated folders) in `tmp_path/project`, modification times kept."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "project"
    shutil.copytree(root, work, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "model_repository*", ".model_repository*", ".server", "build", ".gpukit", ".gpurun",
        "__pycache__", ".pytest_cache", "*.egg-info"))
    return work


def ready_stub(host: str = "127.0.0.1", ssl_context=None):
    """An HTTP(S) server that answers every GET with 200, as a healthy Triton's readiness probe does."""
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer((host, 0), Ready)
    if ssl_context is not None:
        httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def tiny_settings(output: Path, flavor: str = "local", **overrides) -> s.RepoSettings:
    """Repository settings for the tiny Swin."""
    kind = "KIND_CPU" if flavor == "local" else "KIND_GPU"
    values = dict(
        source=TINY_SOURCE, output=str(output), flavor=flavor,
        classifier_batching=s.Batching(MAX_BATCH, (4, 8), 2000),
        preprocess_batching=s.Batching(MAX_BATCH, (), 2000),
        classifier_instances=s.InstanceGroup(kind, 1),
    )
    values.update(overrides)
    return s.RepoSettings(**values)


@pytest.fixture(scope="session")
def photo_paths() -> list:
    """Real photographs shipped with scikit-image (JPEG and PNG)."""
    import skimage

    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
             "retina.jpg", "motorcycle_left.png", "camera.png"]
    paths = [Path(skimage.data_dir) / n for n in names]
    assert all(p.is_file() for p in paths), glob.glob(skimage.data_dir + "/*")
    return paths


@pytest.fixture(scope="session")
def photos(photo_paths) -> list:
    return [p.read_bytes() for p in photo_paths]


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny Swin with the same seed the repositories are built with."""
    from builder.export.model import load_model

    return load_model(TINY_SOURCE)


@pytest.fixture(scope="session")
def timm_reference(tiny_model):
    """timm's own eval transform + PyTorch forward: logits for a list of image bytes."""
    import io

    import timm.data
    import torch
    from PIL import Image, ImageOps

    transform = timm.data.create_transform(**tiny_model.data_config)

    def logits(images: list) -> np.ndarray:
        batch = torch.stack([transform(ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB"))
                             for b in images])
        with torch.no_grad():
            return tiny_model.module(batch).numpy()

    return logits


@pytest.fixture(scope="session")
def local_repo(tmp_path_factory) -> Path:
    """A real local-flavor repository of the tiny Swin."""
    from builder.repository.writer import build_repository

    return build_repository(tiny_settings(tmp_path_factory.mktemp("repo") / "model_repository"))


@pytest.fixture(scope="session")
def contract(local_repo):
    from builder.repository.contract import Contract
    from builder.repository.writer import read_manifest

    manifest = read_manifest(local_repo)
    return Contract(manifest["contract"]["ensemble"], (224, 224), manifest["model"]["num_classes"])


@pytest.fixture(scope="session")
def server(local_repo, tmp_path_factory):
    """A real tritonserver serving the local-flavor repository."""
    from builder.serving.server import LocalServer, ServerSettings

    http, grpc, metrics = free_ports(3)
    settings = ServerSettings(repository=str(local_repo), http_port=http, grpc_port=grpc, metrics_port=metrics,
                              workdir=str(tmp_path_factory.mktemp("server")))
    with LocalServer(settings) as running:
        yield running
