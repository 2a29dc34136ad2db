"""TensorRT plan tooling and docker/ files, checked statically (no GPU, no Docker engine here)."""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from builder.serving import docker
from builder import settings as s
from builder.repository.check import check_repository
from builder.errors import BuilderError
from builder.repository.writer import build_repository
from conftest import tiny_settings

ROOT = Path(__file__).resolve().parents[2]
STDLIB = set(sys.stdlib_module_names)


def test_committed_docker_files_match_the_pinned_release():
    rendered = docker.render(docker.context())
    for name, text in rendered.items():
        assert (ROOT / "docker" / name).read_text() == text, f"docker/{name} is stale: run `make docker-files`"


def test_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    files = [str(ROOT / "docker" / n) for n in ("Dockerfile.tritonserver", "Dockerfile.tensorrt")]
    result = subprocess.run([str(hadolint), *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_agrees_with_release_ports_and_layout(tmp_path):
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    release = s.TRITON_RELEASE
    assert services["sdk"]["image"] == f"nvcr.io/nvidia/tritonserver:{release}-py3-sdk"
    for name, dockerfile in (("server", "Dockerfile.tritonserver"), ("plan", "Dockerfile.tensorrt")):
        text = (ROOT / "docker" / dockerfile).read_text()
        froms = [line.split()[1] for line in text.splitlines() if line.startswith("FROM ")]
        base = "tritonserver" if name == "server" else "tensorrt"
        assert froms == [f"nvcr.io/nvidia/{base}:{release}-py3"]
        build = services[name]["build"]
        assert (ROOT / "docker" / build["context"] / build["dockerfile"]).resolve().is_file()
    # COPY sources of the plan image exist and are all builder.engines.trt imports.
    for line in (ROOT / "docker" / "Dockerfile.tensorrt").read_text().splitlines():
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert (ROOT / source).is_file(), source
    # Ports: the server command, the published ports and the Dockerfile agree with the local server's defaults.
    from builder.serving.server import ServerSettings

    defaults = ServerSettings()
    command = services["server"]["command"]
    for flag, port in (("--http-port", defaults.http_port), ("--grpc-port", defaults.grpc_port),
                       ("--metrics-port", defaults.metrics_port)):
        assert f"{flag}={port}" in command
        assert f"{port}:{port}" in services["server"]["ports"]
        assert str(port) in (ROOT / "docker" / "Dockerfile.tritonserver").read_text()
    assert "--model-repository=/models" in command and "../model_repository:/models:ro" in services["server"]["volumes"]
    # The plan service reads the ONNX where `make repo` writes it.
    repo = build_repository(tiny_settings(tmp_path / "model_repository", flavor="container"))
    plan_command = services["plan"]["command"]
    for flag in ("--onnx", "--triton-config"):
        in_container = plan_command[plan_command.index(flag) + 1]
        assert (repo / in_container.removeprefix("/models/")).is_file(), flag
    # The plan's profile comes from that config: max = max_batch_size, opt = largest preferred size.
    from builder.engines.trt import profile_from_config

    config = repo / plan_command[plan_command.index("--triton-config") + 1].removeprefix("/models/")
    assert profile_from_config(str(config)) == (8, 8)  # tiny_settings: max 8, preferred 4,8
    # perf_analyzer in the SDK container targets the classifier of the default model.
    assert services["sdk"]["command"][services["sdk"]["command"].index("-m") + 1] == \
        f"{s.DEFAULT_MODEL}_classifier"


def _imports(path: Path) -> set:
    tree = ast.parse(path.read_text(), feature_version=(3, 9))  # also proves Python 3.9 syntax
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module if node.module.startswith("builder.") else node.module.split(".")[0])
    return names


def test_trt_module_needs_only_stdlib_numpy_tensorrt_polygraphy():
    allowed = STDLIB | {"numpy", "tensorrt", "polygraphy", "__future__", "builder.compare", "builder.errors",
                        "builder.timing", "builder.engines.plan_runner", "builder.engines.plan_check",
                        "builder.cli.args", "builder.settings", "builder.settings.parts", "builder.settings.repo",
                        "builder.core"}
    from builder.repository.models import TRT_MODULES

    for module in TRT_MODULES:  # what the local flavor copies beside a plan, and the TensorRT image gets
        extra = _imports(ROOT / module) - allowed
        assert not extra, f"{module} imports {extra}"
    copied = {source for line in (ROOT / "docker" / "Dockerfile.tensorrt").read_text().splitlines()
              if line.startswith("COPY ") for source in shlex.split(line)[1:-1]}
    assert copied == set(TRT_MODULES)


def test_trt_cli_without_tensorrt_fails_clearly(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    result = subprocess.run([sys.executable, "-m", "builder.engines.trt", "build", "--onnx", str(onnx), "--plan",
                             str(tmp_path / "m.plan")], capture_output=True, text=True)
    if result.returncode == 0:
        pytest.skip("tensorrt is installed here")
    assert result.returncode == 1 and "TensorRT container" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kwargs,field", [({"precision": "fp4"}, "precision"),
                                          ({"min_batch": 8, "max_batch": 4}, "profile"),
                                          ({"onnx": "/nope.onnx"}, "onnx")])
