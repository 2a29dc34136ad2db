"""The GPU data path's code on the CPU: the same GPU preprocessing (libjpeg-turbo decode instead of nvJPEG), its
fallback and error isolation, the parity gate, the inductor engine, and both served by the real tritonserver."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builder import settings as s
from builder.errors import BuilderError
from builder.core.photos import PHOTOS
from builder.repository.preprocess_gate import preprocess_parity
from builder.repository import configs
from builder.core.manifest import file_hashes, read_manifest
from builder.repository.models import LOAD_GATE
from builder.repository.writer import build_repository
from builder.core import imaging
from builder.repository.triton_models import SERVED_MODULES, gpu_imaging, gpu_transform
from conftest import (MAX_BATCH, TRITON_CLIENT_EXAMPLES, broken_jpegs, class_count_on_every_output, free_ports,
                      nvidia_ensemble_image_client, tiny_settings)

LEVEL = 1.0 / 255 / min(0.229, 0.224, 0.225)  # one 8-bit step after normalization


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def uploads(photos) -> dict:
    """Uploads in the shapes services get them, named."""
    base = Image.open(io.BytesIO(photos[0])).convert("RGB")
    items = {f"photo{i}": data for i, data in enumerate(photos)}
    items.update({p.name: p.read_bytes() for p in sorted(PHOTOS.iterdir()) if p.suffix != ".md"})
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        items[f"exif{orientation}"] = _jpeg(base.resize((320, 200)), exif=exif)
    items["gray"] = _jpeg(base.convert("L").resize((300, 400)))
    items["cmyk"] = _jpeg(base.convert("CMYK").resize((300, 200)))
    items["progressive"] = _jpeg(base.resize((400, 300)), progressive=True)
    items["tiny"] = _jpeg(base.resize((60, 40)))  # smaller than the crop: padded, as torchvision pads
    items["strip"] = _jpeg(base.resize((2000, 40)))
    return items


def _pillow_orientation(data: bytes):
    try:
        image = Image.open(io.BytesIO(data))
        if image.format != "JPEG" or image.mode not in ("RGB", "L"):
            return None
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:
        return None


def test_header_routing_agrees_with_pillow(uploads):
    broken = {"empty": b"", "soi only": b"\xff\xd8", "garbage": b"\xff\xd8garbage", "png": b"\x89PNG\r\n"}
    for name, data in {**uploads, **broken}.items():
        assert imaging.gpu_candidate(data, 64_000_000) == _pillow_orientation(data), name
    assert imaging.gpu_candidate(uploads["photo3"], 100) is None  # above the pixel limit: exact path


def test_gpu_preprocessing_matches_the_exact_path(uploads, params):
    names = list(uploads)
    preprocessor = gpu_imaging.GpuPreprocessor(params, "cpu")
    batch, errors = preprocessor([uploads[n] for n in names])
    assert errors == [None] * len(names)
    exact_path = [n for n in names if imaging.gpu_candidate(uploads[n], params.max_pixels) is None]
    assert "cmyk" in exact_path and "chelsea.png" in exact_path and "exif6" not in exact_path
    assert preprocessor.counts == {"gpu": len(names) - len(exact_path), "exact": len(exact_path)}
    assert preprocessor.graphs is None  # CUDA graphs on a CUDA device only (tests/gpu checks them to the bit)
    # A capture that fails (here for real: this host has no CUDA) turns graphs off, warns once, serves eager.
    warned = []
    graphs = gpu_transform.TransformGraphs(preprocessor._transform_batch, warned.append)
    decoded = preprocessor.decoder([uploads["exif6"]], [1])
    expected = preprocessor._transform_group(decoded)
    for _ in range(3):  # eager, the failed capture, eager
        assert torch.equal(graphs(decoded), expected)
    assert graphs.failure and not graphs.kept and len(warned) == 1 and "eager transform serves" in warned[0]
    for row, name in zip(batch.numpy(), names):
        diff = np.abs(row - imaging.preprocess(uploads[name], params))
        # Pillow's weights, Pillow's rounding: at most one 8-bit step, on a few pixels.
        assert diff.max() <= LEVEL + 1e-5 and (diff > 1e-5).mean() < 1e-3, (name, diff.max())


def test_broken_uploads_fail_alone_with_the_exact_messages(uploads, params):
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, "PNG")
    items = [uploads["photo3"], b"", b"\xff\xd8\xff\xe0broken", bomb.getvalue(), uploads["gray"]]
    batch, errors = gpu_imaging.GpuPreprocessor(params, "cpu")(items)
    assert errors[0] is None and errors[4] is None
    for index in (1, 2, 3):
        with pytest.raises(imaging.ImageError) as exact:
            imaging.preprocess(items[index], params)
        assert errors[index] == str(exact.value)
        assert not batch[index].any()
    assert "above the limit" in errors[3] and "0 bytes" in errors[1]


# Uploads cut short inside the scans: nvJPEG decodes them, libjpeg (the exact path) refuses them.
CUT_SHORT = ("cut at half", "cut near the end", "cut in the tables", "cut after the scan header")


def test_broken_jpegs_get_the_exact_answer(params):
    """Each damaged JPEG gets what the exact path gives it: its error message, or its acceptance."""
    photo = (PHOTOS / "astronaut_640x480.jpg").read_bytes()
    broken = broken_jpegs(photo)
    # What libjpeg refuses must never reach a GPU decoder that would answer it: routed by the header walk.
    for name in CUT_SHORT + ("no end marker", "segment length past the end", "no Huffman tables", "width zero"):
        assert imaging.gpu_candidate(broken[name], params.max_pixels) is None, name
    assert imaging.gpu_candidate(broken["trailing garbage"], params.max_pixels) == 1
    _, errors = gpu_imaging.GpuPreprocessor(params, "cpu")(list(broken.values()))
    for (name, data), error in zip(broken.items(), errors):
        assert error == imaging.try_preprocess(data, params)[1], name
    assert all("truncated" in errors[list(broken).index(n)] for n in ("cut at half", "cut near the end"))


def test_gpu_path_refuses_filters_it_cannot_reproduce(params, tiny_model):
    lanczos = imaging.PreprocessParams(**{**params.__dict__, "interpolation": "lanczos"})
    assert "lanczos" in gpu_transform.supported(lanczos)
    with pytest.raises(BuilderError, match="preprocess: interpolation 'lanczos'"):
        preprocess_parity(tiny_model.module, lanczos, s.Parity())


def test_parity_gate_figures_and_refusal(params, tiny_model):
    figures = preprocess_parity(tiny_model.module, params, s.Parity(max_abs=0.5, min_cosine=0.999, min_top1=0.9))
    assert figures["device"] == "cpu" and figures["images"] == 12
    assert figures["on_gpu_path"] == 10 and figures["on_exact_path"] == 2
    assert figures["tensor_max_abs"] <= LEVEL + 1e-5 and figures["min_cosine"] > 0.99999
    with pytest.raises(BuilderError, match="fails parity with the exact one"):
        preprocess_parity(tiny_model.module, params, s.Parity(max_abs=1e-9, min_cosine=0.5, min_top1=0.0))


def test_settings_of_the_variants():
    with pytest.raises(BuilderError, match="torch_compile: applies to the inductor engine, not onnxruntime"):
        s.RepoSettings(engine="onnxruntime", torch_compile="reduce-overhead")
    with pytest.raises(BuilderError, match="plan: the tensorrt engine serves a plan and none was given"):
        s.RepoSettings(engine="tensorrt")
    assert s.RepoSettings(engine="inductor").compile_mode == "reduce-overhead"
    with pytest.raises(BuilderError, match="inductor_precision: 'bf16' is unknown"):
        s.RepoSettings(engine="inductor", inductor_precision="bf16")
    from builder.core.contract import Contract
    from builder.engines.race import torch_parameters

    params = torch_parameters(s.RepoSettings(engine="inductor", inductor_precision="fp32",
                                             classifier_batching=s.Batching(48, (24,), 100),
                                             classifier_instances=s.InstanceGroup("KIND_CPU", 1)),
                              Contract("x", (224, 224), 1000))
    assert params["precision"] == "fp32" and params["batch_buckets"] == ",".join(map(str, [1, 2, *range(4, 49, 4)]))
    from builder.engines.race import batch_buckets

    # A batch pads to the next bucket: by at most 3 rows up to 64 (a batch of 25 ran as 32 with a step of 8),
    # 7 up to 128, about 16 graphs above 64 for larger maxima, the preferred sizes and max always in.
    assert batch_buckets(128) == [1, 2, *range(4, 65, 4), *range(72, 129, 8)] and batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(1) == [1] and batch_buckets(100, (36,))[-3:] == [88, 96, 100] and 36 in batch_buckets(100, (36,))
    large = batch_buckets(1000)
    assert large[-1] == 1000 and len(large) <= 34 and max(b - a for a, b in zip(large, large[1:])) <= 64
    assert params["intra_op_threads"] == "0"  # CPU instances compute on the CPU: torch's own pool
    gpu = torch_parameters(s.RepoSettings(engine="inductor", classifier_instances=s.InstanceGroup("KIND_GPU", 2)),
                           Contract("x", (224, 224), 1000))
    assert gpu["intra_op_threads"] == "1"  # GPU instances only stack and copy: one thread each (H100-measured)
    with pytest.raises(BuilderError, match="preprocess: 'fast' is unknown"):
        s.RepoSettings(preprocess="fast")
    with pytest.raises(BuilderError, match="engine: 'tvm' is unknown"):
        s.RepoSettings(engine="tvm")


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory):
    """The `gpu` preprocessing and the inductor engine, on CPU instances (same code as on a GPU host)."""
    return build_repository(tiny_settings(
        tmp_path_factory.mktemp("gpu") / "repo", preprocess="gpu", engine="inductor", torch_compile="none",
        preprocess_instances=s.InstanceGroup("KIND_CPU", 1)))


def test_variant_repository(gpu_repo, tmp_path):
    manifest = read_manifest(gpu_repo)
    gates = manifest["parity"]
    assert gates["inductor_vs_pytorch"]["max_abs"] < 1e-4
    assert gates["gpu_preprocess_vs_exact"]["top1_agreement"] == 1.0
    assert manifest["model_versions"][0]["engine"] == "inductor" and manifest["model_versions"][0]["preprocess"] == "gpu"
    pre = (gpu_repo / "swin_tiny_patch4_window7_224_preprocess")
    cls = (gpu_repo / "swin_tiny_patch4_window7_224_classifier")
    assert {p.name for p in (pre / "1").iterdir()} >= {"model.py", *SERVED_MODULES["preprocess_gpu"]}
    assert {p.name for p in (cls / "1").iterdir()} >= {"model.py", *SERVED_MODULES["classifier_torch"], "model.pt2",
                                                       "engine.json"}
    text = (cls / "config.pbtxt").read_text()
    assert 'key: "FORCE_CPU_ONLY_INPUT_TENSORS"' in text and 'string_value: "no"' in text
    assert 'string_value: "1,2,4,8"' in text  # batch buckets: powers of two, the preferred sizes, max
    assert 'string_value: "gpu"' in (pre / "config.pbtxt").read_text()
    assert sorted(p.name for p in (pre / "1" / "gate").iterdir()) == sorted(LOAD_GATE["photos"])
    assert "gate_note" in gates["gpu_preprocess_vs_exact"]  # gated on this CPU: the served model re-checks
    # The photo path is one model under the ensemble's name, not an ensemble: with the inductor engine, `auto`
    # makes it fused (the engine runs in its process, from links to the classifier's files).
    photo_path = configs.read(gpu_repo / "swin_tiny_patch4_window7_224" / "config.pbtxt")
    assert photo_path.backend == "python" and not photo_path.HasField("ensemble_scheduling")
    assert not photo_path.model_warmup and photo_path.dynamic_batching.max_queue_delay_microseconds == 0
    assert photo_path.parameters["classifier"].string_value == "swin_tiny_patch4_window7_224_classifier"
    assert [(o.name, o.label_filename) for o in photo_path.output] == [("probabilities", "labels.txt"),
                                                                      ("logits", "labels.txt")]
    assert (gpu_repo / "swin_tiny_patch4_window7_224" / "labels.txt").is_file()
    assert {p.name for p in (gpu_repo / "swin_tiny_patch4_window7_224" / "1").iterdir()} >= {
        "model.py", *SERVED_MODULES["photo_path"], "gate", "engine"}
    assert photo_path.parameters["engine_dir"].string_value == "engine"
    assert manifest["settings"]["gpu_photo_path"] == "fused"
    sidecar = json.loads((cls / "1" / "engine.json").read_text())
    assert sidecar["environment"]["torch"] == torch.__version__
    # A stricter gate refuses the build and leaves the repository as it was.
    before = file_hashes(gpu_repo)
    strict = tiny_settings(gpu_repo, preprocess="gpu", preprocess_parity=s.Parity(max_abs=1e-9))
    with pytest.raises(BuilderError, match="previous repository is left in place"):
        build_repository(strict)
    assert file_hashes(gpu_repo) == before


def test_needs_torch_tells_the_container_image(gpu_repo, local_repo):
    """`make serve-docker` builds the server image WITH_TORCH=1 exactly when the repository runs torch."""
    import subprocess
    import sys

    from builder.repository.check import needs_torch

    assert needs_torch(gpu_repo) and not needs_torch(local_repo)
    out = subprocess.run([sys.executable, "-m", "builder", "check", str(gpu_repo), "--needs-torch"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
    compose = (Path(__file__).resolve().parents[2] / "docker" / "compose.yaml").read_text()
    assert 'WITH_TORCH: "${WITH_TORCH:-0}"' in compose


def test_torch_engine_buckets_and_artifact_lock(gpu_repo, tiny_model, caplog):
    from builder.engines.torch_runner import TorchEngine

    caplog.set_level("INFO")
    version_dir = gpu_repo / "swin_tiny_patch4_window7_224_classifier" / "1"
    params = {"precision": "fp16", "compile": "none", "batch_buckets": "1,4,8", "input_dims": "3,224,224"}
    engine = TorchEngine(str(version_dir), "cpu", params, MAX_BATCH)
    assert engine.dtype == torch.float32 and engine.buckets == [1, 4, 8]  # FP16 only on a GPU
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        reference = tiny_model.module(x)
    assert torch.allclose(engine(x), reference, atol=1e-4)  # padded to bucket 4, cut back to 3 rows
    with pytest.raises(ValueError, match="inductor_tuning 'fastest' is unknown; use one of none, coordinate-descent"):
        TorchEngine(str(version_dir), "cpu", {**params, "inductor_tuning": "fastest"}, MAX_BATCH)
    threads = torch.get_num_threads()
    try:  # the instance's CPU pool follows intra_op_threads (GPU instances get 1 from the builder)
        TorchEngine(str(version_dir), "cpu", {**params, "intra_op_threads": "1"}, MAX_BATCH)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    sidecar = version_dir / "engine.json"
    original = sidecar.read_text()
    (version_dir / "inductor.bin").write_bytes(b"stale")
    try:
        engine._load_artifacts(str(version_dir))  # same torch and "GPU": loaded, found damaged
        assert "ignoring inductor.bin (" in caplog.text
        caplog.clear()
        info = json.loads(original)
        info["environment"]["torch"] = "2.0.0"
        sidecar.write_text(json.dumps(info))
        engine._load_artifacts(str(version_dir))  # made by another torch: refused with what it was made for
        out = caplog.text
        assert "ignoring inductor.bin, made for {'torch': '2.0.0'" in out and "compiling from scratch" in out
    finally:
        sidecar.write_text(original)
        (version_dir / "inductor.bin").unlink()


@pytest.mark.server
def test_served_gpu_variant_isolates_failures_and_matches_exact(gpu_repo, local_repo, uploads, photo_paths, tmp_path):
    """Also: `class_count` on every output of every model of the photo path's repository is answered, and
    NVIDIA's `ensemble_image_client.py` (where TRITON_CLIENT_EXAMPLES names it) classifies through it as it is."""
    from builder.serving.server import LocalServer, ServerSettings
    from clients import Classifier, ClientSettings

    names = ["photo3", "exif6", "gray", "cmyk", "chelsea.png", "tiny"]
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for name in ("photo3", "exif6", "gray"):
        (jpegs / f"{name}.jpg").write_bytes(uploads[name])
    http, grpc, metrics = free_ports(3)
    with LocalServer(ServerSettings(str(gpu_repo), http, grpc, metrics, workdir=str(tmp_path / "srv"))) as server:
        settings = ClientSettings(url=server.grpc_url, model="swin_tiny_patch4_window7_224", max_batch=MAX_BATCH)
        with Classifier(settings) as client:
            results = client.classify([uploads[n] for n in names] + [b"\xff\xd8broken"], return_logits=True)
        answers = class_count_on_every_output(server, [uploads["photo3"]])
        printed = {protocol: nvidia_ensemble_image_client(url, protocol, "swin_tiny_patch4_window7_224", jpegs)
                   for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url))
                   } if TRITON_CLIENT_EXAMPLES else {}
    failed = {key: answer for key, answer in answers.items() if not isinstance(answer, list)}
    assert len({model for _, model, _ in answers}) == 4 and not failed, failed
    assert all(len(row) == 3 for row in answers.values())
    best = results[0].top1.index  # photo3
    for rows in printed.values():
        for output in ("probabilities", "logits"):
            assert rows["photo3.jpg"][output][0][1] == best
    assert [r.ok for r in results] == [True] * len(names) + [False]
    assert "not a decodable image" in results[-1].error or "corrupt" in results[-1].error
    http, grpc, metrics = free_ports(3)
    with LocalServer(ServerSettings(str(local_repo), http, grpc, metrics, workdir=str(tmp_path / "x"))) as server:
        with Classifier(ClientSettings(url=server.grpc_url, model="swin_tiny_patch4_window7_224")) as client:
            exact = client.classify([uploads[n] for n in names], return_logits=True)
    for got, want in zip(results, exact):
        assert got.top1.index == want.top1.index
        assert np.abs(got.logits - want.logits).max() < 1e-3


