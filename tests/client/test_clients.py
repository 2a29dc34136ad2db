"""The client library, its CLI and the raw protocol, against the real local tritonserver."""

from __future__ import annotations

import asyncio
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from builder.serving.server import LocalServer, ServerSettings
from clients import (AsyncClassifier, Classifier, ClientError, ClientSettings, ModelNotFound, RequestTimeout,
                     ServerUnavailable, SettingsError)
from conftest import SERVED_LOGIT_ATOL, free_ports, ready_stub

ROOT = Path(__file__).resolve().parents[2]


def settings_for(server, contract, protocol="grpc", **kwargs) -> ClientSettings:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return ClientSettings(url=url, protocol=protocol, model=contract.ensemble, **kwargs)


def check_against_reference(results, photos, timm_reference):
    reference = timm_reference(photos)
    assert all(r.ok for r in results), [r.error for r in results]
    logits = np.stack([r.logits for r in results])
    assert np.abs(logits - reference).max() <= SERVED_LOGIT_ATOL
    assert [r.top1.index for r in results] == reference.argmax(1).tolist()


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("mode,shared_memory", [("ensemble", "none"), ("ensemble", "system"),
                                                ("classifier", "none"), ("classifier", "system")])
def test_sync_paths(server, contract, photos, timm_reference, protocol, mode, shared_memory):
    settings = settings_for(server, contract, protocol, mode=mode, shared_memory=shared_memory,
                            max_batch=3, concurrency=2)
    with Classifier(settings) as client:
        client.wait_until_ready(30)
        results = client.classify(photos, top_k=3, return_logits=True)
    check_against_reference(results, photos, timm_reference)
    assert all(len(r.predictions) == 3 for r in results)
    assert all(r.predictions[0].score >= r.predictions[1].score for r in results)
    assert results[0].source == "#0"


@pytest.mark.server
def test_classify_checks_its_arguments(server, contract, photo_paths):
    """The Python API checks as the CLI does; top-k is the server's classification extension, any k works."""
    with Classifier(settings_for(server, contract)) as client:
        for bad in (0, -1, 2.5, True):
            with pytest.raises(SettingsError, match="top_k: is"):
                client.classify([photo_paths[0]], top_k=bad)
        (one,) = client.classify(str(photo_paths[0]), top_k=2)  # a path alone is one image, not its characters
        assert one.ok and one.source == str(photo_paths[0]) and len(one.predictions) == 2
        (wide,) = client.classify([photo_paths[0]], top_k=20)
        assert len(wide.predictions) == 20 and wide.top1.index == one.top1.index


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_paths(server, contract, photos, timm_reference, protocol):
    async def run():
        async with AsyncClassifier(settings_for(server, contract, protocol, max_batch=2, concurrency=3)) as client:
            await client.wait_until_ready(30)
            return await client.classify(photos, top_k=5, return_logits=True)

    check_against_reference(asyncio.run(run()), photos, timm_reference)


@pytest.mark.server
def test_paths_arrays_and_pil_images(server, contract, photo_paths, photos):
    from PIL import Image

    array = np.asarray(Image.open(photo_paths[0]).convert("RGB"))
    with Classifier(settings_for(server, contract)) as client:
        by_path, by_bytes, by_array, by_pil = client.classify(
            [photo_paths[0], photos[0], array, Image.fromarray(array)], return_logits=True)
    assert by_path.source == str(photo_paths[0])
    # A PNG of the same pixels decodes to the same tensor: identical logits.
    assert np.array_equal(by_path.logits, by_bytes.logits)
    assert np.allclose(by_array.logits, by_bytes.logits, atol=1e-5)
    assert np.array_equal(by_array.logits, by_pil.logits)


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_images_fail_alone_with_the_servers_message(server, contract, photos, tmp_path, protocol):
    missing = tmp_path / "missing.jpg"
    items = [photos[0], b"not an image", photos[1], b"", str(missing), photos[2]]
    with Classifier(settings_for(server, contract, protocol, max_batch=8)) as client:
        results = client.classify(items)
    assert [r.ok for r in results] == [True, False, True, False, False, True]
    assert "not a decodable image" in results[1].error and results[1].source == "#1"
    assert "empty input" in results[3].error
    assert "cannot read" in results[4].error and results[4].source == str(missing)

    async def run():
        async with AsyncClassifier(settings_for(server, contract, protocol, max_batch=8)) as client:
            return await client.classify(items)

    assert [r.ok for r in asyncio.run(run())] == [True, False, True, False, False, True]


