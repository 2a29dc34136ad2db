"""Model versions: a new version lands beside the served one while requests keep flowing."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from builder import settings as s
from builder.repository.check import check_repository
from builder.errors import BuilderError
from builder.core.manifest import file_hashes, read_manifest
from builder.repository.writer import build_repository
from builder.serving.server import LocalServer, ServerSettings
from conftest import TINY_KWARGS, free_ports, tiny_settings



def new_version_settings(repo, seed):
    return tiny_settings(repo, source=s.ModelSource(s.DEFAULT_MODEL, model_kwargs=TINY_KWARGS, seed=seed))


def test_add_version_keeps_the_served_one(local_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    before = file_hashes(repo)
    build_repository(new_version_settings(repo, seed=11), add_version=True)
    classifier = repo / "swin_tiny_patch4_window7_224_classifier"
    assert sorted(p.name for p in classifier.iterdir() if p.is_dir()) == ["1", "2"]
    after = file_hashes(repo)
    assert all(after[k] == v for k, v in before.items() if "/1/" in k)  # version 1 untouched
    manifest = read_manifest(repo)
    assert [v["version"] for v in manifest["model_versions"]] == [1, 2]
    assert manifest["model_versions"][1]["weights"] == "random:seed=11"
    assert manifest["files"] == after
    assert check_repository(repo) == []
    with pytest.raises(BuilderError, match="serves 'swin_tiny_patch4_window7_224', not 'other'"):
        build_repository(tiny_settings(repo, name="other"), add_version=True)


def test_version_policy_latest_two(local_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    build_repository(tiny_settings(repo, source=s.ModelSource(s.DEFAULT_MODEL, model_kwargs=TINY_KWARGS, seed=12),
                                   version_policy=s.VersionPolicy("latest", 2)), add_version=True,
                     overrides=("version_policy",))
    text = (repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").read_text()
    assert "num_versions: 2" in text


def test_a_new_version_keeps_the_served_config_and_says_so(local_repo, tmp_path):
    """A roll-out (`make repo ADD_VERSION=1 WEIGHTS=...`) keeps what the served config was tuned in: instances,
    queue delay, a rollback pin; an option given on the command line wins, and each difference is logged."""
    from builder.repository import configs
    from conftest import run_module

    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    path = repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt"
    tuned = configs.read(path)  # as `perf tune --write` and a hand-made rollback pin leave it
    tuned.instance_group[0].count = 3
    tuned.dynamic_batching.max_queue_delay_microseconds = 2000
    tuned.version_policy.specific.versions.append(1)
    configs.write(tuned, path.parent)
    result = run_module("builder", "repo", "--add-version", "--model-kwargs", TINY_KWARGS, "--seed", "21",
                        "--max-batch-size", "8", "--output", str(repo))
    assert result.returncode == 0, result.stderr
    served = configs.read(path)
    assert served.instance_group[0].count == 3 and served.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(served.version_policy.specific.versions) == [1]
    assert "keeping the served instance_group {count: 3 kind: KIND_CPU}" in result.stderr
    assert "pass --instance-count or --instance-kind or --gpus to change it" in result.stderr
    assert "version 2 is written but not served: the served version policy pins [1]" in result.stderr
    assert check_repository(repo) == []
    result = run_module("builder", "repo", "--add-version", "--model-kwargs", TINY_KWARGS, "--seed", "22",
                        "--max-batch-size", "8", "--output", str(repo), "--instance-count", "2",
                        "--version-policy", "latest:1")
    assert result.returncode == 0, result.stderr
    served = configs.read(path)
    assert served.instance_group[0].count == 2 and served.dynamic_batching.max_queue_delay_microseconds == 2000
    assert served.version_policy.latest.num_versions == 1
    assert "instance_group {count: 3 kind: KIND_CPU} -> {count: 2 kind: KIND_CPU} (--instance-count given)" \
        in result.stderr


def _logits(client, ensemble, image):
    array = np.array([[image]], dtype=object)
    tensor = grpcclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(array)
    return client.infer(ensemble, [tensor], outputs=[grpcclient.InferRequestedOutput("logits")]).as_numpy("logits")


@pytest.mark.server
def test_hot_update_with_no_failed_request(local_repo, contract, photos, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    http, grpc, metrics = free_ports(3)
    server = LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv"),
                                        model_control="poll", poll_seconds=1)).start()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    old = _logits(client, contract.ensemble, photos[0])
    seen, failures, stop = [], [], threading.Event()

    def traffic():
        # Plain tritonclient, no retries: any failed request counts.
        own = grpcclient.InferenceServerClient(server.grpc_url)
        while not stop.is_set():
            try:
                seen.append(_logits(own, contract.ensemble, photos[0]))
            except Exception as exc:
                failures.append(str(exc))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        build_repository(new_version_settings(repo, seed=21), add_version=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if client.is_model_ready(contract.classifier, "2") and not client.is_model_ready(contract.classifier, "1"):
                break
            time.sleep(0.5)
        time.sleep(1.5)  # keep traffic on the new version for a while
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    try:
        assert client.is_model_ready(contract.classifier, "2")
        assert not client.is_model_ready(contract.classifier, "1")  # retired by latest:1
        new = _logits(client, contract.ensemble, photos[0])
        index = json.loads(json.dumps(client.get_model_repository_index(as_json=True)))
        assert any(m.get("version") == "2" and m.get("state") == "READY" for m in index["models"]
                   if m["name"] == contract.classifier)
    finally:
        server.stop()
    assert not failures, failures[:3]
    assert not np.allclose(old, new)  # the new weights really serve now
    assert any(np.array_equal(x, old) for x in seen) and any(np.array_equal(x, new) for x in seen)
    assert len(seen) > 20


def test_a_new_version_keeps_both_batch_limits(tmp_path):
    """Versions share one config per model: the ensemble's limit and the classifier's are both compared."""
    from builder.repository.versions import contract_changes

    served = tiny_settings(tmp_path / "repo")
    previous = {"contract": {"max_batch_size": served.ensemble_max_batch},
                "settings": {"classifier_batching": {"max_batch_size": served.classifier_batching.max_batch_size},
                             "preprocess": served.preprocess}}
    assert contract_changes(previous, served) == []
    smaller_photo_batches = tiny_settings(tmp_path / "repo", preprocess_batching=s.Batching(2, (), 2000))
    assert contract_changes(previous, smaller_photo_batches) == [("max_batch_size", served.ensemble_max_batch, 2)]
    larger_classifier = tiny_settings(tmp_path / "repo", classifier_batching=s.Batching(16, (), 2000))
    assert [name for name, _, _ in contract_changes(previous, larger_classifier)] == ["classifier max_batch_size"]