@pytest.mark.server
def test_the_fused_design_runs_the_engine_in_its_own_process(tmp_path, uploads, params, tiny_model):
    """`--gpu-photo-path fused`: the photo-path model runs the classifier's inductor engine itself (no BLS hop),
    from links to the classifier's engine files, and answers as the exact path does."""
    from builder.repository.check import check_repository
    from builder.serving.server import LocalServer, ServerSettings
    from clients import Classifier, ClientSettings

    repo = build_repository(tiny_settings(tmp_path / "repo", preprocess="gpu", gpu_photo_path="fused",
                                          engine="inductor", torch_compile="none",
                                          preprocess_instances=s.InstanceGroup("KIND_CPU", 1)))
    fused = repo / "swin_tiny_patch4_window7_224"
    config = configs.read(fused / "config.pbtxt")
    assert config.parameters["engine_dir"].string_value == "engine" and not config.model_warmup
    engine, classifier = fused / "1" / "engine", repo / "swin_tiny_patch4_window7_224_classifier" / "1"
    assert (fused / "1" / "torch_runner.py").is_file()
    assert (engine / "model.pt2").stat().st_ino == (classifier / "model.pt2").stat().st_ino  # linked, not copied
    assert check_repository(repo) == []
    (engine / "model.pt2").rename(tmp_path / "aside.pt2")
    assert any("lacks engine/model.pt2" in p for p in check_repository(repo))
    (tmp_path / "aside.pt2").rename(engine / "model.pt2")
    (fused / "1" / "torch_runner.py").rename(tmp_path / "aside.py")  # as built by a builder before the head
    assert any("version 1 lacks torch_runner.py, which its model.py imports" in p for p in check_repository(repo))
    (tmp_path / "aside.py").rename(fused / "1" / "torch_runner.py")
    with pytest.raises(BuilderError, match="gpu_photo_path: fused runs the inductor engine"):
        s.RepoSettings(preprocess="gpu", gpu_photo_path="fused", engine="onnxruntime")
    # auto: fused with the inductor engine, bls with any other; fused after an auto race that
    # chose another engine is refused by name (the race's result passes through the same settings check).
    from builder.repository.writer import _photo_path

    for engine, design in (("inductor", "fused"), ("onnxruntime", "bls")):
        assert _photo_path(s.RepoSettings(preprocess="gpu", engine=engine)).gpu_photo_path == design
    # Many GPU photo-path instances: hybrid with the inductor engine (the classifier model joins their batches).
    for count, kind, design in ((6, "KIND_GPU", "hybrid"), (5, "KIND_GPU", "fused"), (8, "KIND_CPU", "fused")):
        many = s.RepoSettings(preprocess="gpu", engine="inductor", preprocess_instances=s.InstanceGroup(kind, count))
        assert _photo_path(many).gpu_photo_path == design, (count, kind)
    with pytest.raises(BuilderError, match="fused runs the inductor engine in the photo path's process, not onnx"):
        dataclasses.replace(s.RepoSettings(preprocess="gpu", gpu_photo_path="fused", engine="auto"),
                            engine="onnxruntime")
    names = ["photo3", "exif6", "gray", "cmyk"]
    http, grpc, metrics = free_ports(3)
    with LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv"))) as server:
        with Classifier(ClientSettings(url=server.grpc_url, model=fused.name, max_batch=MAX_BATCH)) as client:
            results = client.classify([uploads[n] for n in names] + [b"\xff\xd8broken"], return_logits=True)
        log = (tmp_path / "srv" / "tritonserver.log").read_text()
    assert [r.ok for r in results] == [True] * len(names) + [False]
    assert "in this process" in log
    with torch.no_grad():
        exact = tiny_model.module(torch.from_numpy(np.stack([imaging.preprocess(uploads[n], params) for n in names])))
    for got, want in zip(results, exact.numpy()):
        assert got.top1.index == int(want.argmax())
        assert np.dot(got.logits, want) / np.linalg.norm(got.logits) / np.linalg.norm(want) > 0.9999


