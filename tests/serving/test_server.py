"""A real tritonserver (pip-distributed 2.51) serving the local flavor: real gRPC and HTTP requests."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from builder.errors import BuilderError
from builder.serving.server import LocalServer, ServerSettings, stub_path
from builder.core import imaging
from conftest import SERVED_LOGIT_ATOL, free_ports, tiny_settings



def _infer(module, url, model, images, outputs=("probabilities", "logits"), class_count=0):
    client = module.InferenceServerClient(url)
    array = np.array(images, dtype=object).reshape(-1, 1)
    inp = module.InferInput("image", list(array.shape), "BYTES")
    inp.set_data_from_numpy(array)
    requested = [module.InferRequestedOutput(name, class_count=class_count) for name in outputs]
    return client.infer(model, [inp], outputs=requested)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_matches_timm_and_pytorch(server, contract, photos, timm_reference, tiny_model, protocol):
    module, url = (grpcclient, server.grpc_url) if protocol == "grpc" else (httpclient, server.http_url)
    result = _infer(module, url, contract.ensemble, photos)
    logits = result.as_numpy("logits")
    reference = timm_reference(photos)
    assert logits.shape == (len(photos), 1000)
    assert np.abs(logits - reference).max() <= SERVED_LOGIT_ATOL
    assert (logits.argmax(1) == reference.argmax(1)).all()
    probs = np.exp(reference - reference.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, rtol=1e-3, atol=1e-6)
    # Top-k with names: Triton's classification extension on the probabilities, best first.
    ranked = _infer(module, url, contract.ensemble, photos, ("probabilities",), class_count=5).as_numpy("probabilities")
    assert ranked.shape == (len(photos), 5)
    rows = [[entry.decode().split(":", 2) for entry in row] for row in ranked]
    classes = np.array([[int(i) for _, i, _ in row] for row in rows])
    scores = np.array([[float(p) for p, _, _ in row] for row in rows])
    assert (classes[:, 0] == reference.argmax(1)).all()
    np.testing.assert_allclose(scores, np.take_along_axis(probs, classes, 1), rtol=1e-3, atol=1e-6)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    assert rows[0][0][2] == tiny_model.class_names[classes[0, 0]]


@pytest.mark.server
def test_bare_classifier_with_client_side_preprocessing(server, contract, photos, timm_reference, tiny_model):
    params = imaging.PreprocessParams.from_timm(tiny_model.data_config)
    batch = np.stack([imaging.preprocess(p, params) for p in photos[:4]])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    logits = client.infer(contract.classifier, [inp]).as_numpy("logits")
    assert np.abs(logits - timm_reference(photos[:4])).max() <= SERVED_LOGIT_ATOL


@pytest.mark.server
def test_bad_images_get_their_own_error_and_server_stays_up(server, contract, photos):
    with pytest.raises(InferenceServerException) as info:
        _infer(httpclient, server.http_url, contract.ensemble, [photos[0], b"definitely not an image"])
    assert "image[1]: not a decodable image" in str(info.value)
    assert info.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    with pytest.raises(InferenceServerException, match="empty input"):
        _infer(grpcclient, server.grpc_url, contract.ensemble, [b""])
    # Good and bad requests in flight together: the dynamic batcher groups
    # them, each bad one fails alone and every good one is served.
    items = [photos[i % len(photos)] if i % 3 else b"\x89PNG broken" for i in range(24)]

    def one(data):
        try:
            return _infer(grpcclient, server.grpc_url, contract.ensemble, [data]).as_numpy("probabilities").shape
        except InferenceServerException as exc:
            return str(exc)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, items))
    for data, result in zip(items, results):
        if data.startswith(b"\x89PNG broken"):
            assert "not a decodable image" in result
        else:
            assert result == (1, 1000)
    assert server.is_ready()


@pytest.mark.server
def test_model_metadata_matches_contract(server, contract):
    client = httpclient.InferenceServerClient(server.http_url)
    meta = client.get_model_metadata(contract.ensemble)
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [("image", "BYTES", [-1, 1])]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, 1000]), "logits": ("FP32", [-1, 1000])}


@pytest.mark.server
def test_container_flavor_is_refused_locally_with_a_clear_message(tmp_path):
    from builder.repository.writer import build_repository

    repo = build_repository(tiny_settings(tmp_path / "container", flavor="container"))
    http, grpc, metrics = free_ports(3)
    server = LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv")))
    with pytest.raises(BuilderError, match="needs onnxruntime.*FLAVOR=local"):
        server.start()


@pytest.mark.server
def _left_stub(workdir):
    """A process whose command line is a Python-backend stub of `workdir`'s server (as a killed server leaves)."""
    return subprocess.Popen([str(stub_path(workdir)), "600"], executable="sleep")


@pytest.mark.server
def test_serve_detach_and_stop_cli(local_repo, tmp_path):
    http, grpc, metrics = free_ports(3)
    common = ["--repository", str(local_repo), "--http-port", str(http), "--grpc-port", str(grpc),
              "--metrics-port", str(metrics), "--workdir", str(tmp_path / "srv")]
    # A stub left by a server of this workdir that was killed (on an H200 under MPS they lived on for minutes),
    # and one of another workdir's server, which is not ours to end.
    left, other = _left_stub(tmp_path / "srv"), _left_stub(tmp_path / "elsewhere")
    started = subprocess.run([sys.executable, "-m", "builder", "serve", "--detach", *common],
                             capture_output=True, text=True, timeout=200)
    assert started.returncode == 0, started.stderr
    try:
        assert left.wait(timeout=10) == -9 and other.poll() is None  # ended before the start, the other left
        assert "left 1 model process(es)" in started.stderr
        assert httpclient.InferenceServerClient(f"localhost:{http}").is_server_ready()
        assert not list(local_repo.rglob("__pycache__"))  # the stubs' bytecode is not left in the repository
        server = LocalServer(ServerSettings(str(local_repo), workdir=str(tmp_path / "srv")))
        assert len(server.stub_pids()) >= 2  # the running server's own stubs: untouched
        again = subprocess.run([sys.executable, "-m", "builder", "serve", "--detach", *common],
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        stopped = subprocess.run([sys.executable, "-m", "builder", "stop", "--workdir", str(tmp_path / "srv")], capture_output=True, text=True)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not (tmp_path / "srv" / "tritonserver.pid").exists() and not server.stub_pids()
    assert not list(local_repo.rglob("__pycache__"))
    assert other.poll() is None
    other.kill()


@pytest.mark.server
def test_server_crash_is_reported(tmp_path, local_repo):
    http, grpc, metrics = free_ports(3)
    server = LocalServer(ServerSettings(str(local_repo), http, grpc, metrics, workdir=str(tmp_path / "srv"),
                                        extra_args=("--no-such-flag",)))
    with pytest.raises(BuilderError, match="exited with code"):
        server.start(timeout=60)
