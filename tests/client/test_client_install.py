"""The client installs on its own: `pip install .` in a fresh environment brings tritonclient, numpy and
Pillow, not torch, timm or onnx, and classifies against the real server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import project_copy



@pytest.mark.server
def test_client_installs_without_torch_and_classifies(server, contract, photo_paths, tmp_path):
    work = project_copy(tmp_path)
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "-q", str(work)], capture_output=True, text=True,
                             timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    names = {line.split("==")[0].lower() for line in listed.splitlines()}
    assert {"tritonclient", "numpy", "pillow"} <= names
    assert not names & {"torch", "timm", "onnx", "onnxruntime", "torchvision"}, names
    for mode in ("ensemble", "classifier"):  # classifier mode preprocesses here, with the exact path
        result = subprocess.run([python, "-m", "clients", "classify", "--url", server.grpc_url, "--model",
                                 contract.ensemble, "--mode", mode, "--json", str(photo_paths[0])],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert '"error": null' in result.stdout
