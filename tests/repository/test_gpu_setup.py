"""Fast as built: a GPU photo path gets the measured setup without tuning numbers, its classifier runs where its
engine runs, and the repository says how it is served (MPS)."""

from __future__ import annotations

from builder import settings as s
from builder.core.manifest import read_manifest
from builder.repository import configs
from builder.repository.check import check_repository
from conftest import TINY_KWARGS, one_line_error, run_module


def _instances(config):
    return [(group.count, configs.mc.ModelInstanceGroup.Kind.Name(group.kind)) for group in config.instance_group]


def test_the_gpu_photo_path_is_built_with_the_measured_setup(tmp_path):
    repo = tmp_path / "repo"
    built = run_module("builder", "repo", "--flavor", "local", "--preprocess", "gpu", "--model-kwargs", TINY_KWARGS,
                       "--output", str(repo))
    assert built.returncode == 0, built.stderr
    assert "GPU photo path setup (measured on H100/H200" in built.stderr
    manifest = read_manifest(repo)
    contract = manifest["contract"]
    setup = s.GPU_PHOTO_PATH_SETUP
    photo = configs.read(repo / contract["ensemble"] / "config.pbtxt")
    classifier = configs.read(repo / f"{contract['ensemble']}_classifier" / "config.pbtxt")
    assert _instances(photo) == [(setup["preprocess_instances"], "KIND_GPU")]
    assert photo.max_batch_size == setup["preprocess_max_batch_size"]
    # The classifier takes the photo path's GPU tensors: on the GPU although this build host has none.
    assert _instances(classifier) == [(setup["instance_count"], "KIND_GPU")]
    assert classifier.max_batch_size == setup["max_batch_size"]
    assert tuple(classifier.dynamic_batching.preferred_batch_size) == setup["preferred_batch_sizes"]
    assert classifier.dynamic_batching.max_queue_delay_microseconds == setup["max_queue_delay_us"]
    assert classifier.dynamic_batching.default_queue_policy.max_queue_size == setup["max_queue_size"]
    assert manifest["serve"] == {"mps": True} and check_repository(repo) == []
    # Here, without a GPU: refused in one line before any server starts.
    one_line_error(run_module("builder", "serve", "--repository", str(repo), "--workdir", str(tmp_path / "w")),
                   "gpus:", "this host has no GPU")


def test_an_option_given_wins_over_the_setup_and_the_classifier_follows_its_engine(tmp_path):
    repo = tmp_path / "repo"
    built = run_module("builder", "repo", "--flavor", "local", "--preprocess", "gpu", "--preprocess-instances", "2",
                       "--max-batch-size", "16", "--model-kwargs", TINY_KWARGS, "--output", str(repo))
    assert built.returncode == 0, built.stderr
    manifest = read_manifest(repo)
    ensemble = manifest["contract"]["ensemble"]
    assert _instances(configs.read(repo / ensemble / "config.pbtxt")) == [(2, "KIND_GPU")]
    classifier = configs.read(repo / f"{ensemble}_classifier" / "config.pbtxt")
    assert classifier.max_batch_size == 16 and _instances(classifier) == [(2, "KIND_GPU")]
    assert manifest["serve"] == {"mps": False}  # two processes: MPS is for several
    # The exact preprocessing with ONNX Runtime: the classifier stays on the CPU, as before.
    plain = tmp_path / "plain"
    assert run_module("builder", "repo", "--flavor", "local", "--model-kwargs", TINY_KWARGS,
                      "--output", str(plain)).returncode == 0
    classifier = configs.read(plain / f"{ensemble}_classifier" / "config.pbtxt")
    assert _instances(classifier) == [(1, "KIND_CPU")] and classifier.max_batch_size == s.Batching().max_batch_size
    # A GPU photo path whose classifier was put on the CPU by hand: refused by the build's own check.
    one_line_error(run_module("builder", "repo", "--flavor", "local", "--preprocess", "gpu", "--instance-kind",
                              "KIND_CPU", "--model-kwargs", TINY_KWARGS, "--output", str(tmp_path / "cpu")),
                   "runs on CPU instances (KIND_CPU)", "--instance-kind KIND_GPU")
    assert not (tmp_path / "cpu").exists()


def test_make_serve_serves_as_the_build_chose_unless_told():
    from test_cli_args import _make_argv

    assert not {"--mps", "--no-mps"} & set(_make_argv("serve"))
    assert "--no-mps" in _make_argv("serve", "MPS=0") and "--mps" in _make_argv("serve", "MPS=1")