@pytest.mark.server
def test_errors_are_typed(server, contract, photos):
    with Classifier(ClientSettings(url=server.grpc_url, model="no_such_model", retries=0)) as client:
        with pytest.raises(ModelNotFound):
            client.classify([photos[0]])
    with Classifier(settings_for(server, contract, model_version="7", retries=0)) as client:
        with pytest.raises(ModelNotFound):
            client.classify([photos[0]])
    with Classifier(settings_for(server, contract, model_version="1")) as client:
        assert client.classify([photos[0]])[0].ok  # pinned to the version that exists
    port = free_ports(1)[0]
    with Classifier(ClientSettings(url=f"localhost:{port}", retries=1, backoff_s=0.01)) as client:
        with pytest.raises(ServerUnavailable):
            client.classify([photos[0]])
    with pytest.raises(SettingsError, match="protocol"):
        ClientSettings(protocol="ftp")
    with pytest.raises(SettingsError, match="url"):
        ClientSettings(url="http://localhost:8000")


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_timeouts_fire(server, contract, photos, protocol):
    big = photos * 4  # enough work that 1 ms cannot be met
    with Classifier(settings_for(server, contract, protocol, timeout_s=0.001, retries=0, max_batch=8)) as client:
        with pytest.raises(RequestTimeout):
            client.classify(big)
    assert server.is_ready()


def _recording_proxy(target_port: int):
    """A TCP relay to the real server on `target_port` that keeps every byte the client sent."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    received = bytearray()

    def pipe(source, sink, record):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if record:
                    received.extend(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def serve():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", target_port))
            threading.Thread(target=pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream, client, False), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, received


@pytest.mark.server
def test_headers_are_sent(server, contract, photos):
    """The headers reach the server on the wire: recorded between the client and the real tritonserver."""
    listener, received = _recording_proxy(server.settings.http_port)
    try:
        settings = ClientSettings(url=f"localhost:{listener.getsockname()[1]}", protocol="http",
                                  model=contract.ensemble,
                                  headers=(("authorization", "Bearer test-token"), ("x-request-source", "tests")))
        with Classifier(settings) as client:
            assert client.classify([photos[0]])[0].ok
    finally:
        listener.close()
    wire = bytes(received).lower()
    assert b"authorization: bearer test-token\r\n" in wire and b"x-request-source: tests\r\n" in wire
    assert wire.count(b"post /v2/models/") >= 1  # the inference request itself carried them


@pytest.mark.server
def test_load_balanced_channel(server, contract, photos):
    settings = ClientSettings.load_balanced(f"dns:///localhost:{server.settings.grpc_port}", model=contract.ensemble)
    assert ("grpc.lb_policy_name", "round_robin") in settings.grpc_channel_args
    with Classifier(settings) as client:
        assert client.classify(photos[:2])[1].ok


def _start(repo, ports, workdir, extra=()):
    http, grpc, metrics = ports
    return LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(workdir),
                                      extra_args=tuple(extra))).start()


@pytest.mark.server
def test_retries_recover_across_a_server_restart(local_repo, contract, photos, tmp_path):
    ports = free_ports(3)
    server = _start(local_repo, ports, tmp_path / "srv")
    # About 18 s of retries: the outage is the stop (4-6 s on 2 cores, one stub per instance to end), the pause
    # and the start.
    settings = ClientSettings(url=f"localhost:{ports[1]}", model=contract.ensemble, retries=20, backoff_s=0.2,
                              max_backoff_s=1.0)
    outcomes, stop = [], threading.Event()

    def keep_classifying():
        with Classifier(settings) as client:
            while not stop.is_set():
                try:
                    outcomes.append(client.classify(photos[:2])[0].ok)
                except Exception as exc:  # recorded, asserted below
                    outcomes.append(repr(exc))
                time.sleep(0.05)

    worker = threading.Thread(target=keep_classifying)
    worker.start()
    try:
        time.sleep(1.0)
        server.stop()
        time.sleep(1.0)  # down for a while: requests now retry
        server = _start(local_repo, ports, tmp_path / "srv")
        time.sleep(2.0)
    finally:
        stop.set()
        worker.join(60)
        server.stop()
    assert len(outcomes) > 5
    assert all(o is True for o in outcomes), [o for o in outcomes if o is not True][:3]


def test_tls_settings_are_checked(tmp_path):
    with pytest.raises(SettingsError, match="root_certificates: 'missing.pem' does not exist"):
        ClientSettings(ssl=True, root_certificates="missing.pem")
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    for protocol in ("grpc", "http"):
        with pytest.raises(SettingsError, match="root_certificates: given without ssl"):
            ClientSettings(url="localhost:8000", protocol=protocol, root_certificates=str(ca))
    with pytest.raises(SettingsError, match="needs both"):
        ClientSettings(ssl=True, private_key=str(ca))
    result = _cli("classify", "--ssl", "--root-certificates", "missing.pem", str(ca))
    assert result.returncode == 1 and "does not exist" in result.stderr and "unavailable" not in result.stderr


def _https_stub(cert, key):
    """tritonserver's HTTP has no TLS of its own: an HTTPS readiness stub stands in for a TLS front."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return ready_stub(ssl_context=context)