def _answered(server, model: str) -> int:
    """Requests `model` has answered so far (Triton's statistics)."""
    import tritonclient.http

    (stats,) = tritonclient.http.InferenceServerClient(server.http_url).get_inference_statistics(model)["model_stats"]
    return int(stats["inference_stats"]["success"]["count"])


@pytest.mark.server
def test_photo_design_variants_and_the_null_ceiling_serve(gpu_repo, tmp_path, photo_paths):
    """perf/gpu/photo_designs.py, as the GPU measurements use it: `copy` serves the photo path again under
    another name with knobs changed (answers unchanged), `null` answers with the photo path's tensors and no
    work (the serving stack's own ceiling); swept with perf_analyzer's asynchronous client, each row with the
    host's CPU load and the server's failed requests."""
    import os
    import shutil
    import subprocess
    import sys

    from builder.serving.server import LocalServer, ServerSettings
    from clients import Classifier, ClientSettings
    from perf.sweep import SweepSettings, run_sweep

    root = Path(__file__).resolve().parents[2]
    repo = tmp_path / "repo"
    shutil.copytree(gpu_repo, repo, symlinks=True)
    name = "swin_tiny_patch4_window7_224"
    tool = [sys.executable, str(root / "perf" / "gpu" / "photo_designs.py")]
    env = {**os.environ, "PYTHONPATH": str(root)}
    # The copy is hybrid: batches of 1-2 images classified in its process, larger ones by BLS.
    subprocess.run(tool + ["copy", str(repo), name, f"{name}_i2", "--instances", "2", "--buckets", "1,3,8",
                          "--classifier", f"{name}_classifier", "--max-batch", "4", "--queue-delay-us", "2000",
                          "--local-batch", "2", "--graphs", "0"],
                   check=True, env=env, capture_output=True)
    subprocess.run(tool + ["null", str(repo), name], check=True, env=env, capture_output=True)
    copied = configs.read(repo / f"{name}_i2" / "config.pbtxt")
    assert copied.name == f"{name}_i2" and copied.instance_group[0].count == 2 and copied.max_batch_size == 4
    assert copied.dynamic_batching.max_queue_delay_microseconds == 2000
    assert copied.parameters["batch_buckets"].string_value == "1,3,8"
    assert copied.parameters["classifier"].string_value == f"{name}_classifier"
    assert copied.parameters["local_max_batch"].string_value == "2"
    # Small batches' transforms as CUDA graphs: on as built, off in the copy (a CPU instance has none either way).
    assert configs.read(repo / name / "config.pbtxt").parameters["transform_graphs"].string_value == "1"
    assert copied.parameters["transform_graphs"].string_value == "0"
    null = configs.read(repo / f"{name}_null" / "config.pbtxt")
    assert [o.name for o in null.output] == [o.name for o in configs.read(repo / name / "config.pbtxt").output]
    http, grpc, metrics = free_ports(3)
    with LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv"))) as server:
        (row,) = run_sweep(SweepSettings(
            name=f"{name}_null", http_url=server.http_url, grpc_url=server.grpc_url, concurrency=(2,),
            images=tuple(str(p) for p in photo_paths[:4]), measurement_interval_ms=500, stability_percent=99,
            max_trials=4, client_threads=2))  # any window: a busy 2-core host is never stable
        answers, calls = {}, [_answered(server, f"{name}_classifier")]
        for model in (name, f"{name}_i2"):
            with Classifier(ClientSettings(url=server.grpc_url, model=model, max_batch=MAX_BATCH)) as client:
                # One request of three images (BLS in the hybrid copy), then one of a single image (in its process).
                answers[model] = []
                for images in (photo_paths[:3], photo_paths[3:4]):
                    answers[model] += client.classify([p.read_bytes() for p in images], return_logits=True)
                    calls.append(_answered(server, f"{name}_classifier"))
        log = (tmp_path / "srv" / "tritonserver.log").read_text(errors="replace")
    assert "classifier swin_tiny_patch4_window7_224_classifier in this process up to 2 images, by BLS above" in log
    # The fused model never asks the classifier model; the hybrid copy asks once, for its batch of three.
    assert np.diff(calls).tolist() == [0, 0, 1, 0], calls
    assert "error" not in row, row
    assert "--async --max-threads 2" in row["command"] and 0 < row["host_cpu_busy"] <= 1
    assert row["stages"][f"{name}_null"]["failed"] == 0 and row["throughput_img_per_s"] > 0
    for first, second in zip(answers[name], answers[f"{name}_i2"]):
        assert first.ok and second.ok and first.top1.index == second.top1.index
        np.testing.assert_allclose(first.logits, second.logits, atol=1e-4)
    with pytest.raises(BuilderError, match="client_threads: -1 is negative"):
        SweepSettings(name=name, images=("a.jpg",), client_threads=-1)