def test_plan_options_validation(tmp_path, kwargs, field):
    from builder.engines.trt import PlanOptions

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    values = {"onnx": str(onnx), "plan": str(tmp_path / "m.plan"), **kwargs}
    with pytest.raises(BuilderError, match=field):
        PlanOptions(**values)


def _fake_plan(folder: Path, tensorrt_version: str, profile_max: int) -> Path:
    """Plan bytes plus the sidecar builder.engines.trt writes; nothing here deserializes plans."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = folder / "model.plan"
    plan.write_bytes(b"plan bytes built elsewhere")
    from builder.engines.plan_check import sha256

    (folder / "plan.json").write_text(json.dumps({"tensorrt_version": tensorrt_version, "precision": "fp16",
                                                  "plan_sha256": sha256(plan),
                                                  "profile": {"min": 1, "opt": 16, "max": profile_max},
                                                  "parity": {"max_abs": 0.004, "min_cosine": 0.99999,
                                                             "top1_agreement": 1.0, "rows": 256}}))
    return plan


def test_profile_from_config(tmp_path):
    from builder.engines.trt import profile_from_config

    (tmp_path / "a.pbtxt").write_text("max_batch_size: 64\ndynamic_batching {\n  preferred_batch_size: 16\n}\n")
    assert profile_from_config(str(tmp_path / "a.pbtxt")) == (16, 64)
    (tmp_path / "b.pbtxt").write_text('name: "x"\n')
    with pytest.raises(BuilderError, match="no max_batch_size"):
        profile_from_config(str(tmp_path / "b.pbtxt"))


def test_repository_with_a_plan(tmp_path):
    plan = _fake_plan(tmp_path / "plans", s.TENSORRT_VERSION + ".18", 32)
    batching = s.Batching(8, (4, 8), 100)
    repo = build_repository(tiny_settings(tmp_path / "repo", flavor="container", plan=str(plan), cuda_graphs=True,
                                          classifier_batching=batching))
    classifier = repo / "swin_tiny_patch4_window7_224_classifier"
    text = (classifier / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in text and 'backend: "tensorrt"' in text
    assert "graphs: true" in text and "batch_size: 4" in text and "batch_size: 8" in text
    assert (classifier / "1" / "model.plan").read_bytes() == plan.read_bytes()
    assert (classifier / "1" / "model.onnx").is_file() and (classifier / "1" / "plan.json").is_file()
    assert check_repository(repo) == []
    from builder.core.manifest import read_manifest

    # The manifest carries the figures of the gate the plan passed where it was built (plan.json), as they are.
    sidecar = json.loads((plan.parent / "plan.json").read_text())
    assert read_manifest(repo)["parity"]["tensorrt_vs_pytorch"] == sidecar["parity"]


def test_check_flags_plan_version_and_profile(tmp_path):
    plan = _fake_plan(tmp_path / "plans", "8.6.0", 4)
    with pytest.raises(BuilderError) as info:  # the build's own check refuses it
        build_repository(tiny_settings(tmp_path / "repo", flavor="container", plan=str(plan)))
    assert f"built with TensorRT 8.6.0, the target serving container has {s.TENSORRT_VERSION}" in str(info.value)
    assert "above the plan's optimization profile max 4" in str(info.value)
    assert not (tmp_path / "repo").exists()
    good = build_repository(tiny_settings(tmp_path / "repo", flavor="container",
                                          plan=str(_fake_plan(tmp_path / "ok", "10.5.0", 32))))
    version = good / "swin_tiny_patch4_window7_224_classifier" / "1"
    (version / "plan.json").write_text(json.dumps({"tensorrt_version": "10.8.0", "profile": {"max": 32},
                                                   "plan_sha256": json.loads((version / "plan.json").read_text())[
                                                       "plan_sha256"]}))
    assert any("built with TensorRT 10.8.0" in p for p in check_repository(good))


def test_local_flavor_writes_a_plan_classifier_for_the_python_backend(tmp_path):
    """What the local flavor writes around a plan; tests/gpu runs a real plan where TensorRT exists."""
    plan = _fake_plan(tmp_path / "plans", "10.5.0", 8)
    repo = build_repository(tiny_settings(tmp_path / "repo", flavor="local", plan=str(plan)))
    version = repo / "swin_tiny_patch4_window7_224_classifier" / "1"
    assert (version / "model.py").read_text() == (ROOT / "builder/repository/triton_models/classifier.py").read_text()
    assert sorted(p.relative_to(version).as_posix() for p in (version / "builder").rglob("*.py")) == [
        "builder/__init__.py", "builder/cli/__init__.py", "builder/cli/args.py", "builder/compare.py",
        "builder/core/__init__.py",
        "builder/core/contract.py", "builder/engines/__init__.py",
        "builder/engines/plan_check.py",
        "builder/engines/plan_runner.py",
        "builder/engines/trt.py", "builder/errors.py", "builder/settings/__init__.py", "builder/settings/parts.py",
        "builder/settings/repo.py", "builder/timing.py"]
    config = (version.parent / "config.pbtxt").read_text()
    assert 'backend: "python"' in config
    # The GPU preprocessing's output reaches the plan on the GPU (wrapped by DLPack), not copied to the host.
    assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS"' in config and 'string_value: "no"' in config
    with pytest.raises(BuilderError, match="cuda_graphs"):
        tiny_settings(tmp_path / "repo", flavor="local", plan=str(plan), cuda_graphs=True)


@pytest.mark.parametrize("make", [lambda: np.arange(12, dtype=np.float32).reshape(3, 4).__dlpack__(),
                                  lambda: np.arange(12, dtype=np.float32).reshape(3, 4)])
def test_dlpack_wrapper_refuses_host_memory(make):
    """The plan runner wraps device memory only; a real DLPack producer's host tensor gets a clear error."""
    pytest.importorskip("polygraphy")
    from builder.engines.plan_runner import device_view_from_dlpack

    with pytest.raises(BuilderError, match="not CUDA memory"):
        device_view_from_dlpack(make())


