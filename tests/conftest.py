"""Shared fixtures: a tiny Swin, a real local-flavor repository, a real tritonserver, real photos."""

from __future__ import annotations

import glob
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pytest

from builder import settings as s
from builder.serving.server import LocalServer, ServerSettings, free_ports  # noqa: F401  (free_ports: the tests take it from here)

# A Swin with timm's swin_tiny_patch4_window7_224 config (224 input, bicubic,
# crop_pct 0.9, ImageNet mean/std, 1000 classes) but tiny width and depth, so
# export, validation and serving stay fast on a 2-core CPU.
TINY_KWARGS = json.dumps({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
TINY_SOURCE = s.ModelSource(s.DEFAULT_MODEL, model_kwargs=TINY_KWARGS, seed=0)
MAX_BATCH = 8
# Logits through the served ensemble vs timm + PyTorch on the same photo. The
# preprocessing is bit-exact; the rest is ONNX Runtime vs PyTorch float32.
SERVED_LOGIT_ATOL = 1e-4


def project_copy(tmp_path: Path) -> Path:
    """The project's files (no venv, git or generated folders) in `tmp_path/project`, modification times kept."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "project"
    shutil.copytree(root, work, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "model_repository*", ".model_repository*", ".server", "build", ".gpukit", ".gpurun",
        "__pycache__", ".pytest_cache", "*.egg-info"))
    return work


def run_module(module: str, *args, timeout: float = 300):
    """`python -m module args...` from the project root, output captured."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=root)


def one_line_error(result, *needles, codes=(1,)):
    """A user error: exit code in `codes`, no traceback, the last stderr line an error naming every needle."""
    assert result.returncode in codes, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    # Ours: "error: ...", exit 1; argparse's: "prog: error: ...", exit 2.
    assert last.startswith("error: ") or (result.returncode == 2 and ": error: " in last), result.stderr
    for needle in needles:
        assert needle in last, last


def ready_stub(host: str = "127.0.0.1", ssl_context=None):
    """An HTTP(S) server that answers every GET with 200, as a healthy Triton's readiness probe does."""
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer((host, 0), Ready)
    if ssl_context is not None:
        httpd.socket = ssl_context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def jpeg_segments(jpeg: bytes) -> list:
    """(marker, start, end) of each segment before the first scan's data, the scan header included."""
    at, out = 2, []
    while at < len(jpeg):
        marker = jpeg[at + 1]
        length = int.from_bytes(jpeg[at + 2:at + 4], "big")
        out.append((marker, at, at + 2 + length))
        if marker == 0xDA:
            return out
        at += 2 + length
    return out


def broken_jpegs(jpeg: bytes) -> dict:
    """The damaged uploads services get, made from one good baseline JPEG: cut short, bad markers, lying sizes."""
    segments = jpeg_segments(jpeg)
    sos = next(start for marker, start, _ in segments if marker == 0xDA)
    sof_start = next(start for marker, start, _ in segments if marker in (0xC0, 0xC2))
    dht = [(start, end) for marker, start, end in segments if marker == 0xC4]
    scan = next(end for marker, _, end in segments if marker == 0xDA)

    def with_size(height: int, width: int) -> bytes:
        out = bytearray(jpeg)
        out[sof_start + 5:sof_start + 7] = height.to_bytes(2, "big")
        out[sof_start + 7:sof_start + 9] = width.to_bytes(2, "big")
        return bytes(out)

    height = int.from_bytes(jpeg[sof_start + 5:sof_start + 7], "big")
    width = int.from_bytes(jpeg[sof_start + 7:sof_start + 9], "big")
    no_tables = jpeg
    for start, end in reversed(dht):
        no_tables = no_tables[:start] + no_tables[end:]
    overrun = bytearray(jpeg)
    overrun[dht[0][0] + 2:dht[0][0] + 4] = (0xFFF0).to_bytes(2, "big")
    return {
        "cut at half": jpeg[:len(jpeg) // 2],
        "cut near the end": jpeg[:-64],
        "cut in the tables": jpeg[:sos - 10],
        "cut after the scan header": jpeg[:scan + 4],
        "no end marker": jpeg[:-2],
        "cut, end marker appended": jpeg[:len(jpeg) // 2] + b"\xff\xd9",
        "garbage scan data": jpeg[:scan] + bytes(range(256)) * 8 + b"\xff\xd9",
        "bad marker before the frame": jpeg[:2] + b"\xff\x00" + jpeg[2:],
        "segment length past the end": bytes(overrun),
        "no Huffman tables": no_tables,
        "height doubled": with_size(height * 2, width),
        "height halved": with_size(height // 2, width),
        "width zero": with_size(height, 0),
        "width huge": with_size(height, 65000),
        "trailing garbage": jpeg + b"not part of the image" * 10,
    }


def tiny_settings(output: Path, flavor: str = "local", **overrides) -> s.RepoSettings:
    """Repository settings for the tiny Swin."""
    kind = "KIND_CPU" if flavor == "local" else "KIND_GPU"
    values = dict(
        source=TINY_SOURCE, output=str(output), flavor=flavor,
        # No queue bound (the default is 256): with one, perf_analyzer found no stable window for the tiny
        # CPU classifier at concurrency 1-2 on a 2-core host (an open question, see the closing note of #21).
        classifier_batching=s.Batching(MAX_BATCH, (4, 8), 2000, max_queue_size=0),
        preprocess_batching=s.Batching(MAX_BATCH, (), 2000, max_queue_size=0),
        classifier_instances=s.InstanceGroup(kind, 1),
    )
    values.update(overrides)
    return s.RepoSettings(**values)


@pytest.fixture(scope="session")
def photo_paths() -> list:
    """Real photographs shipped with scikit-image (JPEG and PNG)."""
    import skimage

    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
             "retina.jpg", "motorcycle_left.png", "camera.png"]
    paths = [Path(skimage.data_dir) / n for n in names]
    assert all(p.is_file() for p in paths), glob.glob(skimage.data_dir + "/*")
    return paths


@pytest.fixture(scope="session")
def photos(photo_paths) -> list:
    return [p.read_bytes() for p in photo_paths]


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny Swin with the same seed the repositories are built with."""
    from builder.export.model import load_model

    return load_model(TINY_SOURCE)


@pytest.fixture(scope="session")
def params(tiny_model):
    """The tiny Swin's exact preprocessing parameters (timm's data config)."""
    from builder.core import imaging

    return imaging.PreprocessParams.from_timm(tiny_model.data_config)


@pytest.fixture(scope="session")
def timm_reference(tiny_model):
    """timm's own eval transform + PyTorch forward: logits for a list of image bytes."""
    import io

    import timm.data
    import torch
    from PIL import Image, ImageOps

    transform = timm.data.create_transform(**tiny_model.data_config)

    def logits(images: list) -> np.ndarray:
        batch = torch.stack([transform(ImageOps.exif_transpose(Image.open(io.BytesIO(b))).convert("RGB"))
                             for b in images])
        with torch.no_grad():
            return tiny_model.module(batch).numpy()

    return logits


@pytest.fixture(scope="session")
def local_repo(tmp_path_factory) -> Path:
    """A real local-flavor repository of the tiny Swin."""
    from builder.repository.writer import build_repository

    return build_repository(tiny_settings(tmp_path_factory.mktemp("repo") / "model_repository"))


@pytest.fixture(scope="session")
def contract(local_repo):
    from builder.core.contract import Contract
    from builder.core.manifest import read_manifest

    manifest = read_manifest(local_repo)
    return Contract(manifest["contract"]["ensemble"], (224, 224), manifest["model"]["num_classes"])


@pytest.fixture(scope="session")
def server(local_repo, tmp_path_factory):
    """A real tritonserver serving the local-flavor repository."""
    from builder.serving.server import LocalServer, ServerSettings

    http, grpc, metrics = free_ports(3)
    settings = ServerSettings(repository=str(local_repo), http_port=http, grpc_port=grpc, metrics_port=metrics,
                              workdir=str(tmp_path_factory.mktemp("server")))
    with LocalServer(settings) as running:
        yield running



# Modules a `--help` must not import: it is instant only while they stay out.
HEAVY_MODULES = ("torch", "timm", "onnx", "onnxruntime", "tensorrt", "matplotlib", "tritonclient")


def heavy_imports_of_help(package: str, *args: str) -> list:
    """The heavy modules that `python -m <package> <args> --help` imports (run in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            f"sys.argv = ['{package}', *{list(args)!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_module('{package}', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exit:\n"
            "    assert exit.code in (0, None), exit.code\n"
            f"import json; print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=str(Path(__file__).resolve().parents[1]))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])

# -- Overload: a server whose queues are bounded, and a flood of clients against it (tests/serving).

def bounded_server(tmp_path, queue: int) -> LocalServer:
    """A real server whose classifier and preprocess models queue at most `queue` requests (20 ms batching delay)."""
    from builder.repository.writer import build_repository

    bounded = s.Batching(MAX_BATCH, (), 20_000, max_queue_size=queue)
    repo = build_repository(tiny_settings(tmp_path / "repo", classifier_batching=bounded,
                                          preprocess_batching=bounded))
    http, grpc, metrics = free_ports(3)
    return LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv")))


def flood(settings, photos, threads=48):
    """`threads` clients at once, each classifying a full batch; (outcome, seconds) per client."""
    from concurrent.futures import ThreadPoolExecutor

    from clients import Classifier

    def one(_):
        start = time.perf_counter()
        with Classifier(settings) as client:
            results = client.classify(photos[:MAX_BATCH])
        errors = {r.error for r in results if not r.ok}
        if not errors:
            return "ok", time.perf_counter() - start
        assert all(e.startswith("rejected: server overloaded") and "Exceeds maximum queue size" in e
                   for e in errors), errors
        return "overloaded", time.perf_counter() - start

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(threads)))


# -- GPU tests: `make test-gpu` runs them on a GPU host, skipped without one. GPU_TEST_RECORD=path.json writes the
# run's record (GPU, driver, versions, each test's outcome); committed records live in tests/gpu/runs/.

_OUTCOMES = []


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="no CUDA GPU on this host: `make test-gpu` runs these on a GPU host")
    for item in items:
        if "gpu" in item.keywords and not cuda_available():
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _OUTCOMES.append({"test": report.nodeid, "phase": report.when, "outcome": report.outcome,
                          "seconds": round(report.duration, 2),
                          **({"reason": str(report.longrepr)[-400:]} if report.outcome != "passed" else {})})


def _what_ran() -> dict:
    """The code and command of a run: the commit and whether the tree was clean (from git, or GPU_TEST_COMMIT and
    GPU_TEST_TREE where the tree was copied without .git), the full command (GPU_TEST_COMMAND, or pytest's), and
    the versions that decide the GPU paths."""
    import subprocess
    import sys

    from builder.meta import package_versions

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip() or None
        except OSError:
            return None

    commit = os.environ.get("GPU_TEST_COMMIT") or git("rev-parse", "HEAD")
    clean = os.environ.get("GPU_TEST_TREE") or ("clean" if commit and not git("status", "--porcelain") else "dirty")
    return {"git_commit": commit, "tree": clean,
            "command": os.environ.get("GPU_TEST_COMMAND") or " ".join(["pytest", *sys.argv[1:]]),
            "gpu_test_versions": package_versions("torch", "torchvision", "timm", "nvidia-pytriton", "tritonclient",
                                                  "numpy", "torchao")}


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("GPU_TEST_RECORD")
    if not path:
        return
    from perf.environment import describe

    record = {"kind": "gpu_tests", **_what_ran(), "finished_unix_s": int(time.time()),
              "exit_status": int(exitstatus),
              "passed": sum(o["outcome"] == "passed" and o["phase"] == "call" for o in _OUTCOMES),
              "failed": sum(o["outcome"] == "failed" for o in _OUTCOMES),
              "skipped": sum(o["outcome"] == "skipped" for o in _OUTCOMES),
              "python": platform.python_version(), "environment": describe(), "tests": _OUTCOMES}
    with open(path, "w") as f:
        json.dump(record, f, indent=2, default=str)


# -- Triton's classification extension: any client may ask for `class_count` on any output of any model.

def class_count_on_every_output(server, photos, class_count: int = 3) -> dict:
    """Asks every served model for `class_count` on each of its outputs, over gRPC and HTTP, one request each.

    Inputs come from the model's metadata: BYTES inputs get a photo, numeric ones zeros of their shape.

    Returns:
        {(protocol, model, output): the first row of classification strings, or the error text}.
    """
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    answers = {}
    for protocol, module, url in (("grpc", grpcclient, server.grpc_url), ("http", httpclient, server.http_url)):
        client = module.InferenceServerClient(url)
        index = client.get_model_repository_index(**({"as_json": True} if protocol == "grpc" else {}))
        for entry in index.get("models", index) if isinstance(index, dict) else index:
            model = entry["name"]
            meta = client.get_model_metadata(model, **({"as_json": True} if protocol == "grpc" else {}))
            inputs, arrays = [], []
            for spec in meta["inputs"]:
                shape = [1 if int(d) < 0 else int(d) for d in spec["shape"]]
                if spec["datatype"] == "BYTES":
                    array = np.array([photos[0]] * int(np.prod(shape)), dtype=object).reshape(shape)
                else:
                    array = np.zeros(shape, dtype=spec["datatype"].lower().replace("fp", "float"))
                inputs.append(module.InferInput(spec["name"], shape, spec["datatype"]))
                inputs[-1].set_data_from_numpy(array)
            for output in meta["outputs"]:
                requested = module.InferRequestedOutput(output["name"], class_count=class_count)
                try:
                    row = client.infer(model, inputs, outputs=[requested]).as_numpy(output["name"])[0]
                    answers[(protocol, model, output["name"])] = [v.decode() for v in row]
                except InferenceServerException as exc:
                    answers[(protocol, model, output["name"])] = str(exc)
                assert server.is_ready(), f"the server died on class_count for {model}'s {output['name']}"
    return answers


# NVIDIA's example clients (triton-inference-server/client, src/python/examples) are not on PyPI and their code
# stays out of this repository: point TRITON_CLIENT_EXAMPLES at a checkout's folder to run them unchanged.
TRITON_CLIENT_EXAMPLES = os.environ.get("TRITON_CLIENT_EXAMPLES", "")
needs_nvidia_examples = pytest.mark.skipif(
    not os.path.isfile(os.path.join(TRITON_CLIENT_EXAMPLES, "ensemble_image_client.py")),
    reason="set TRITON_CLIENT_EXAMPLES to triton-inference-server/client's src/python/examples")


def nvidia_ensemble_image_client(url: str, protocol: str, model: str, folder: Path, classes: int = 3) -> dict:
    """Runs NVIDIA's `ensemble_image_client.py` as it is on a folder of images.

    Returns:
        {file name: {output name: [(score, index, label), ...]}} from what it printed.
    """
    import subprocess
    import sys

    result = subprocess.run([sys.executable, os.path.join(TRITON_CLIENT_EXAMPLES, "ensemble_image_client.py"),
                             "-m", model, "-c", str(classes), "-u", url, "-i", protocol, str(folder)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.rstrip().endswith("PASS"), result.stdout + result.stderr
    printed, name, output = {}, None, None
    for line in result.stdout.splitlines():
        if line.startswith('"'):
            name = Path(line.strip('":')).name
            printed[name] = {}
        elif line.strip().startswith("[") and line.strip().endswith("]:"):
            output = line.strip()[1:-2]
            printed[name][output] = []
        elif " = " in line and name:
            head, label = line.strip().split(" = ", 1)
            score, index = head.split(" (")
            printed[name][output].append((float(score), int(index.rstrip(")")), label))
    return printed


def outside_tested_range(*packages: str) -> dict:
    """Each package whose installed version is outside pyproject.toml's requirement: name -> (version, range)."""
    import importlib.metadata

    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name: Requirement(r).specifier
              for group in [project["dependencies"], *project["optional-dependencies"].values()] for r in group}
    found = {}
    for name in packages:
        version = importlib.metadata.version(name).split("+")[0]
        if not wanted[name].contains(version, prereleases=True):
            found[name] = (version, str(wanted[name]))
    return found