def test_the_hybrid_design_is_written_with_its_local_limit(gpu_repo, tmp_path):
    """`--gpu-photo-path hybrid`: the fused model's files, and the largest batch it keeps in its process (at
    most the classifier's max batch); refused with another engine or a limit below 1."""
    from builder.core.contract import Contract
    from builder.repository import models
    from builder.repository.readme import render

    manifest = read_manifest(gpu_repo)
    contract = Contract("swin_tiny_patch4_window7_224", tuple(manifest["contract"]["tensors"]["input"]["dims"][1:]),
                        manifest["model"]["num_classes"])
    classifier = gpu_repo / contract.classifier / "1"
    for local, written in ((2, "2"), (1000, str(MAX_BATCH))):
        settings = tiny_settings(tmp_path / "unused", preprocess="gpu", engine="inductor", gpu_photo_path="hybrid",
                                 hybrid_local_batch=local)
        version = tmp_path / f"hybrid{local}" / "1"
        config = models.write_photo_path(version, settings, contract, {}, ["a", "b"], (classifier, {"compile": "none"}))
        assert config.parameters["local_max_batch"].string_value == written
        assert config.parameters["engine_dir"].string_value == "engine" and (version / "engine" / "model.pt2").is_file()
    import shutil

    from builder.repository.check import check_repository

    hybrid = tmp_path / "repo"
    shutil.copytree(gpu_repo, hybrid, symlinks=True)
    model = configs.read(hybrid / contract.ensemble / "config.pbtxt")
    model.parameters["local_max_batch"].string_value = "eight"
    model.parameters["transform_graphs"].string_value = "off"
    configs.write(model, hybrid / contract.ensemble)
    problems = check_repository(hybrid)
    assert any("local_max_batch 'eight' is not a whole number" in p for p in problems)
    assert any("transform_graphs 'off' is neither" in p for p in problems)
    readme = render(settings, contract, {"requested": "inductor", "chosen": "inductor", "reason": "asked"}, {})
    assert "(`hybrid`)" in readme and f"up to {settings.hybrid_local_batch} images" in readme
    with pytest.raises(BuilderError, match="hybrid_local_batch: is 0; use 1 or more images"):
        s.RepoSettings(preprocess="gpu", gpu_photo_path="hybrid", hybrid_local_batch=0)
    with pytest.raises(BuilderError, match="gpu_photo_path: hybrid runs the inductor engine in the photo path's"):
        s.RepoSettings(preprocess="gpu", gpu_photo_path="hybrid", engine="onnxruntime")


