"""The README's GPU quick start, run as written (through the Makefile, with the tiny Swin): every model the photo
path calls runs on the GPU, the models it never calls hold no GPU instance, the photo path's setup is measured by the
build on this GPU and served as measured (MPS too), and it stops in seconds."""

from __future__ import annotations

import json
import re
import shutil
import time

import numpy as np
import pytest

from builder.core.photos import photo_files
from builder.repository import configs
from conftest import TINY_KWARGS, free_ports, run_module

pytestmark = pytest.mark.gpu
STOP_WITHIN_S = 10  # issue "Fast as built": a server of many photo-path instances stops within 10 s


def _run_as_written(make: list, extra: list, workdir):
    """One `make` invocation of the README, run with this Python (the GPU host's make has no venv to build)."""
    from test_cli_args import _make_argv

    targets = [a for a in make[1:] if "=" not in a]
    argv = _make_argv(targets[0], *[a for a in make[1:] if "=" in a], *extra)
    argv = argv[argv.index("-m"):]
    if targets[0] == "serve":
        argv += ["--workdir", str(workdir)]  # where only: the server's copy and log go under the test's folder
    result = run_module(*argv[1:], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _devices(log: str) -> dict:
    """Model -> the devices its instances were initialized on, from the server log."""
    found: dict = {}
    for model, device in re.findall(r"TRITONBACKEND_ModelInstanceInitialize: (\S+)_\d+_\d+ \((\w+) device", log):
        found.setdefault(model, set()).add(device)
    return found


@pytest.mark.server
@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None, reason="no CUDA MPS control program here "
                    "(the quick start's server runs under MPS; without it `make serve` refuses in one line)")
def test_the_readmes_gpu_quick_start_serves_what_the_photo_path_calls_on_the_gpu(tmp_path):
    import tritonclient.grpc as grpcclient

    from builder.core.manifest import read_manifest
    from test_readme import GPU_QUICK_START, make_commands_of, readme_commands

    line = next(c for _, c in readme_commands() if c.startswith(GPU_QUICK_START))
    repo, workdir = tmp_path / "repo", tmp_path / "srv"
    http, grpc, metrics = free_ports(3)
    extra = [f"REPO={repo}", f"MODEL_KWARGS={TINY_KWARGS}", f"HTTP_PORT={http}", f"GRPC_PORT={grpc}",
             f"METRICS_PORT={metrics}"]
    try:
        served = [_run_as_written(make, extra, workdir) for make in make_commands_of(line)]
        manifest = read_manifest(repo)
        name = manifest["contract"]["ensemble"]
        devices = _devices((workdir / "tritonserver.log").read_text(errors="replace"))
        called = {name, f"{name}_classifier"} if manifest["settings"]["gpu_photo_path"] != "fused" else {name}
        print("design:", manifest["settings"]["gpu_photo_path"], "engine:", manifest["engine"]["chosen"],
              "devices:", {m: sorted(d) for m, d in devices.items()})
        for model in called:
            assert devices.get(model) == {"GPU"}, (model, devices)
        for model in (f"{name}_preprocess", f"{name}_postprocess"):  # kept for direct clients only
            assert devices.get(model) == {"CPU"}, (model, devices)
        # The build measured the photo path's setup on this GPU and wrote its winner; make serve took the MPS
        # choice from the manifest.
        setup = manifest["photo_setup"]
        print("photo setup:", json.dumps(setup))
        assert setup["measured"] and setup["device"].startswith("cuda") and len(setup["rows"]) == 12, setup
        chosen, config = setup["chosen"], configs.read(repo / name / "config.pbtxt")
        assert (config.instance_group[0].count, config.max_batch_size) == (chosen["processes"], chosen["batch"])
        assert manifest["serve"]["mps"] is chosen["mps"]
        assert ("CUDA MPS control daemon started" in served[-1].stderr) is chosen["mps"], served[-1].stderr[-2000:]
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        jpeg = next(p for p in photo_files() if p.suffix == ".jpg").read_bytes()
        tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[jpeg]], dtype=object))
        answer = client.infer(name, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities",
                                                                                       class_count=3)])
        assert len(answer.as_numpy("probabilities")[0]) == 3
    finally:
        started = time.perf_counter()
        run_module("builder", "stop", "--workdir", str(workdir))
        stop_s = time.perf_counter() - started
    # How long the stop took, and what the server said while models unloaded (issue "Fast as built": in seconds).
    log = (workdir / "tritonserver.log").read_text(errors="replace")
    said = [line[-160:] for line in log.splitlines()
            if any(k in line for k in ("live models", "Exit timeout", "Non-graceful", "system_error", "unloaded"))]
    print(f"stop took {stop_s:.1f} s;", json.dumps(said[-12:], indent=0))
    # Many photo-path instances under MPS stop in seconds, every model unloaded in its turn.
    assert stop_s < STOP_WITHIN_S, (stop_s, said[-12:])
    for sign in ("Exit timeout expired", "Non-graceful termination", "std::system_error"):
        assert sign not in log, (sign, said[-12:])
