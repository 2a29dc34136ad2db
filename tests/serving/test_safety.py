"""No data lost, no silent failure: what a newcomer's mistakes must do (one line, exit 1, nothing touched)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from builder import settings as s
from builder.repository.check import check_repository
from builder.repository.output import clean_stale, swap_into_place
from builder.core.manifest import file_hashes, read_manifest
from builder.repository.writer import build_repository
from conftest import TINY_KWARGS, free_ports, one_line_error, ready_stub, run_module, tiny_settings

ROOT = Path(__file__).resolve().parents[2]






def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


# -- --output -------------------------------------------------------------------

def test_output_never_replaces_a_foreign_folder(tmp_path):
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "important.txt").write_text("keep me")
    before = _tree(folder)
    start = time.perf_counter()
    result = run_module("builder", "repo", "--output", str(folder), "--model-kwargs", TINY_KWARGS)
    one_line_error(result, "not a model repository written by this tool", "--output")
    assert time.perf_counter() - start < 20  # refused before the model loads
    assert _tree(folder) == before
    regular = tmp_path / "file.txt"
    regular.write_text("keep me too")
    one_line_error(run_module("builder", "repo", "--output", str(regular)), "is a file")
    assert regular.read_text() == "keep me too"


@pytest.mark.parametrize("output", ["/proc/nope/model_repository", "/etc/hostname/model_repository"])
def test_impossible_output_is_one_line(output):
    start = time.perf_counter()
    one_line_error(run_module("builder", "repo", "--output", output, "--model-kwargs", TINY_KWARGS), "output:")
    assert time.perf_counter() - start < 20


def test_replacement_keeps_the_folder_mode_and_empty_folders_are_fine(tmp_path):
    output = tmp_path / "repo"
    output.mkdir(mode=0o750)
    os.chmod(output, 0o750)
    build_repository(tiny_settings(output))  # an empty folder may be filled
    assert output.stat().st_mode & 0o777 == 0o750
    os.chmod(output, 0o755)
    build_repository(tiny_settings(output))
    assert output.stat().st_mode & 0o777 == 0o755
    fresh = build_repository(tiny_settings(tmp_path / "fresh"))
    umask = os.umask(0)
    os.umask(umask)
    assert fresh.stat().st_mode & 0o777 == 0o777 & ~umask


def test_stale_staging_of_dead_builds_is_removed(tmp_path):
    output = tmp_path / "model_repository"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".model_repository.staging-{dead_pid}-abc", tmp_path / f".model_repository.old-{dead_pid}-x"]
    live = tmp_path / f".model_repository.staging-{os.getpid()}-live"
    for folder in (*stale, live):
        (folder / "m").mkdir(parents=True)
    assert sorted(clean_stale(output)) == sorted(stale)
    assert live.is_dir() and not any(p.exists() for p in stale)


def test_swap_never_leaves_the_path_missing(tmp_path):
    output, missing, stop = tmp_path / "repo", [], threading.Event()
    output.mkdir()
    (output / "v").write_text("0")

    def poll():
        while not stop.is_set():
            if not (output / "v").is_file():
                missing.append(time.perf_counter())

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(1, 200):
            staging = tmp_path / f".repo.staging-{os.getpid()}-{i}"
            staging.mkdir()
            (staging / "v").write_text(str(i))
            swap_into_place(staging, output)
    finally:
        stop.set()
        reader.join()
    assert (output / "v").read_text() == "199" and not missing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.server
def test_killed_builds_never_leave_a_broken_repository(tmp_path):
    """kill -9 at many points of a build while a reader checks the repository against its manifest and a
    tritonserver polls it every second."""
    from builder.serving.server import LocalServer, ServerSettings

    output = tmp_path / "model_repository"
    build_repository(tiny_settings(output))
    problems, stop = [], threading.Event()
    http, grpc, metrics = free_ports(3)
    server = LocalServer(ServerSettings(str(output), http, grpc, metrics, workdir=str(tmp_path / "srv"),
                                        model_control="poll", poll_seconds=1)).start()

    def read_throughout():
        while not stop.is_set():
            try:
                manifest = json.loads((output / "manifest.json").read_text())
                missing = [f for f in manifest["files"] if not (output / f).is_file()]
                if missing:
                    problems.append(f"missing {missing[:2]}")
            except (OSError, ValueError) as exc:
                problems.append(repr(exc))
            time.sleep(0.005)

    reader = threading.Thread(target=read_throughout)
    reader.start()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        for delay in (0.5, 1.5, 2.5, 3.5, 4.5, 6.0):
            proc = subprocess.Popen([sys.executable, "-m", "builder", "repo", "--flavor", "local", "--output",
                                     str(output), "--model-kwargs", TINY_KWARGS, "--seed", str(int(delay * 10))],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay)
            proc.kill()
            proc.wait()
        assert server.is_ready()
        import tritonclient.http as httpclient

        index = httpclient.InferenceServerClient(server.http_url).get_model_repository_index()
        log = (tmp_path / "srv" / "tritonserver.log").read_text().lower()
    finally:
        stop.set()
        reader.join()
        server.stop()
    assert not problems, problems[:3]
    assert sorted(m["state"] for m in index) == ["READY"] * 4, index
    # A build that finished inside a kill's delay was swapped in whole and reloaded; none was ever half there.
    # Model-lifecycle failures (the CPU host's GPU-probing errors are not about the repository).
    bad = [line for line in log.splitlines() if any(
        word in line for word in ("failed to load", "failed to poll", "failed to unload", "poll failed", "incomplete"))]
    assert not bad, bad[:3]
    assert check_repository(output) == []
    # The next build removes what the killed ones left beside the repository.
    build_repository(tiny_settings(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository", "monitoring", "srv"]


# -- flavors and versions --------------------------------------------------------------

def test_add_version_keeps_the_flavor_and_check_catches_mixed_flavors(tmp_path):
    output = tmp_path / "repo"
    build_repository(tiny_settings(output, flavor="local"))
    added = run_module("builder", "repo", "--add-version", "--output", str(output), "--model-kwargs", TINY_KWARGS,
                 "--max-batch-size", "8")
    assert added.returncode == 0, added.stderr
    manifest = read_manifest(output)
    assert manifest["flavor"] == "local" and [v["flavor"] for v in manifest["model_versions"]] == ["local", "local"]
    text = (output / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").read_text()
    assert 'backend: "python"' in text and check_repository(output) == []
    before = file_hashes(output)
    one_line_error(run_module("builder", "repo", "--add-version", "--flavor", "container", "--output", str(output),
                         "--model-kwargs", TINY_KWARGS, "--max-batch-size", "8"), "flavor:", "local repository")
    assert file_hashes(output) == before
    # What the old bug produced: a container classifier config inside a local repository.
    container = build_repository(tiny_settings(tmp_path / "container", flavor="container"))
    shutil.copy(container / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt",
                output / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt")
    problems = check_repository(output)
    assert any("mix flavors" in p and "onnxruntime" in p for p in problems), problems


# -- check ------------------------------------------------------------------------------

def test_check_names_broken_files_and_keeps_going(local_repo, tmp_path):
    repo = tmp_path / "broken"
    shutil.copytree(local_repo, repo)
    (repo / "swin_tiny_patch4_window7_224_postprocess" / "config.pbtxt").write_bytes(b"name: \"\xff\xfe\"\n")
    onnx_file = repo / "swin_tiny_patch4_window7_224_classifier" / "1" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:1000])
    text = (repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").read_text()
    (repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").write_text(
        text.replace('backend: "python"', 'backend: "onnxruntime"'))
    result = run_module("builder", "check", str(repo))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "swin_tiny_patch4_window7_224_postprocess/config.pbtxt: not UTF-8" in result.stdout
    assert "swin_tiny_patch4_window7_224_classifier: 1/model.onnx is not a readable ONNX model" in result.stdout
    assert "swin_tiny_patch4_window7_224_preprocess" not in result.stdout  # the healthy models pass


def test_kwargs_that_change_the_input_size(tmp_path):
    kwargs = json.loads(TINY_KWARGS)
    repo = build_repository(tiny_settings(tmp_path / "r256", source=s.ModelSource(
        s.DEFAULT_MODEL, model_kwargs=json.dumps({**kwargs, "img_size": 256}))))
    manifest = read_manifest(repo)
    assert manifest["contract"]["tensors"]["input"]["dims"] == [3, 256, 256]
    assert manifest["preprocess"]["image_size"] == "256,256"
    wide = run_module("builder", "repo", "--output", str(tmp_path / "wide"),
                "--model-kwargs", json.dumps({**kwargs, "img_size": [224, 256]}))
    one_line_error(wide, "square")


# -- export, quantize -------------------------------------------------------------------

def test_export_reference_data_needs_real_images_or_explicit_noise(tmp_path, photo_paths):
    common = ("export", "--model-kwargs", TINY_KWARGS, "--output", str(tmp_path / "m.onnx"), "--reference-batch", "4")
    one_line_error(run_module("builder", *common, "--reference", str(tmp_path / "r.npz"), "--images",
                         str(tmp_path / "phtos")), "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    one_line_error(run_module("builder", *common, "--calibration", str(tmp_path / "c.npy"), "--images",
                         str(tmp_path / "empty")), "holds no decodable image")
    one_line_error(run_module("builder", *common, "--reference", str(tmp_path / "r.npz")), "--noise")
    one_line_error(run_module("builder", *common, "--output", "/proc/nope/m.onnx"), "output:")
    assert not (tmp_path / "r.npz").exists() and not (tmp_path / "c.npy").exists()
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in photo_paths[:2]:
        shutil.copy(path, photos / path.name)
    ok = run_module("builder", *common, "--reference", str(tmp_path / "r.npz"), "--calibration", str(tmp_path / "c.npy"),
              "--images", str(photos))
    assert ok.returncode == 0, ok.stderr
    assert str(np.load(tmp_path / "r.npz")["source"]).startswith(f"images:{photos} (2 files)")
    assert json.loads((tmp_path / "c.npy.json").read_text())["source"].startswith("images:")
    noise = run_module("builder", *common, "--reference", str(tmp_path / "n.npz"), "--noise")
    assert noise.returncode == 0 and "NOISE" in noise.stderr
    assert str(np.load(tmp_path / "n.npz")["source"]) == "noise:seed=0"


def test_quantize_bad_inputs(tmp_path):
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not onnx")
    calib = tmp_path / "c.npy"
    np.save(calib, np.zeros((2, 3, 8, 8), np.float32))
    one_line_error(run_module("builder", "quantize", "--onnx", str(tmp_path / "x.onnx"), "--calibration", str(calib),
                         "--output", str(tmp_path / "q.onnx")), "onnx:", "does not exist")
    (tmp_path / "bad.npy").write_text("text")
    one_line_error(run_module("builder", "quantize", "--onnx", str(onnx_file), "--calibration", str(tmp_path / "bad.npy"),
                         "--output", str(tmp_path / "q.onnx")), "calibration:")
    one_line_error(run_module("builder", "quantize", "--onnx", str(onnx_file), "--calibration", str(calib),
                         "--output", str(tmp_path / "q.onnx")), "not a readable ONNX model")


# -- perf -------------------------------------------------------------------------------

def test_perf_bare_defaults_on_a_cpu_host(local_repo, tmp_path):
    out = tmp_path / "bare.json"
    result = run_module("perf", "bare", "--repository", str(local_repo), "--batches", "1,2", "--warmup", "1",
                  "--iterations", "2", "--output", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["batch_size"] for r in rows] == [1, 2] and rows[0]["engine"] == "onnxruntime"
    one_line_error(run_module("perf", "bare", "--repository", str(local_repo), "--engines", "onnxrt"), "onnxrt")
    one_line_error(run_module("perf", "bare", "--repository", str(tmp_path / "none")), "make repo")
    one_line_error(run_module("perf", "bare", "--engines", "tensorrt"), "--plans")


@pytest.mark.server
def test_perf_tune_on_a_server_without_explicit_mode(server, local_repo, contract):
    result = run_module("perf", "tune", "--repository", str(local_repo), "--name", contract.ensemble,
                  "--http-url", server.http_url, "--grpc-url", server.grpc_url)
    one_line_error(result, "MODEL_CONTROL=explicit")


# -- serve --------------------------------------------------------------------------------

def test_serve_refuses_a_port_another_process_holds(local_repo, tmp_path):
    squatter = ready_stub("0.0.0.0")  # answers the readiness probe as a healthy Triton would
    grpc, metrics = free_ports(2)
    try:
        result = run_module("builder", "serve", "--detach", "--repository", str(local_repo), "--workdir",
                      str(tmp_path / "srv"), "--http-port", str(squatter.server_address[1]), "--grpc-port", str(grpc),
                      "--metrics-port", str(metrics), timeout=120)
    finally:
        squatter.shutdown()
    one_line_error(result, f"port {squatter.server_address[1]} is in use", "--http-port")
    assert not (tmp_path / "srv" / "tritonserver.pid").exists()
