"""Every command checks its input before the work, ends cleanly on Ctrl-C/SIGTERM, and says one line per cause."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_KWARGS, free_ports, one_line_error, run_module

ROOT = Path(__file__).resolve().parents[2]






def _error(result, *needles):
    one_line_error(result, *needles, codes=(1, 2))  # 2: argparse refuses the value


def _processes_with(text: str) -> list:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and str(os.getpid()) != entry.name:
                found.append(cmdline)
    return found


@pytest.mark.parametrize("args, needles", [
    (["preprocess", "--cpu", "foo"], ["--cpu", "foo unknown", "exact, draft"]),
    (["preprocess", "--decoders", "nvjpeg"], ["--decoders", "nvjpeg unknown"]),
    (["bare", "--batches", "0"], ["--batches", "1 or more"]),
    (["bare", "--iterations", "0"], ["--iterations", "1 or more"]),
    (["preprocess", "--output", "/dev/null/x.json"], ["output:", "cannot be created or written"]),
    (["sweep", "--models", "classifier", "--concurrency", "8", "--request-count", "4", "--output",
      "/tmp/x.json"], ["request_count: 4 is below the concurrency 8"]),
    (["report", "/dev/null"], ["cannot read results"]),
])
def test_perf_checks_its_input_first(args, needles, tmp_path):
    started = time.perf_counter()
    _error(run_module("perf", *args), *needles)
    assert time.perf_counter() - started < 30  # before any work


def test_perf_report_refuses_another_kind_of_results(tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"kind": "bare", "results": []}))
    _error(run_module("perf", "report", str(bare)), "holds bare results, this needs sweep results")
    _error(run_module("perf", "compare", str(bare), str(bare)), "holds bare results")
    (tmp_path / "list.json").write_text("[1, 2]")
    _error(run_module("perf", "compare", str(tmp_path / "list.json"), str(bare)), "not a results file")


def test_builder_refuses_bad_names_numbers_and_files(local_repo, tmp_path):
    _error(run_module("builder", "repo", "--engine", "onnxruntime", "--inductor-precision", "fp32",
                         "--output", str(tmp_path / "r")), "inductor_precision:", "applies to the inductor engine")
    _error(run_module("builder", "repo", "--max-queue-size", str(2 ** 40), "--output", str(tmp_path / "r")),
                    "max_queue_size")
    _error(run_module("builder", "repo", "--max-batch-size", str(2 ** 33), "--output", str(tmp_path / "r")),
                    "max_batch_size")
    _error(run_module("builder", "repo", "--model-kwargs", '{"embed_dim": -3}', "--output", str(tmp_path / "r")),
                    "model_kwargs: timm could not build")
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    _error(run_module("builder", "repo", "--checkpoint", str(corrupt), "--model-kwargs", TINY_KWARGS,
                         "--output", str(tmp_path / "r")), "checkpoint:", "not a readable safetensors file")
    listed = tmp_path / "list.pt"
    import torch

    torch.save([1, 2, 3], listed)
    _error(run_module("builder", "repo", "--checkpoint", str(listed), "--model-kwargs", TINY_KWARGS,
                         "--output", str(tmp_path / "r")), "checkpoint:", "not a state dict")
    assert not (tmp_path / "r").exists()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{not json")
    _error(run_module("builder", "check", str(damaged), "--needs-torch"), "manifest.json cannot be read")
    _error(run_module("builder", "repo", "--add-version", "--output", str(damaged)), "manifest.json cannot be read")
    _error(run_module("perf", "analyze", "--repository", str(local_repo), "--models", "clasifier",
                         "--output", str(tmp_path / "a")), "models: clasifier not in")
    docker = tmp_path / "docker"
    _error(run_module("builder", "docker", "--output", str(docker), "--precision", "fp9"), "--precision", "fp9")
    _error(run_module("builder", "docker", "--output", str(docker), "--model", "my model"), "model:", "'my model'")
    assert not docker.exists()


def test_quantize_refuses_calibration_of_another_shape(local_repo, tmp_path):
    onnx_file = local_repo / "swin_tiny_patch4_window7_224_classifier" / "1" / "model.onnx"
    calibration = tmp_path / "c.npy"
    np.save(calibration, np.zeros((2, 3, 192, 192), np.float32))
    _error(run_module("builder", "quantize", "--onnx", str(onnx_file), "--calibration", str(calibration),
                         "--output", str(tmp_path / "q.onnx")), "calibration:", "[3, 192, 192]", "[3, 224, 224]")


def test_quantize_checks_its_output_and_reference_before_quantizing(local_repo, tmp_path):
    exported = tmp_path / "model.onnx"
    shutil.copy2(local_repo / "swin_tiny_patch4_window7_224_classifier" / "1" / "model.onnx", exported)
    before = exported.read_bytes()
    calibration = tmp_path / "c.npy"
    np.save(calibration, np.zeros((2, 3, 224, 224), np.float32))
    _error(run_module("builder", "quantize", "--onnx", str(exported), "--calibration", str(calibration),
                      "--output", str(tmp_path / "." / "model.onnx")), "output:", "the --onnx model itself")
    assert exported.read_bytes() == before
    bad = tmp_path / "ref.npz"
    np.savez(bad, inputs=np.zeros((2, 3, 192, 192), np.float32), logits=np.zeros((2, 1000), np.float32))
    _error(run_module("builder", "quantize", "--onnx", str(exported), "--calibration", str(calibration),
                      "--output", str(tmp_path / "q.onnx"), "--reference", str(bad)), "reference:", "[3, 192, 192]")
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    _error(run_module("builder", "quantize", "--onnx", str(exported), "--calibration", str(calibration),
                      "--output", str(tmp_path / "q.onnx"), "--reference", str(tmp_path / "junk.npz")),
           "reference:", "is not the .npz of inputs and logits")
    assert not (tmp_path / "q.onnx").exists()


def test_absurd_numbers_are_refused_before_any_work(tmp_path, photo_paths):
    """A 3-year queue delay, 100,000 instances, `all:3`, timeouts gRPC cannot take: one line each, nothing built."""
    out = tmp_path / "repo"
    for flags, needles in ((["--max-queue-delay-us", "94608000000000"], ("max_queue_delay_us", "10,000,000")),
                           (["--instance-count", "100000"], ("instance count", "use 1 to 256")),
                           (["--preprocess-instances", "100000"], ("instance count",)),
                           (["--version-policy", "all:3"], ("version_policy", "takes no number")),
                           # options of an engine or preprocessing the build does not use
                           (["--gpu-decoder", "nvimgcodec"],
                            ("gpu_decoder:", "drop --gpu-decoder", "--preprocess gpu")),
                           (["--preprocess", "gpu", "--gpu-photo-path", "fused", "--hybrid-local-batch", "4"],
                            ("hybrid_local_batch:", "--gpu-photo-path fused")),
                           (["--engine", "onnxruntime", "--compile-timeout-s", "60"], ("compile_timeout_s:",)),
                           (["--cuda-graphs"], ("cuda_graphs:", "--plan"))):
        _error(run_module("builder", "repo", "--output", str(out), *flags), *needles)
        assert not out.exists()
    for timeout in ("inf", "nan", "1e10", "0"):
        _error(run_module("clients", "classify", "--timeout", timeout, str(photo_paths[0])), "timeout_s: is")


def test_client_says_one_line_per_cause(tmp_path, photo_paths):
    (port,) = free_ports(1)
    result = run_module("clients", "classify", "--url", f"localhost:{port}", "--retries", "0", *map(str, photo_paths))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: server unavailable"), lines
    assert "gRPC on 8001 and HTTP on 8000" in lines[0]  # the hint for a wrong port or protocol
    _error(run_module("clients", "classify", "--top-k", "0", str(photo_paths[0])), "--top-k")


@pytest.mark.server
def test_client_refuses_a_batch_above_the_models(server, contract, photo_paths):
    result = run_module("clients", "classify", "--url", server.grpc_url, "--model", contract.ensemble,
                  "--max-batch", "64", str(photo_paths[0]))
    _error(result, "max_batch: 64 is above", "max_batch_size 8")


@pytest.mark.parametrize("cli, patch, argv, last_line", [
    ("perf", "cli.build_parser = lambda: parser()", [], "interrupted"),
    ("clients", "cli._classify = lambda args: HalfBuilt()", ["classify", "x.jpg"], None),
])
def test_an_interrupt_inside_a_constructor_still_ends_in_one_line(cli, patch, argv, last_line):
    """A signal that lands inside a client's constructor leaves a half-built object whose __del__ fails when
    collected (tritonclient's gRPC client: no `_stream` yet); the CLIs still end with exit 130 and their own
    words (perf's one line; clients' nothing), no traceback."""
    code = f"""
import argparse, sys
from {cli} import __main__ as cli

class HalfBuilt:
    def __init__(self):
        raise KeyboardInterrupt  # the signal, before the attribute below exists
    def __del__(self):
        self._stream.close()

def parser():
    p = argparse.ArgumentParser()
    p.set_defaults(func=lambda args: HalfBuilt())
    return p

{patch}
sys.exit(cli.main({argv!r}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert "Traceback" not in done.stderr
    if last_line:
        assert done.stderr.strip().splitlines()[-1].startswith(last_line)
    else:
        assert done.stderr.strip() == ""


@pytest.mark.server
def test_sigterm_ends_perf_first_request_cleanly(local_repo, tmp_path):
    out = tmp_path / "first.json"
    process = subprocess.Popen([sys.executable, "-m", "perf", "first-request", "--repository", str(local_repo),
                                "--repeat", "3", "--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not _processes_with("first-request-"):
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    time.sleep(2)  # the server is starting
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted")
    # At once: "nothing is left running" is said after the server and its model processes are gone.
    assert not _processes_with("first-request-"), "a tritonserver outlived perf first-request"
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("first-request-*"))
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True and isinstance(doc["results"], list)


@pytest.mark.server
def test_sigterm_ends_perf_sweep_and_keeps_its_rows(server, contract, tmp_path):
    import threading

    out = tmp_path / "sweep.json"
    process = subprocess.Popen([sys.executable, "-m", "perf", "sweep", "--name", contract.ensemble, "--http-url",
                                server.http_url, "--grpc-url", server.grpc_url, "--models", "classifier",
                                "--concurrency", "1,2,3,4,5,6", "--measurement-interval-ms", "1500",
                                "--output", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    deadline = time.time() + 180
    while not any("[1/6]" in line for line in lines):  # one row finished, the next perf_analyzer running
        assert time.time() < deadline and process.poll() is None, lines
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    reader.join(timeout=10)
    assert process.returncode == 130, lines
    assert not any("Traceback" in line for line in lines)
    time.sleep(1)
    # Only this sweep's analyzers (they name this server): another suite's sweep may run beside this one.
    ours = [line for line in _processes_with("perf_analyzer -m")
            if server.http_url.split("//")[-1] in line or server.grpc_url.split("//")[-1] in line]
    assert not ours, "perf_analyzer outlived perf sweep"
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True and 1 <= len(doc["results"]) < 6


def test_perf_sweep_keeps_perf_analyzers_error_line():
    from perf.sweep import analyzer_error

    output = ("error: failed to get model metadata: HTTP client failed: Couldn't connect to server\n"
              "Usage: perf_analyzer [options]\n  -m <model name>\n  -x <model version>\n  -b <batch size>\n")
    said = analyzer_error(output, 1)
    assert said.startswith("error: failed to get model metadata: HTTP client failed: Couldn't connect to server (")
    assert "Usage" not in said and "HTTP on 8000 and gRPC on 8001" in said  # its error, and a hint for the ports
    assert analyzer_error("one\ntwo\nthree\nfour\n", 3) == "two | three | four"
    assert analyzer_error("", 9) == "exit code 9"


def test_make_serve_docker_stops_when_the_check_fails(tmp_path):
    """A failing `builder check` ends `make serve-docker` before any image is built (docker never runs)."""
    from conftest import project_copy

    work = project_copy(tmp_path)
    os.symlink(ROOT / ".venv", work / ".venv")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "docker-ran"
    (bin_dir / "docker").write_text(f"#!/bin/sh\ntouch {ran}\n")  # stands in for the Docker CLI: records a call
    (bin_dir / "docker").chmod(0o755)
    broken = work / "broken_repo"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    env.pop("MAKEFLAGS", None)
    result = subprocess.run(["make", "serve-docker", "REPO=broken_repo"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and not ran.exists(), (result.stdout[-2000:], result.stderr[-2000:])
    assert "error:" in result.stdout + result.stderr


@pytest.mark.server
def test_sigterm_stops_a_foreground_server_and_a_build(local_repo, tmp_path):
    """SIGTERM to `builder serve` (foreground) takes tritonserver and its model processes with it; SIGTERM to a
    build removes its staging folder."""
    import urllib.request

    http, grpc, metrics = free_ports(3)
    workdir = tmp_path / "srv"
    process = subprocess.Popen([sys.executable, "-m", "builder", "serve", "--repository", str(local_repo),
                                "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                "--workdir", str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.5)
    assert _processes_with(str(workdir))  # tritonserver and its stubs run from the workdir's copy
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 0 and "Traceback" not in stderr, stderr
    assert not _processes_with(str(workdir)), "tritonserver or a stub outlived builder serve"

    out = tmp_path / "repo"
    build = subprocess.Popen([sys.executable, "-m", "builder", "repo", "--model-kwargs", TINY_KWARGS, "--output",
                              str(out), "--flavor", "local"], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    while not list(tmp_path.glob(".repo.staging-*")):
        assert time.time() < deadline + 120 and build.poll() is None, build.communicate()
        time.sleep(0.1)
    build.send_signal(signal.SIGTERM)
    _, stderr = build.communicate(timeout=60)
    assert build.returncode == 130 and stderr.strip().splitlines()[-1].startswith("interrupted"), stderr
    assert not list(tmp_path.glob(".repo.staging-*")) and not out.exists()


@pytest.mark.server
def test_stop_finds_a_server_whose_workdir_was_removed(local_repo, tmp_path):
    """`make clean` removes .server/ (it stops the server first); a server whose workdir went anyway is still
    found, by the command line it runs, and stopped."""
    import shutil as sh

    http, grpc, metrics = free_ports(3)
    workdir = tmp_path / "srv"
    common = ["--repository", str(local_repo), "--http-port", str(http), "--grpc-port", str(grpc),
              "--metrics-port", str(metrics), "--workdir", str(workdir)]
    started = run_module("builder", "serve", "--detach", *common, timeout=200)
    assert started.returncode == 0, started.stderr
    sh.rmtree(workdir)
    stopped = run_module("builder", "stop", "--workdir", str(workdir))
    assert stopped.returncode == 0 and "tritonserver stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    time.sleep(1)
    assert not _processes_with(str(workdir))
    makefile = (ROOT / "Makefile").read_text()
    assert "if [ -x $(PY) ]; then $(PY) -m builder stop; fi\n\trm -rf $(call q,$(REPO)) .server build" in makefile


def test_perf_images_are_checked_and_what_is_not_an_image_is_named(local_repo, tmp_path, photo_paths, caplog):
    from builder.errors import BuilderError
    from perf.environment import image_paths

    for command in (["preprocess", "--repository", str(local_repo)], ["first-request", "--repository", str(local_repo)],
                    ["sweep", "--name", "x"]):
        _error(run_module("perf", *command, "--images", str(tmp_path / "missing"), "--output",
                          str(tmp_path / "o.json")), "images:", "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a photo")
    _error(run_module("perf", "preprocess", "--repository", str(local_repo), "--images", str(empty), "--output",
                      str(tmp_path / "o.json")), "images: no image files under")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy2(photo_paths[3], mixed / photo_paths[3].name)
    (mixed / "labels.csv").write_text("a,b")
    caplog.set_level("WARNING")
    assert image_paths([str(mixed)]) == [mixed / photo_paths[3].name]
    assert "skipping 1 file(s) that are not images (by suffix): " + str(mixed / "labels.csv") in caplog.text
    with pytest.raises(BuilderError, match="images: .* does not exist"):
        image_paths([str(tmp_path / "nope.jpg")])


def test_serve_refuses_a_folder_without_models(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no models here")
    _error(run_module("builder", "serve", "--repository", str(empty), "--workdir", str(tmp_path / "w")),
           "holds no models", "make repo FLAVOR=local")


def test_a_config_that_does_not_parse_is_one_line_in_check_and_serve(local_repo, tmp_path):
    """The parse error is the cause; the ensemble steps that use that model are not reported again."""
    broken = tmp_path / "broken"
    shutil.copytree(local_repo, broken)
    config = next(broken.glob("*_classifier/config.pbtxt"))
    config.write_text(config.read_text().replace("max_batch_size:", "oops: 1\nmax_batch_size:", 1))
    checked = run_module("builder", "check", str(broken))
    errors = [line for line in checked.stdout.splitlines() if line.startswith("error:")]
    assert checked.returncode == 1 and len(errors) == 1 and 'no field named "oops"' in errors[0], checked.stdout
    started = time.perf_counter()
    _error(run_module("builder", "serve", "--repository", str(broken), "--workdir", str(tmp_path / "w")),
           "would not load", 'no field named "oops"', "make repo FLAVOR=local")
    assert time.perf_counter() - started < 30 and not (tmp_path / "w" / "tritonserver.log").exists()