def _self_signed(tmp_path):
    key, cert = tmp_path / "server.key", tmp_path / "server.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return key, cert


def test_tls_http_honours_root_certificates(tmp_path):
    key, cert = _self_signed(tmp_path)
    httpd = _https_stub(str(cert), str(key))
    url = f"localhost:{httpd.server_address[1]}"
    try:
        trusted = ClientSettings(url=url, protocol="http", ssl=True, root_certificates=str(cert))
        with Classifier(trusted) as client:
            client.wait_until_ready(10)  # verified against the given CA
        untrusted = ClientSettings(url=url, protocol="http", ssl=True, retries=0)
        with Classifier(untrusted) as client, pytest.raises(RequestTimeout, match="CERTIFICATE_VERIFY_FAILED"):
            client.wait_until_ready(2)  # the system CAs do not know this certificate
    finally:
        httpd.shutdown()


@pytest.mark.server
def test_tls_grpc(local_repo, contract, photos, tmp_path):
    key, cert = _self_signed(tmp_path)
    ports = free_ports(3)
    server = _start(local_repo, ports, tmp_path / "srv", ["--grpc-use-ssl=true", f"--grpc-server-cert={cert}",
                                                         f"--grpc-server-key={key}"])
    try:
        secure = ClientSettings(url=f"localhost:{ports[1]}", model=contract.ensemble, ssl=True,
                                root_certificates=str(cert), headers=(("authorization", "Bearer t"),))
        with Classifier(secure) as client:
            assert client.classify([photos[0]])[0].ok
        plain = ClientSettings(url=f"localhost:{ports[1]}", model=contract.ensemble, retries=0, timeout_s=5)
        with Classifier(plain) as client:
            with pytest.raises(ClientError):  # a plaintext client cannot talk to a TLS port
                client.classify([photos[0]])
    finally:
        server.stop()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "clients", *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


