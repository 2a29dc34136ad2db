"""The build settles a GPU photo path's processes, batch limit and MPS by measuring the served code (issue "Fast as
built"): on this CPU host it records that it could not measure; the measurement itself runs here on the CPU with
the same code and processes as on a GPU, and the winner is what the staged photo-path model is written with."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from builder import settings as s
from builder.core.contract import Contract
from builder.core.manifest import read_manifest
from builder.errors import BuilderError
from builder.repository import configs
from builder.repository.check import check_repository
from builder.repository.photo_setup import choose
from builder.repository.writer import build_repository, settle_photo_setup
from conftest import MAX_BATCH, tiny_settings


@pytest.fixture(scope="module")
def gpu_instances_repo(tmp_path_factory):
    """A GPU photo path on GPU instances (fused, 2 processes), built on this CPU host."""
    return build_repository(tiny_settings(
        tmp_path_factory.mktemp("photo-setup") / "repo", preprocess="gpu", engine="inductor", torch_compile="none",
        preprocess_instances=s.InstanceGroup("KIND_GPU", 2), classifier_instances=s.InstanceGroup("KIND_GPU", 1)))


def test_a_build_without_a_gpu_records_why_the_setup_was_not_measured(gpu_instances_repo):
    manifest = read_manifest(gpu_instances_repo)
    record = manifest["photo_setup"]
    assert record == {"measured": False, "reason": "no CUDA GPU on the build host",
                      "chosen": {"processes": 2, "batch": MAX_BATCH,
                                 "mps": False}}
    readme = (gpu_instances_repo / "README.md").read_text()
    assert "## Photo path setup" in readme and "Not measured (no CUDA GPU on the build host)" in readme
    assert "--preprocess-instances N" in readme and "--photo-setup fixed" in readme


def test_the_measured_winner_is_what_the_photo_path_is_written_with(gpu_instances_repo, tmp_path):
    """Measured on the CPU (same code, processes and timing as on a GPU; MPS needs a GPU, so off only); a batch
    limit above the classifier's max batch (12 > 8) is classified in chunks of the classifier's, as served."""
    repo = tmp_path / "repo"
    shutil.copytree(gpu_instances_repo, repo, symlinks=True)
    manifest = read_manifest(repo)
    contract = Contract.named(manifest["contract"]["ensemble"])
    contract = Contract(contract.ensemble, tuple(manifest["contract"]["tensors"]["input"]["dims"][1:]),
                        manifest["model"]["num_classes"])
    parameters = {k: v.string_value for k, v in configs.read(repo / contract.preprocess / "config.pbtxt")
                  .parameters.items()}
    built = tiny_settings(repo, preprocess="gpu", engine="inductor", torch_compile="none",
                          preprocess_instances=s.InstanceGroup("KIND_GPU", 2), gpu_photo_path="fused",
                          classifier_instances=s.InstanceGroup("KIND_GPU", 1),
                          photo_setup=s.PhotoSetup(processes=(1, 2), batches=(1, MAX_BATCH + 4), mps=(False,), seconds=0.3,
                                                   budget_ms=60_000))
    labels = (repo / contract.ensemble / "labels.txt").read_text().splitlines()
    settled, record = settle_photo_setup(built, "fused", repo, contract, parameters, labels, False, device="cpu")
    assert record["measured"] and record["device"] == "cpu" and record["gpu"] == "none"
    assert sorted((r["processes"], r["batch"], r["mps"]) for r in record["rows"]) == [
        (1, 1, False), (1, MAX_BATCH + 4, False), (2, 1, False), (2, MAX_BATCH + 4, False)]
    assert all(r["img_per_s"] > 0 and r["batch_p50_ms"] > 0 for r in record["rows"])
    chosen = record["chosen"]
    assert chosen == {k: choose(record["rows"], 60_000)[k] for k in chosen}
    config = configs.read(repo / contract.ensemble / "config.pbtxt")
    assert (config.instance_group[0].count, config.max_batch_size) == (chosen["processes"], chosen["batch"])
    assert (settled.preprocess_instances.count, settled.preprocess_batching.max_batch_size) == (
        chosen["processes"], chosen["batch"])
    assert settled.serve_with_mps is False and check_repository(repo) == []


def test_the_budget_and_the_grid_are_checked():
    rows = [{"processes": 8, "batch": 64, "mps": True, "img_per_s": 9000, "batch_p50_ms": 70},
            {"processes": 8, "batch": 32, "mps": True, "img_per_s": 8000, "batch_p50_ms": 40},
            {"processes": 4, "batch": 32, "mps": False, "img_per_s": 6000, "batch_p50_ms": 30}]
    assert choose(rows, 50)["batch"] == 32 and choose(rows, 100)["batch"] == 64 and choose(rows, 10) is None
    with pytest.raises(BuilderError, match="photo_setup: 'auto' is unknown; use one of measure, fixed"):
        s.PhotoSetup(mode="auto")
    with pytest.raises(BuilderError, match=r"photo_setup processes: \[0\] holds no count of 1 or more"):
        s.PhotoSetup(processes=(0,))
    with pytest.raises(BuilderError, match="photo_batch_budget_ms: 0 ms"):
        s.PhotoSetup(budget_ms=0)
    measured = dataclasses.replace(s.RepoSettings(preprocess="gpu"), mps=False)
    assert measured.serve_with_mps is False and s.RepoSettings(preprocess="gpu").serve_with_mps is False