def test_photo_ceiling_runs_the_served_code_in_processes(gpu_repo, tmp_path):
    """perf/gpu/photo_ceiling.py (the photo path with no server, as the GPU measurements run it), on the CPU:
    a row for every process count and batch."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ceiling.json"
    subprocess.run([sys.executable, str(root / "perf" / "gpu" / "photo_ceiling.py"), "--repository", str(gpu_repo),
                    "--model", "swin_tiny_patch4_window7_224", "--batches", "1,2", "--processes", "1,2",
                    "--seconds", "0.2", "--device", "cpu", "--output", str(out)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    result = json.loads(out.read_text())
    assert result["kind"] == "photo_ceiling" and result["gpu"] == "none" and result["device"] == "cpu"
    assert [(r["processes"], r["batch"]) for r in result["rows"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["img_per_s"] > 0 and r["images"] >= 20 * r["batch"] * r["processes"] for r in result["rows"])
    # A measuring process that cannot load (here: a GPU this host lacks) ends the run at once, in one line.
    failed = subprocess.run([sys.executable, str(root / "perf" / "gpu" / "photo_ceiling.py"), "--repository",
                             str(gpu_repo), "--model", "swin_tiny_patch4_window7_224", "--batches", "1",
                             "--processes", "1", "--device", "cuda:0", "--output", str(tmp_path / "x.json")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert failed.returncode == 1 and "a measuring process failed" in failed.stderr
    assert not (tmp_path / "x.json").exists()
