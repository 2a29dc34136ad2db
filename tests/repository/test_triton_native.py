"""Any Triton client or tool works with the repository: a generic image client, the classification
extension, warm-up. Written the way Triton's own image_client example is, against the real server."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from builder.repository import configs
from builder.repository.check import check_repository



def _generic_classify(client, module, model: str, image: bytes, class_count: int, grpc: bool):
    """Metadata -> shape and format -> preprocess -> class_count, knowing nothing of this project."""
    metadata = client.get_model_metadata(model)
    config = client.get_model_config(model)
    if grpc:
        from google.protobuf import json_format

        metadata = json_format.MessageToDict(metadata, preserving_proto_field_name=True)
        config = json_format.MessageToDict(config, preserving_proto_field_name=True)["config"]
    (input_meta,), (output_meta,) = metadata["inputs"], metadata["outputs"]
    input_config = config["input"][0]
    fmt = input_config.get("format")
    if fmt not in ("FORMAT_NCHW", "FORMAT_NHWC"):
        raise ValueError(f"unexpected input format {fmt}")
    shape = [int(d) for d in input_meta["shape"]][1:]  # [-1, c, h, w] with a batch axis
    c, h, w = shape if fmt == "FORMAT_NCHW" else (shape[2], shape[0], shape[1])
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB").resize((w, h)), dtype=np.float32)
    pixels = (pixels / 127.5 - 1.0).transpose(2, 0, 1) if fmt == "FORMAT_NCHW" else pixels / 127.5 - 1.0
    batch = pixels[np.newaxis]
    inp = module.InferInput(input_meta["name"], list(batch.shape), input_meta["datatype"])
    inp.set_data_from_numpy(batch)
    out = module.InferRequestedOutput(output_meta["name"], class_count=class_count)
    plain = module.InferRequestedOutput(output_meta["name"])
    result = client.infer(model, [inp], outputs=[out])
    logits = client.infer(model, [inp], outputs=[plain]).as_numpy(output_meta["name"])[0]
    return [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy(output_meta["name"])[0]], logits


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generic_image_client_and_classification_extension(server, contract, photos, protocol):
    if protocol == "grpc":
        import tritonclient.grpc as module
        client = module.InferenceServerClient(server.grpc_url)
    else:
        import tritonclient.http as module
        client = module.InferenceServerClient(server.http_url)
    entries, logits = _generic_classify(client, module, contract.classifier, photos[1], 3, protocol == "grpc")
    assert len(entries) == 3
    parsed = [e.split(":", 2) for e in entries]
    indices = [int(i) for _, i, _ in parsed]
    assert indices == list(np.argsort(-logits)[:3])  # top-k in order
    scores = [float(s) for s, _, _ in parsed]
    assert scores == sorted(scores, reverse=True) and abs(scores[0] - logits.max()) < 1e-3
    assert all(label for _, _, label in parsed)  # names from labels.txt, not bare indices


def test_labels_and_warmup_in_the_configs(local_repo, contract):
    config = configs.read(local_repo / contract.classifier / "config.pbtxt")
    assert configs.to_text(config).count("format: FORMAT_NCHW") == 1
    assert config.output[0].label_filename == "labels.txt"
    labels = (local_repo / contract.classifier / "labels.txt").read_text().splitlines()
    for model in (contract.postprocess, contract.ensemble):  # every class-indexed output carries the same names
        assert (local_repo / model / "labels.txt").read_text().splitlines() == labels
        assert [o.label_filename for o in configs.read(local_repo / model / "config.pbtxt").output] == [
            "labels.txt", "labels.txt"]
    assert len(labels) == 1000
    assert [w.batch_size for w in config.model_warmup] == [1, 4, 8]
    pre = configs.read(local_repo / contract.preprocess / "config.pbtxt")
    (warmup,) = pre.model_warmup
    data = (local_repo / contract.preprocess / "warmup" / warmup.inputs["image"].input_data_file).read_bytes()
    assert int.from_bytes(data[:4], "little") == len(data) - 4 and data[4:6] == b"\xff\xd8"
    assert check_repository(local_repo) == []


def test_check_names_missing_labels_and_warmup_files(local_repo, contract, tmp_path):
    import shutil

    repo = tmp_path / "r"
    shutil.copytree(local_repo, repo)
    (repo / contract.classifier / "labels.txt").unlink()
    shutil.rmtree(repo / contract.preprocess / "warmup")
    problems = check_repository(repo)
    assert any("labels file 'labels.txt'" in p for p in problems), problems
    assert any("warm-up 'photo' reads warmup/photo.bin" in p for p in problems), problems


def test_onnxruntime_tensorrt_accelerator_and_response_cache_configs(tmp_path):
    from builder import settings as s
    from builder.repository.writer import build_repository
    from conftest import tiny_settings

    repo = build_repository(tiny_settings(tmp_path / "c", flavor="container", onnxruntime_tensorrt=True,
                                          response_cache=True))
    from builder.core.manifest import read_manifest

    # The accelerator is ONNX Runtime's: with the default engine (auto) it asks for ONNX Runtime, no race.
    assert read_manifest(repo)["engine"]["chosen"] == "onnxruntime"
    text = (repo / "swin_tiny_patch4_window7_224_classifier" / "config.pbtxt").read_text()
    for line in ('name: "tensorrt"', 'key: "precision_mode"', 'value: "FP16"',
                 'value: "/models/swin_tiny_patch4_window7_224_classifier/trt_cache"'):
        assert line in text, text
    ensemble = (repo / "swin_tiny_patch4_window7_224" / "config.pbtxt").read_text()
    assert "response_cache {\n  enable: true\n}" in ensemble
    plain = build_repository(tiny_settings(tmp_path / "p", flavor="container"))
    assert "response_cache" not in (plain / "swin_tiny_patch4_window7_224" / "config.pbtxt").read_text()
    with pytest.raises(s.BuilderError, match="onnxruntime_tensorrt: applies to the container flavor"):
        tiny_settings(tmp_path / "x", flavor="local", onnxruntime_tensorrt=True)


@pytest.mark.server
@pytest.mark.parametrize("preprocess", ["exact", "gpu"], ids=["ensemble", "photo_path"])
def test_response_cache_serves_repeated_uploads(tmp_path, photos, preprocess):
    """`--response-cache` caches the model clients call: the ensemble, or the GPU photo path under its name (whose
    config once dropped it silently); here the photo path runs its GPU code on a CPU instance, as in CI."""
    from builder import settings as s
    from builder.repository.writer import build_repository
    from builder.serving.server import LocalServer, ServerSettings
    from clients import Classifier, ClientSettings
    from conftest import free_ports, tiny_settings

    gpu = dict(preprocess="gpu", engine="inductor", torch_compile="none",
               preprocess_instances=s.InstanceGroup("KIND_CPU", 1)) if preprocess == "gpu" else {}
    repo = build_repository(tiny_settings(tmp_path / "r", response_cache=True, **gpu))
    assert "response_cache {\n  enable: true\n}" in (repo / "swin_tiny_patch4_window7_224" / "config.pbtxt").read_text()
    http, grpc, metrics = free_ports(3)
    settings = ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv"),
                              extra_args=("--cache-config=local,size=16777216",))
    with LocalServer(settings) as server:
        with Classifier(ClientSettings(url=server.grpc_url, model="swin_tiny_patch4_window7_224")) as client:
            first = client.classify([photos[0]])[0]
            again = client.classify([photos[0]])[0]
        import urllib.request

        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/swin_tiny_patch4_window7_224/stats") as r:
            stats = __import__("json").load(r)["model_stats"][0]["inference_stats"]
    assert first.top1 == again.top1
    assert int(stats["cache_hit"]["count"]) == 1 and int(stats["cache_miss"]["count"]) == 1
