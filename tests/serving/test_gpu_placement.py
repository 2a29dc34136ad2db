"""Every GPU of a host: one GPU list for every GPU-placed model, `builder serve`'s placement check and per-GPU
memory pools, and Kubernetes pods of N GPUs with the autoscaler's range scaled to match."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from builder import settings as s
from builder.errors import BuilderError
from builder.serving.pod import PodSettings
from builder.repository import configs
from builder.serving import gpus
from conftest import one_line_error, run_module, tiny_settings


@pytest.fixture(scope="module")
def placed_repo(tmp_path_factory):
    """A container-flavor repository whose GPU models are placed on GPU 1 (`--gpus 1`)."""
    from builder.repository.writer import build_repository

    return build_repository(tiny_settings(tmp_path_factory.mktemp("placed") / "repo", flavor="container",
                                          preprocess="gpu", engine="onnxruntime",
                                          classifier_instances=s.InstanceGroup("KIND_GPU", 2, (1,))))


def test_every_gpu_model_follows_the_one_gpu_list(placed_repo):
    groups = {}
    for path in placed_repo.glob("*/config.pbtxt"):
        config = configs.read(path)
        groups[config.name] = [(configs.mc.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus))
                               for g in config.instance_group]
    gpu_models = {name for name, found in groups.items() if any(kind == "KIND_GPU" for kind, _ in found)}
    # The classifier and the photo path (preprocessing on the GPU, BLS to the classifier) both on GPU 1.
    assert {"swin_tiny_patch4_window7_224_classifier", "swin_tiny_patch4_window7_224"} <= gpu_models, groups
    for name in gpu_models:
        assert all(ids == [1] for kind, ids in groups[name] if kind == "KIND_GPU"), (name, groups[name])
    assert gpus.placements(str(placed_repo)).keys() == gpu_models
    # Named differently by hand, the settings refuse: tensors handed between them would cross devices.
    with pytest.raises(BuilderError, match=r"preprocess_instances gpus: \[0\] differ from the classifier's \[1\]; "
                                           r"place every GPU model on the same GPUs"):
        s.RepoSettings(preprocess="gpu", classifier_instances=s.InstanceGroup("KIND_GPU", 1, (1,)),
                       preprocess_instances=s.InstanceGroup("KIND_GPU", 1, (0,)))
    # No list: every GPU for both (Triton's rule for a KIND_GPU group without ids).
    assert s.RepoSettings(preprocess="gpu").preprocess_instances.gpus == ()


def test_serve_refuses_gpus_the_host_lacks_in_one_line(placed_repo, tmp_path):
    assert gpus.placement_problem(str(placed_repo), [0, 1]) is None
    problem = gpus.placement_problem(str(placed_repo), [0])
    assert "is placed on GPU 1, which this host lacks (it has GPU 0)" in problem and "--gpus" in problem
    assert "this host has no GPU" in gpus.placement_problem(str(placed_repo), [])
    from builder.core.mps import host_gpus

    host = host_gpus()  # this host's real answer (CI: no GPU, so the refusal below)
    if host:
        pytest.skip(f"this host has GPUs {host}: the no-GPU refusal is not what it would say")
    one_line_error(run_module("builder", "serve", "--repository", str(placed_repo), "--workdir", str(tmp_path / "w")),
                   "gpus:", "run on GPUs (KIND_GPU) and this host has no GPU", "--instance-kind KIND_CPU")
    assert not (tmp_path / "w" / "tritonserver.pid").exists()


def test_serve_with_mps_refuses_in_one_line_where_mps_cannot_run(local_repo, tmp_path):
    """`builder serve --mps` without the driver's MPS control program: one line, and no server started."""
    import shutil

    if shutil.which("nvidia-cuda-mps-control"):
        pytest.skip("this host has nvidia-cuda-mps-control: tests/gpu runs the daemon for real")
    one_line_error(run_module("builder", "serve", "--mps", "--repository", str(local_repo), "--workdir",
                              str(tmp_path / "w")),
                   "mps: nvidia-cuda-mps-control is not on PATH", "serve without MPS (--no-mps")
    assert not (tmp_path / "w" / "tritonserver.pid").exists() and not (tmp_path / "w" / "mps-daemon").exists()
    # A daemon a killed server left (marker and processes: `-d` then said "already running") is ended by
    # `builder stop`: quit where the control program is, else killed. A daemon of another pipe folder (another
    # server's, or the host's own) is left alone. The processes stand in for the driver's (not on this host).
    from builder.core.mps import MpsDaemon

    def daemon(workdir, name):
        return subprocess.Popen([name, "600"], executable="sleep", env={**os.environ, **MpsDaemon(workdir).env()})

    (tmp_path / "w" / "mps-daemon").write_text("left behind")
    ours = [daemon(tmp_path / "w", "nvidia-cuda-mps-control"), daemon(tmp_path / "w", "nvidia-cuda-mps-server")]
    theirs = daemon(tmp_path / "other", "nvidia-cuda-mps-control")
    assert sorted(MpsDaemon(tmp_path / "w").pids()) == sorted(p.pid for p in ours)
    done = run_module("builder", "stop", "--workdir", str(tmp_path / "w"))
    assert done.returncode == 0 and "no tritonserver is running" in done.stdout
    assert not (tmp_path / "w" / "mps-daemon").exists() and [p.wait(timeout=10) for p in ours] == [-9, -9]
    assert theirs.poll() is None
    theirs.kill()


def test_every_gpu_gets_its_memory_pool():
    assert gpus.memory_pool_args(256, [0, 1, 2]) == [f"--cuda-memory-pool-byte-size={g}:268435456" for g in (0, 1, 2)]
    assert gpus.memory_pool_args(0, [0, 1]) == []


def test_kubernetes_pods_of_n_gpus_scale_their_resources_and_the_autoscaler(tmp_path):
    import kubernetes_validate

    from builder.serving import docker

    rendered = docker.render(docker.context(pod=PodSettings(gpus_per_pod=4, cuda_memory_pool_mb=256)))
    deployment, budget = [d for d in yaml.safe_load_all(rendered["k8s/deployment.yaml"]) if d]
    hpa = yaml.safe_load(rendered["k8s/hpa.yaml"])
    for doc in (deployment, budget, hpa):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "16", "memory": "32Gi", "nvidia.com/gpu": "4"}
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "4"}
    pools = [a for a in container["args"] if a.startswith("--cuda-memory-pool-byte-size=")]
    assert pools == [f"--cuda-memory-pool-byte-size={g}:268435456" for g in range(4)]
    # 2..8 GPUs in pods of 4: 1..2 replicas; one replica may be drained (no minAvailable: 1 deadlock).
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 2) == (deployment["spec"]["replicas"], 2)
    assert budget["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "swin-triton"}}}
    shm = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}["dshm"]
    assert shm["emptyDir"]["sizeLimit"] == "8Gi"
    # The CLI writes them; a pod bigger than the autoscaler's range is refused in one line.
    result = run_module("builder", "docker", "--output", str(tmp_path / "d"), "--gpus-per-pod", "8")
    assert result.returncode == 0, result.stderr
    assert 'nvidia.com/gpu: "8"' in (tmp_path / "d" / "k8s" / "deployment.yaml").read_text()
    one_line_error(run_module("builder", "docker", "--output", str(tmp_path / "e"), "--gpus-per-pod", "16"),
                   "max_gpus: 8 is less than one pod's 16 GPUs", "use at least 16")