@pytest.mark.server
def test_cli_folder_json_and_failures(server, contract, photo_paths, tmp_path):
    folder = tmp_path / "uploads"
    (folder / "nested").mkdir(parents=True)
    for i, path in enumerate(photo_paths[:3]):
        shutil.copy(path, folder / ("nested" if i else ".") / path.name)
    (folder / "notes.txt").write_text("not an image, and not picked up")
    ok = _cli("classify", "--url", server.grpc_url, "--model", contract.ensemble, "--json", "--top-k", "2", str(folder))
    assert ok.returncode == 0, ok.stderr
    lines = [json.loads(line) for line in ok.stdout.splitlines()]
    assert len(lines) == 3 and all(len(x["predictions"]) == 2 and x["error"] is None for x in lines)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    bad = _cli("classify", "--url", server.http_url, "--protocol", "http", "--model", contract.ensemble, str(folder))
    assert bad.returncode == 1
    assert "1 of 4 images failed" in bad.stderr and "broken.png" in bad.stderr
    assert bad.stdout.count("\n") == 4 and "ERROR" in bad.stdout and "Traceback" not in bad.stderr
    down = _cli("classify", "--url", f"localhost:{free_ports(1)[0]}", "--retries", "0", str(photo_paths[0]))
    # One cause, one line: no row per image, no second summary of the same error.
    assert down.returncode == 1 and down.stdout == "" and "Traceback" not in down.stderr
    assert down.stderr.count("\n") == 1 and down.stderr.startswith("error: server unavailable")
    assert "gRPC on 8001 and HTTP on 8000" in down.stderr  # the hint for a wrong port or protocol


@pytest.mark.server
def test_cli_keeps_answers_when_the_server_goes_away(local_repo, contract, photo_paths, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(60):
        shutil.copy(photo_paths[i % 3], folder / f"{i:03d}{photo_paths[i % 3].suffix}")
    ports = free_ports(3)
    server = _start(local_repo, ports, tmp_path / "srv")
    proc = subprocess.Popen([sys.executable, "-m", "clients", "classify", "--url", f"localhost:{ports[1]}",
                             "--model", contract.ensemble, "--json", "--max-batch", "1", "--concurrency", "1",
                             "--retries", "0", str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stdout:  # answers arrive one by one, before the run ends
            lines.append(json.loads(line))
            if len(lines) == 5:
                break
    finally:
        server.stop()
    rest, err = proc.communicate(timeout=120)
    lines += [json.loads(line) for line in rest.splitlines()]
    assert proc.returncode == 1 and "Traceback" not in err
    assert sorted(x["source"] for x in lines) == sorted(str(p) for p in folder.iterdir())  # each image once
    answered = [x for x in lines if x["error"] is None]
    assert len(answered) >= 5 and all(len(x["predictions"]) == 5 for x in answered)
    failed = [x for x in lines if x["error"]]
    assert failed and all(x["error"].startswith("not classified") for x in failed)
    assert f"({len(failed)} of 60 images not classified)" in err and err.count("error: ") == 1


@pytest.mark.server
def test_raw_http_with_curl(server, contract, photo_paths, photos, timm_reference):
    result = subprocess.run([str(ROOT / "clients" / "examples" / "curl_infer.sh"), str(photo_paths[1]),
                             server.http_url, contract.ensemble], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    (output,) = json.loads(result.stdout)["outputs"]
    assert output["name"] == "probabilities" and output["shape"] == [1, 5]
    score, index, label = output["data"][0].split(":", 2)
    assert int(index) == int(timm_reference([photos[1]]).argmax()) and label and 0 < float(score) <= 1


@pytest.mark.server
def test_raw_grpc_model_infer(server, contract, photos, timm_reference):
    """ModelInfer built from the generated protobuf classes only, as a Go/Java/Node service would."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=contract.ensemble)
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    request.outputs.add(name="logits")
    request.raw_input_contents.append(struct.pack("<I", len(photos[2])) + photos[2])
    with grpc.insecure_channel(server.grpc_url) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    raw = {o.name: (o, data) for o, data in zip(reply.outputs, reply.raw_output_contents)}
    ranked, data = raw["probabilities"]
    assert ranked.datatype == "BYTES" and list(ranked.shape) == [1, 3]
    length = struct.unpack("<I", data[:4])[0]  # the first length-prefixed element: the best class
    best = data[4:4 + length].decode().split(":", 2)
    logits = np.frombuffer(raw["logits"][1], dtype="<f4").reshape(list(raw["logits"][0].shape))
    reference = timm_reference([photos[2]])
    assert int(best[1]) == reference.argmax() and best[2]
    assert np.abs(logits - reference).max() <= SERVED_LOGIT_ATOL
