"""Real export, ONNX Runtime validation, manifest, atomic writes, weights sources, the designs written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from builder import settings as s
from builder.errors import BuilderError
from builder.core.manifest import file_hashes, read_manifest
from builder.repository import configs
from builder.repository.writer import build_repository
from conftest import MAX_BATCH, TINY_KWARGS, tiny_settings


def test_onnx_export_contract(local_repo, contract, tiny_model):
    path = local_repo / contract.classifier / "1" / "model.onnx"
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert any(n.op_type == "LayerNormalization" for n in model.graph.node)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 224, 224]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 8):  # the batch axis is really dynamic
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        got = session.run(None, {"input": x})[0]
        with torch.no_grad():
            ref = tiny_model.module(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 1000)
        assert np.abs(got - ref).max() < 1e-4


def test_manifest(local_repo, contract):
    manifest = read_manifest(local_repo)
    assert manifest["flavor"] == "local"
    assert manifest["target"] == {"tritonserver": "2.51.0", "ngc_release": "24.10"}
    assert manifest["versions"]["torch"] and manifest["versions"]["timm"] and manifest["versions"]["onnxruntime"]
    assert manifest["model"]["weights"] == "random:seed=0" and manifest["model"]["random_weights"] is True
    parity = manifest["parity"]["onnxruntime_vs_pytorch"]
    assert parity["max_abs"] < 1e-3 and parity["min_cosine"] > 0.9999 and parity["top1_agreement"] == 1.0
    assert manifest["files"] == file_hashes(local_repo)
    assert f"{contract.classifier}/1/model.onnx" in manifest["files"]
    assert manifest["preprocess"]["interpolation"] == "bicubic"


def test_container_flavor_uses_native_backend(tmp_path):
    repo = build_repository(tiny_settings(tmp_path / "repo", flavor="container"))
    text = (repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "KIND_GPU" in text
    assert not (repo / "swin_tiny_patch4_window7_224_classifier" / "1" / "model.py").exists()
    # Same contract as the local flavor: identical ensemble, pre- and postprocess configs.
    local = build_repository(tiny_settings(tmp_path / "local", flavor="local"))
    for model in ("swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224_preprocess",
                  "swin_tiny_patch4_window7_224_postprocess"):
        assert (repo / model / "config.pbtxt").read_text() == (local / model / "config.pbtxt").read_text()


def test_failed_build_leaves_previous_repository(tmp_path):
    output = tmp_path / "model_repository"
    build_repository(tiny_settings(output))
    before = file_hashes(output)
    strict = tiny_settings(output, parity=s.Parity(max_abs=1e-12), source=s.ModelSource(
        s.DEFAULT_MODEL, model_kwargs=TINY_KWARGS, seed=7))
    with pytest.raises(BuilderError, match="fails parity.*previous repository is left in place"):
        build_repository(strict)
    assert file_hashes(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository", "monitoring"]  # no staging leftovers


def test_interrupted_build_leaves_previous_repository(tmp_path):
    output = tmp_path / "model_repository"
    build_repository(tiny_settings(output))
    before = file_hashes(output)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    # Ctrl-C's default action in the child, whatever this process inherited: a shell's background job (how
    # some CI runners start suites) ignores SIGINT, and Python then installs no KeyboardInterrupt for it.
    proc = subprocess.Popen([sys.executable, "-m", "builder", "repo", "--flavor", "local", "--output", str(output),
                             "--model-kwargs", TINY_KWARGS, "--seed", "3"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # interrupt it in the middle of the export
        if "[2/5]" in line:
            proc.send_signal(2)
            break
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert file_hashes(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository", "monitoring"]


def test_checkpoint_weights(tmp_path, tiny_model):
    from safetensors.torch import save_file

    state = {k: v.clone() + 0.01 for k, v in tiny_model.module.state_dict().items()}
    for name, save in (("w.safetensors", save_file), ("w.pt", lambda st, p: torch.save({"state_dict": st}, p))):
        path = tmp_path / name
        save(state, str(path))
        source = s.ModelSource(s.DEFAULT_MODEL, checkpoint=str(path), model_kwargs=TINY_KWARGS)
        repo = build_repository(tiny_settings(tmp_path / f"repo-{name}", source=source))
        assert read_manifest(repo)["model"]["weights"] == f"checkpoint:{path}"
    wrong = tmp_path / "wrong.safetensors"
    save_file({"head.fc.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(BuilderError, match="does not fit"):
        build_repository(tiny_settings(tmp_path / "x", source=s.ModelSource(
            s.DEFAULT_MODEL, checkpoint=str(wrong), model_kwargs=TINY_KWARGS)))


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "builder", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_pretrained_offline_fails_clearly(tmp_path):
    result = _cli("repo", "--pretrained", "--output", str(tmp_path / "r"), "--model-kwargs", TINY_KWARGS,
                  env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "could not be downloaded from timm's hub" in result.stderr and "--checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--max-batch-size", "0"], "max_batch_size: is 0"),
    (["--model", "resnet_nonexistent"], "timm has no model"),
    (["--preferred-batch-sizes", "64"], "preferred_batch_sizes"),
    (["--model-kwargs", "{\"embed_dim\": 16, \"bogus\": 1}"], "model_kwargs"),
])
def test_cli_user_errors(tmp_path, args, message):
    result = _cli("repo", "--output", str(tmp_path / "r"), *args)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in result.stderr


def test_help_is_fast():
    """`--help` imports none of the heavy libraries (torch, timm, ONNX, tritonclient): that keeps it instant."""
    from conftest import heavy_imports_of_help

    for command in ((), ("repo",), ("serve",), ("monitoring",), ("docker",)):
        assert heavy_imports_of_help("builder", *command) == [], command


def test_swinv2_builds_with_its_own_data_config(tmp_path):
    source = s.ModelSource("swinv2_tiny_window8_256", model_kwargs=TINY_KWARGS)
    repo = build_repository(tiny_settings(tmp_path / "v2", source=source))
    manifest = read_manifest(repo)
    assert manifest["contract"]["ensemble"] == "swinv2_tiny_window8_256"
    assert manifest["contract"]["tensors"]["input"]["dims"] == [3, 256, 256]
    assert manifest["preprocess"]["image_size"] == "256,256" and manifest["preprocess"]["scale_size"] == "284,284"
    assert manifest["parity"]["onnxruntime_vs_pytorch"]["top1_agreement"] == 1.0


def test_the_ensemble_takes_the_smaller_batch_limit_and_the_gpu_photo_path_has_no_ensemble_design(tmp_path):
    """The exact ensemble with a preprocess model that takes smaller batches than the classifier
    (--preprocess-max-batch-size): the ensemble takes the smaller of the two, as Triton requires of every step. The
    GPU photo path's designs are one model; Triton's ensemble of the GPU preprocess model was dropped (slowest in
    every measured row), and the BLS design's old name is refused, naming the new one."""
    repo = build_repository(tiny_settings(tmp_path / "repo", preprocess_batching=s.Batching(MAX_BATCH // 2, (), 2000,
                                                                                           max_queue_size=0)))
    config = configs.read(repo / "swin_tiny_patch4_window7_224" / "config.pbtxt")
    assert config.platform == "ensemble" and len(config.ensemble_scheduling.step) == 3
    assert config.max_batch_size == MAX_BATCH // 2 == read_manifest(repo)["contract"]["max_batch_size"]
    assert configs.read(repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").max_batch_size == MAX_BATCH
    from builder.repository.check import check_repository

    assert check_repository(repo) == []
    for dropped in ("ensemble", "pipeline"):
        with pytest.raises(BuilderError, match=f"gpu_photo_path: '{dropped}' is unknown; use one of auto, fused, "
                                               "bls, hybrid"):
            s.RepoSettings(preprocess="gpu", gpu_photo_path=dropped)


def test_inductor_engine_in_the_container_flavor(tmp_path):
    """The same Python-backend classifier in the container flavor (an image built WITH_TORCH=1 runs it)."""
    from builder.repository.check import check_repository

    repo = build_repository(tiny_settings(tmp_path / "repo", flavor="container", engine="inductor",
                                          torch_compile="none"))
    classifier = repo / "swin_tiny_patch4_window7_224_classifier"
    assert 'backend: "python"' in (classifier / "config.pbtxt").read_text()
    assert (classifier / "1" / "model.pt2").is_file() and check_repository(repo) == []
    assert read_manifest(repo)["engine"] == {**read_manifest(repo)["engine"], "requested": "inductor",
                                             "chosen": "inductor"}


def test_the_repository_readme_names_the_photo_path_design_and_mps():
    """The generated README says what the model under the ensemble's name is, and to serve many GPU photo-path
    instances under MPS."""
    from builder.core.contract import Contract
    from builder.repository.readme import render

    contract = Contract("swin_tiny_patch4_window7_224", (3, 224, 224), 1000)
    choice = {"requested": "inductor", "chosen": "inductor", "reason": "asked"}
    many = render(s.RepoSettings(preprocess="gpu", engine="inductor", gpu_photo_path="fused",
                                 preprocess_instances=s.InstanceGroup("KIND_GPU", 6)), contract, choice, {})
    assert "(`fused`)" in many and "6 instances per GPU" in many and "builder serve --mps" in many
    assert "`--gpu-photo-path hybrid`" in many  # with many instances it served more than fused and bls
    two = render(s.RepoSettings(preprocess="gpu", engine="onnxruntime", gpu_photo_path="bls"), contract, choice, {})
    assert "(`bls`)" in two and "--mps" not in two
    assert "`transform_graphs`" in two and "`transform_graphs`" in many  # every GPU photo path: how to turn off
    exact = render(s.RepoSettings(), contract, choice, {})
    assert "the three in one request (Triton ensemble)" in exact and "--mps" not in exact
    assert "transform_graphs" not in exact
