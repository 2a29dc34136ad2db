"""A user's files survive every command: rebuilds, the server's workdir, docker files (issue: Trust)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.errors import BuilderError
from builder.repository.check import check_repository
from builder.core.manifest import file_hashes, read_manifest
from builder.repository.writer import build_repository
from conftest import TINY_KWARGS, one_line_error, run_module, tiny_settings

ROOT = Path(__file__).resolve().parents[2]






def _add_users_things(repo: Path) -> dict:
    """Another model, a notes file and a file inside one of our model folders, as a user adds them."""
    other = repo / "their_model"
    (other / "1").mkdir(parents=True)
    (other / "1" / "model.py").write_text("# someone else's model\n")
    (other / "config.pbtxt").write_text('name: "their_model"\nbackend: "python"\n')
    (repo / "NOTES.md").write_text("ops notes\n")
    (repo / "swin_tiny_patch4_window7_224_classifier" / "CHANGELOG").write_text("v1 rolled out\n")
    return {p.relative_to(repo).as_posix(): p.read_bytes() for p in
            [other / "1" / "model.py", other / "config.pbtxt", repo / "NOTES.md",
             repo / "swin_tiny_patch4_window7_224_classifier" / "CHANGELOG"]}


def test_rebuild_keeps_what_the_user_put_in_the_repository(local_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    theirs = _add_users_things(repo)
    built = run_module("builder", "repo", "--flavor", "local", "--model-kwargs", TINY_KWARGS, "--seed", "3",
                 "--output", str(repo))
    assert built.returncode == 0, built.stderr
    assert "kept 3 entries of yours" in built.stderr
    for path, data in theirs.items():
        assert (repo / path).read_bytes() == data, path
    manifest = read_manifest(repo)
    assert manifest["model"]["weights"] == "random:seed=3"  # the rebuild did happen
    assert "NOTES.md" not in manifest["files"]  # still the user's, still carried next time


def test_a_build_that_fails_at_its_monitoring_files_leaves_the_previous_repository(local_repo, tmp_path):
    """The dashboard's library missing (a GPU host once lacked it): one line, and the repository and its monitoring
    folder are the previous ones (they were written after the repository had moved in)."""
    import sys

    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    shutil.copytree(local_repo.parent / "monitoring", tmp_path / "monitoring")
    before, watched = file_hashes(repo), file_hashes(tmp_path / "monitoring")
    manifest = (repo / "manifest.json").read_text()
    # Python's own way to make a package unimportable: a None entry in sys.modules.
    script = ("import sys; sys.modules['grafana_foundation_sdk'] = None; from builder.__main__ import main; "
              "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "repo", "--flavor", "local", "--model-kwargs",
                             TINY_KWARGS, "--seed", "3", "--output", str(repo)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    one_line_error(result, "grafana-foundation-sdk", "install the project's packages")
    assert file_hashes(repo) == before and file_hashes(tmp_path / "monitoring") == watched
    assert (repo / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitoring", "repo"]  # no staging folder left


def test_rebuild_refuses_a_users_entry_in_the_way(local_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    (repo / "named_like_ours_classifier").mkdir()
    (repo / "named_like_ours_classifier" / "keep.txt").write_text("mine\n")
    before = file_hashes(repo)
    with pytest.raises(BuilderError, match="holds named_like_ours_classifier, which this tool did not write"):
        build_repository(tiny_settings(repo, name="named_like_ours"))
    assert file_hashes(repo) == before


def test_a_new_version_refuses_contract_changes(local_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    before = file_hashes(repo)
    for extra, field in ((["--max-batch-size", "4"], "max_batch_size 8 -> 4"),
                         (["--preprocess", "draft"], "preprocess 'exact' -> 'draft'")):
        result = run_module("builder", "repo", "--add-version", "--model-kwargs", TINY_KWARGS, "--max-batch-size", "8",
                      "--output", str(repo), *extra)
        one_line_error(result, "add_version:", field, "without --add-version")
        assert file_hashes(repo) == before
    size = json.dumps({**json.loads(TINY_KWARGS), "img_size": 192})
    result = run_module("builder", "repo", "--add-version", "--model-kwargs", size, "--max-batch-size", "8",
                  "--output", str(repo))
    one_line_error(result, "add_version:", "tensors input", "[3, 224, 224]", "[3, 192, 192]")
    assert file_hashes(repo) == before


def test_check_compares_every_version_with_the_config(local_repo, tmp_path):
    """A version built for another image size is found in the local flavor too (the Python classifier)."""
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    other = build_repository(tiny_settings(tmp_path / "other", source=tiny_settings(tmp_path).source.__class__(
        "swin_tiny_patch4_window7_224", model_kwargs=json.dumps({**json.loads(TINY_KWARGS), "img_size": 192}))))
    classifier = "swin_tiny_patch4_window7_224_classifier"
    shutil.copytree(other / classifier / "1", repo / classifier / "2")
    manifest = json.loads((repo / "manifest.json").read_text())
    manifest["model_versions"].append({**manifest["model_versions"][0], "version": 2, "preprocess": "gpu"})
    (repo / "manifest.json").write_text(json.dumps(manifest))
    problems = check_repository(repo)
    assert any("input 'input' has ONNX shape [-1, 3, 192, 192]" in p for p in problems), problems
    assert any("version 2 was built with preprocess 'gpu'" in p for p in problems), problems


def test_make_repo_keeps_the_flavor_of_an_existing_repository(local_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    built = run_module("builder", "repo", "--model-kwargs", TINY_KWARGS, "--output", str(repo))
    assert built.returncode == 0, built.stderr
    assert "keeping" in built.stderr and "local flavor" in built.stderr
    assert read_manifest(repo)["flavor"] == "local"
    assert 'backend: "python"' in (repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").read_text()
    assert check_repository(repo) == []


def test_serve_never_deletes_a_workdir_it_did_not_make(local_repo, tmp_path):
    workdir = tmp_path / "work"
    (workdir / "tritonserver").mkdir(parents=True)
    (workdir / "tritonserver" / "precious.txt").write_text("mine\n")
    result = run_module("builder", "serve", "--repository", str(local_repo), "--workdir", str(workdir),
                  "--http-port", "1", "--grpc-port", "2", "--metrics-port", "3", "--timeout", "5")
    one_line_error(result, "workdir:", "was not made by this tool")
    assert (workdir / "tritonserver" / "precious.txt").read_text() == "mine\n"
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(run_module("builder", "serve", "--repository", str(local_repo), "--workdir", str(afile)),
                    "workdir:", "is a file")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        one_line_error(run_module("builder", "serve", "--repository", str(local_repo), "--workdir", str(locked / "w")),
                        "workdir:")


def test_docker_files_never_overwrite_the_users(tmp_path):
    out = tmp_path / "docker"
    out.mkdir()
    (out / "compose.yaml").write_text("services: {mine: {image: busybox}}\n")
    one_line_error(run_module("builder", "docker", "--output", str(out)), "output:", "compose.yaml", "did not generate")
    assert (out / "compose.yaml").read_text() == "services: {mine: {image: busybox}}\n"
    assert sorted(p.name for p in out.iterdir()) == ["compose.yaml"]
    (out / "compose.yaml").unlink()
    assert run_module("builder", "docker", "--output", str(out)).returncode == 0
    assert run_module("builder", "docker", "--output", str(out)).returncode == 0  # its own files are replaced
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_line_error(run_module("builder", "docker", "--output", str(afile)), "output:", "is a file")


def test_stop_never_signals_a_process_that_is_not_our_server(tmp_path):
    """A stale pid file naming another process: `builder stop` leaves that process alone."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        workdir = tmp_path / "srv"
        workdir.mkdir()
        (workdir / "tritonserver.pid").write_text(str(bystander.pid))
        result = run_module("builder", "stop", "--workdir", str(workdir))
        assert result.returncode == 0 and "no tritonserver is running" in result.stdout, result
        assert "not a tritonserver" in result.stderr
        assert bystander.poll() is None  # still running
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.server
def test_a_fine_tuned_checkpoint_is_served_with_its_own_class_names(tmp_path, photo_paths):
    """`--labels`: the user's names reach the manifest and Triton's classification extension on both protocols,
    and a new version keeps them."""
    import torch

    from builder.export.model import load_model
    from builder.serving.server import LocalServer, ServerSettings, free_ports
    from builder.settings import ModelSource

    kwargs = json.dumps({**json.loads(TINY_KWARGS), "num_classes": 4})
    checkpoint = tmp_path / "fine_tuned.pt"
    torch.save(load_model(ModelSource(model_kwargs=kwargs, seed=5)).module.state_dict(), checkpoint)
    names = ["tabby cat", "golden retriever", "rocket", "coffee mug"]
    labels = tmp_path / "classes.txt"
    labels.write_text("\n".join(names) + "\n\n", encoding="utf-8")
    repo = tmp_path / "repo"
    common = ["--flavor", "local", "--model-kwargs", kwargs, "--checkpoint", str(checkpoint), "--output", str(repo)]
    built = run_module("builder", "repo", *common, "--labels", str(labels))
    assert built.returncode == 0, built.stderr
    assert read_manifest(repo)["model"]["labels"]["source"] == f"file:{labels}"
    short = tmp_path / "three.txt"
    short.write_text("\n".join(names[:3]))
    one_line_error(run_module("builder", "repo", *common, "--labels", str(short), "--add-version"),
                   "labels:", "3 name(s) and the model has 4 classes")
    again = run_module("builder", "repo", *common, "--add-version")  # no --labels: the served names are kept
    assert again.returncode == 0 and "keeping the served class names" in again.stderr, again.stderr
    http, grpc, metrics = free_ports(3)
    with LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv"))) as server:
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            result = run_module("clients", "classify", "--url", url, "--protocol", protocol, "--top-k", "4",
                                "--json", str(photo_paths[3]))
            assert result.returncode == 0, result.stderr
            served = {entry["label"] for entry in json.loads(result.stdout.splitlines()[0])["predictions"]}
            assert served == set(names), (protocol, result.stdout)
        more = run_module("clients", "classify", "--url", server.grpc_url, "--top-k", "6", str(photo_paths[3]),
                          str(photo_paths[4]))
        assert more.returncode == 0 and more.stderr.count("note: --top-k 6 is above the model's 4 classes") == 1