@pytest.mark.parametrize("damage", ["no sidecar", "other bytes", "no hash"])
def test_a_file_that_is_not_its_plan_is_refused_and_flagged(tmp_path, damage):
    """A 6-byte text file (or a plan whose sidecar is gone or lies) never becomes a served classifier."""
    plan = _fake_plan(tmp_path / "plans", "10.5.0", 32)
    good = build_repository(tiny_settings(tmp_path / "repo", flavor="container", plan=str(plan)))
    assert check_repository(good) == []
    sidecar = plan.parent / "plan.json"
    if damage == "no sidecar":
        sidecar.unlink()
    elif damage == "other bytes":
        plan.write_bytes(b"hello\n")
    else:
        sidecar.write_text(json.dumps({"tensorrt_version": "10.5.0"}))
    with pytest.raises(BuilderError, match="plan: .*(no plan.json|not the serialized engine|no plan_sha256)"):
        build_repository(tiny_settings(tmp_path / "other", flavor="container", engine="tensorrt", plan=str(plan)))
    assert not (tmp_path / "other").exists()
    # The same damage inside a built repository is flagged by `builder check`.
    version = good / "swin_tiny_patch4_window7_224_classifier" / "1"
    if damage == "no sidecar":
        (version / "plan.json").unlink()
    elif damage == "other bytes":
        (version / "model.plan").write_bytes(b"hello\n")
    else:
        (version / "plan.json").write_text(json.dumps({"tensorrt_version": "10.5.0"}))
    assert any("plan:" in p for p in check_repository(good)), check_repository(good)
