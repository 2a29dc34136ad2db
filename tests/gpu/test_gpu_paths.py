"""The GPU code paths on a real GPU: decoders, the broken-upload answers, the served GPU path with its DLPack
hand-offs, Inductor's stored artifacts, the `auto` race, and plans where TensorRT exists.

`make test-gpu` runs these on a GPU host (skipped without one). They use the tiny Swin, so a run takes minutes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from builder import settings as s
from builder.core.photos import PHOTOS, photo_files
from conftest import MAX_BATCH, broken_jpegs, free_ports, tiny_settings

pytestmark = pytest.mark.gpu
JPEGS = [p for p in photo_files() if p.suffix == ".jpg"]


def test_gpu_decoder_matches_the_exact_path(params):
    """nvJPEG (torchvision) on the GPU against libjpeg on every bundled JPEG, with the load-time gate's figures."""
    from builder.repository.triton_models import gpu_imaging

    preprocessor = gpu_imaging.GpuPreprocessor(params, "cuda")
    figures = gpu_imaging.load_gate(preprocessor, [p.read_bytes() for p in JPEGS], 0.03, 0.999)
    assert figures["device"].startswith("cuda") and figures["decoder"] == "torchvision"
    assert figures["on_gpu_path"] >= len(JPEGS) - 1  # the CMYK JPEG takes the exact path
    print("decoder figures:", json.dumps(figures))


def test_tensor_core_transform_is_the_cpu_transform_to_the_bit(params):
    """float16 products of the split weights on tensor cores, float32 sums: the same values as the CPU's."""
    import torch

    from builder.repository.triton_models import gpu_imaging

    gpu, cpu = gpu_imaging.GpuPreprocessor(params, "cuda"), gpu_imaging.GpuPreprocessor(params, "cpu")
    assert gpu._dtype == torch.float16  # torch with `mm(..., out_dtype)`
    rng = np.random.default_rng(0)
    for width, height in ((640, 480), (4032, 3024), (333, 517)):
        images = [torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)) for _ in range(4)]
        ours = gpu._transform_group([image.cuda() for image in images]).cpu()
        assert torch.equal(ours, cpu._transform_group(images)), (width, height)



def test_graphed_transform_is_the_eager_transform_to_the_bit(params):
    """Small batches replay CUDA graphs (captured on a key's second sighting; 3 images in the graph of 4),
    interleaved, sharing one pool: each output equals the eager transform's, whatever ran between; large
    batches stay eager."""
    import torch

    from builder.repository.triton_models import gpu_imaging

    graphed = gpu_imaging.GpuPreprocessor(params, "cuda")
    eager = gpu_imaging.GpuPreprocessor(params, "cuda", graphs=False)
    graphs = graphed.graphs
    graphs.keep = 2  # three keys below: the least recently used is dropped and captured again later
    rng = np.random.default_rng(1)

    def batch(count, width, height):
        return [torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8)).cuda()
                for _ in range(count)]

    shapes = [(1, 640, 480), (4, 640, 480), (2, 333, 517), (3, 640, 480)] * 4 + [(1, 4032, 3024)] * 2
    outputs = []
    for shape in shapes:
        images = batch(*shape)
        outputs.append((graphed._transform_group(images), eager._transform_group(images)))
    for (ours, reference), shape in zip(outputs, shapes):  # compared after all ran: no output was overwritten
        assert torch.equal(ours, reference), shape
    assert (1, 3, 3024, 4032) not in graphs.kept and graphs.seen.get((1, 3, 3024, 4032)) is None  # over max_pixels
    assert len(graphs.kept) == 2 and graphs.captures >= 4  # 3 shapes in 2 slots: recaptured after eviction
    graphs.max_captures = graphs.captures  # the capture budget spent: a new key stays eager, the kept still replay
    for shape in [(1, 200, 100)] * 3 + [(4, 640, 480)]:
        images = batch(*shape)
        assert torch.equal(graphed._transform_group(images), eager._transform_group(images)), shape
    assert (1, 3, 100, 200) not in graphs.kept and graphs.captures == graphs.max_captures
    photos = [p.read_bytes() for p in JPEGS]
    for _ in range(3):
        ours, errors = graphed(photos[:1])
        assert torch.equal(ours, eager(photos[:1])[0]) and errors == [None]


@pytest.mark.skipif(importlib.util.find_spec("nvidia.nvimgcodec") is None if importlib.util.find_spec("nvidia")
                    else True, reason="nvImageCodec is not installed")
def test_nvimgcodec_decoder_matches_the_exact_path(params):
    from builder.repository.triton_models import gpu_imaging

    preprocessor = gpu_imaging.GpuPreprocessor(params, "cuda", "nvimgcodec")
    figures = gpu_imaging.load_gate(preprocessor, [p.read_bytes() for p in JPEGS], 0.03, 0.999)
    assert figures["decoder"] == "nvimgcodec"


def test_broken_jpegs_get_the_exact_answers_on_the_gpu(params):
    """The truncated-JPEG defect: nvJPEG answers what libjpeg refuses, so such uploads must never reach it."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from builder.core import imaging
    from builder.repository.triton_models import gpu_imaging

    broken = broken_jpegs((PHOTOS / "astronaut_640x480.jpg").read_bytes())
    _, errors = gpu_imaging.GpuPreprocessor(params, "cuda")(list(broken.values()))
    answered_by_nvjpeg = []
    for (name, data), error in zip(broken.items(), errors):
        exact = imaging.try_preprocess(data, params)[1]
        assert error == exact, (name, error, exact)
        if exact and "truncated" in exact:
            try:  # what the GPU decoder alone does with it: the reason for the routing
                decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                            device="cuda")
                answered_by_nvjpeg.append(name)
            except RuntimeError:
                pass
    print("cut-short JPEGs nvJPEG decodes without an error:", answered_by_nvjpeg)


@pytest.fixture(scope="module")
def gpu_served(tmp_path_factory):
    """A repository built here with `--engine auto` and the gpu preprocessing on GPU instances, served; the photo
    path is the bls design (one BLS request to the classifier model per batch), named, not left to auto."""
    from builder.repository.writer import build_repository
    from builder.serving.server import LocalServer, ServerSettings

    root = tmp_path_factory.mktemp("gpu-served")
    repo = build_repository(tiny_settings(
        root / "repo", preprocess="gpu", engine="auto", gpu_photo_path="bls",
        classifier_instances=s.InstanceGroup("KIND_GPU", 1),
        preprocess_instances=s.InstanceGroup("KIND_GPU", 1)))
    from builder.repository import configs

    photo_path = configs.read(repo / "swin_tiny_patch4_window7_224" / "config.pbtxt")
    photo_path.parameters["profile_every"].string_value = "2"  # the diagnostic, checked below
    configs.write(photo_path, repo / "swin_tiny_patch4_window7_224")
    http, grpc, metrics = free_ports(3)
    server = LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(root / "server")))
    with server:
        yield repo, server


@pytest.mark.server
def test_auto_race_ran_on_the_gpu(gpu_served):
    from builder.engines.choice import Candidate, choose
    from builder.core.manifest import read_manifest

    repo, _ = gpu_served
    engine = read_manifest(repo)["engine"]
    import torch

    assert engine["requested"] == "auto" and engine["gpu"] == torch.cuda.get_device_name(0)  # raced on this GPU
    measured = {c["engine"]: c for c in engine["candidates"] if c["status"] == "measured"}
    assert {"onnxruntime", "inductor"} <= set(measured), engine["candidates"]
    precisions = {c["precision"] for c in engine["candidates"] if c["engine"] == "inductor"}
    assert {"fp16", "int8", "fp8"} <= precisions  # auto races the quantized precisions too (torchao installed)
    # ... and the program with every window attention in the Triton kernel, at FP16 and static FP8 (calibrated on
    # the bundled photos), gated like the others.
    fused = {c["precision"]: c for c in engine["candidates"] if c["attention"] == "fused"}
    assert set(fused) == {"fp16", "fp8-static"}, fused
    assert all(row["status"] == "measured" for row in fused.values()), fused
    assert fused["fp16"]["parity"]["top1_agreement"] >= s.RepoSettings().engine_parity.min_top1
    assert fused["fp8-static"]["parity"]["top1_agreement"] >= s.LOW_PRECISION_PARITY.min_top1
    rows = [Candidate(**{k: v for k, v in c.items() if k in Candidate.__dataclass_fields__})
            for c in engine["candidates"]]
    assert engine["chosen"] == choose(rows).engine
    print("auto race:", json.dumps([(c["engine"], c["precision"], c["attention"], c["status"],
                                     c["best_throughput_img_per_s"]) for c in engine["candidates"]]))


def _infer(server, model: str, images):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("image", [len(images), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[i] for i in images], dtype=object))
    return client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput("logits")]).as_numpy("logits")


def _infer_pixels(server, model: str, pixels: np.ndarray) -> np.ndarray:
    """The classifier model's logits for FP32 pixels, as a direct client sends them."""
    import tritonclient.grpc as grpcclient

    from builder.core.contract import LOGITS, PIXELS

    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput(PIXELS, list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels.astype(np.float32))
    return client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(LOGITS)]).as_numpy(LOGITS)


def _inferences(server, model: str) -> int:
    """Images the model has run (Triton's statistics: inference_count counts batch rows)."""
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model, as_json=True)
    return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))


@pytest.mark.server
def test_served_gpu_path_matches_the_exact_path(gpu_served, tiny_model, params):
    """Bytes -> GPU decode -> DLPack -> classifier on the GPU -> logits, against exact + PyTorch FP32."""
    import torch

    from builder.compare import compare_logits
    from builder.core import imaging

    _, server = gpu_served
    images = [p.read_bytes() for p in photo_files()][:MAX_BATCH]
    got = _infer(server, "swin_tiny_patch4_window7_224", images)
    with torch.no_grad():
        reference = tiny_model.module(torch.from_numpy(np.stack([imaging.preprocess(i, params) for i in images])))
    figures = compare_logits(reference.numpy(), got)
    print("served vs exact + FP32:", json.dumps(figures))
    assert figures["min_cosine"] >= 0.999 and figures["top1_agreement"] >= 0.85, figures


@pytest.mark.server
def test_served_broken_uploads_get_the_exact_messages(gpu_served, params):
    from tritonclient.utils import InferenceServerException

    from builder.core import imaging

    _, server = gpu_served
    for name, data in broken_jpegs((PHOTOS / "astronaut_640x480.jpg").read_bytes()).items():
        exact = imaging.try_preprocess(data, params)[1]
        if exact is None:
            assert _infer(server, "swin_tiny_patch4_window7_224", [data]).shape == (1, 1000), name
            continue
        with pytest.raises(InferenceServerException) as info:
            _infer(server, "swin_tiny_patch4_window7_224", [data])
        assert exact in str(info.value), (name, str(info.value), exact)
    assert server.is_ready()


@pytest.mark.server
def test_served_models_checked_and_reused_what_was_built(gpu_served):
    """The photo path's load-time gate ran on the GPU (the preprocess model, kept for direct clients, on its CPU
    instance); the classifier loaded Inductor's stored artifacts."""
    from builder.core.manifest import read_manifest

    repo, server = gpu_served
    log = server.log_path.read_text(errors="replace")
    gate_lines = [line for line in log.splitlines() if "load-time parity gate passed" in line]
    on_gpu = [line for line in gate_lines if "cuda:0" in line]
    assert on_gpu and len(gate_lines) - len(on_gpu) <= 1, log[-3000:]
    # The photo path is the bls design: one BLS request per batch; its profile says where the time went.
    assert "photo path (bls): GPU decode on cuda:0" in log and "photo path profile over 2 batches" in log, \
        log[-3000:]
    print([line[line.index("photo path profile"):] for line in log.splitlines() if "photo path profile" in line][-1])
    gate = read_manifest(repo)["parity"]["gpu_preprocess_vs_exact"]
    assert gate["device"].startswith("cuda") and "gate_note" not in gate
    if read_manifest(repo)["engine"]["chosen"] != "inductor":
        pytest.skip("auto chose another engine here: no Inductor artifacts to reuse")
    version = repo / "swin_tiny_patch4_window7_224_classifier" / "1"
    sidecar = json.loads((version / "engine.json").read_text())
    assert (version / "inductor.bin").is_file() and sidecar["start_with_artifacts_s"] is not None
    assert "compiling from scratch" not in log and "ignoring inductor.bin" not in log
    assert "compile=reduce-overhead" in log  # CUDA graphs per bucket


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="TensorRT is not in this Python")
def test_a_plan_builds_validates_and_runs(tmp_path, tiny_model):
    """Where TensorRT lives: export, build a plan (timed, gated), run it through the served runner."""
    import subprocess
    import sys

    from builder.engines.plan_check import verify_plan
    from builder.engines.plan_runner import PlanRunner

    onnx = tmp_path / "model.onnx"
    ref = tmp_path / "ref.npz"
    root = Path(__file__).resolve().parents[2]
    kwargs = json.dumps({"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]})
    subprocess.run([sys.executable, "-m", "builder", "export", "--model-kwargs", kwargs, "--output", str(onnx),
                    "--reference", str(ref), "--images", str(PHOTOS), "--reference-batch", "8"], check=True, cwd=root)
    subprocess.run([sys.executable, "-m", "builder.engines.trt", "build", "--onnx", str(onnx), "--plan",
                    str(tmp_path / "model.plan"), "--reference", str(ref), "--max-batch", "8"], check=True, cwd=root)
    info = verify_plan(tmp_path / "model.plan")
    assert info["parity"]["top1_agreement"] >= 0.9
    with PlanRunner(str(tmp_path / "model.plan")) as runner:
        assert runner.time(4, warmup=2, iterations=5)["iterations"] == 5


def test_engine_graphs_replay_the_compiled_module(tiny_model, tmp_path):
    """The inductor engine's own CUDA graphs (one per bucket) against the same program without them: the
    same logits at every batch size, padded or not, and a result is not overwritten by the next replay."""
    import torch

    from builder.engines.inductor import export_program
    from builder.core.contract import Contract
    from builder.engines.torch_runner import TorchEngine

    contract = Contract("swin_tiny_patch4_window7_224", (224, 224), 1000)
    export_program(tiny_model, contract, tmp_path / "model.pt2", MAX_BATCH)
    params = {"precision": "fp32", "batch_buckets": "1,2,4,8", "input_dims": "3,224,224", "intra_op_threads": "1"}
    graphs = TorchEngine(str(tmp_path), "cuda", {**params, "compile": "reduce-overhead"}, MAX_BATCH)
    plain = TorchEngine(str(tmp_path), "cuda", {**params, "compile": "none"}, MAX_BATCH)
    assert sorted(graphs.graphs) == [1, 2, 4, 8] and not plain.graphs
    torch.manual_seed(0)
    first = torch.randn(3, 3, 224, 224, device="cuda")
    kept = graphs(first)
    for rows in (1, 3, 4, 5, 8):
        x = torch.randn(rows, 3, 224, 224, device="cuda")
        assert torch.allclose(graphs(x), plain(x), atol=1e-3), rows
    assert torch.allclose(kept, plain(first), atol=1e-3)  # still the first batch's logits


@pytest.mark.parametrize("tuning", ["coordinate-descent"])
def test_tuned_engine_matches_the_plain_program(tiny_model, tmp_path, tuning):
    """Inductor's kernel tuning (a candidate, `perf bare --inductor-tuning`) compiles, captures its graphs and
    gives the plain program's logits."""
    import torch

    from builder.engines.inductor import export_program
    from builder.core.contract import Contract
    from builder.engines.torch_runner import TorchEngine

    contract = Contract("swin_tiny_patch4_window7_224", (224, 224), 1000)
    export_program(tiny_model, contract, tmp_path / "model.pt2", MAX_BATCH)
    params = {"precision": "fp32", "batch_buckets": "1,4", "input_dims": "3,224,224", "intra_op_threads": "1"}
    tuned = TorchEngine(str(tmp_path), "cuda", {**params, "compile": "reduce-overhead", "inductor_tuning": tuning},
                        MAX_BATCH)
    plain = TorchEngine(str(tmp_path), "cuda", {**params, "compile": "none"}, MAX_BATCH)
    x = torch.randn(3, 3, 224, 224, device="cuda")
    assert torch.allclose(tuned(x), plain(x), atol=1e-3)


def test_quantized_precisions_compile_side_by_side_and_are_gated(tiny_model, params, tmp_path):
    """int8 and fp8 (torchao) and fp8-static (scales calibrated on the bundled photos) beside fp16 on this GPU:
    compiled at once, each loaded again, gated and timed."""
    import torch

    from builder.core.contract import Contract
    from builder.engines.race import inductor_candidates

    if torch.cuda.get_device_capability(0) < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    # timm's attention only: the fused program's row is the auto race's test.
    settings = tiny_settings(tmp_path / "repo", engine="inductor", preprocess="gpu", compile_timeout_s=600,
                             window_attention="timm")
    contract = Contract("swin_tiny_patch4_window7_224", (224, 224), 1000)
    rows, gates = inductor_candidates(settings, tiny_model, contract, params, tmp_path, "this GPU", [1, MAX_BATCH],
                                      strict=False, precisions=["fp16", "int8", "fp8", "fp8-static"])
    by = {row.precision: row for row in rows}
    print("precisions:", json.dumps({p: (r.status, r.latency_b1_ms, r.best, r.parity, r.reason[:160])
                                     for p, r in by.items()}))
    assert set(by) == {"fp16", "int8", "fp8", "fp8-static"} and gates["inductor_vs_pytorch"]["max_abs"] < 1e-3
    assert by["fp16"].status == "measured" and by["fp16"].parity["top1_agreement"] == 1.0
    for precision in ("int8", "fp8", "fp8-static"):  # quantization thresholds: measured, or failed by the gate
        row = by[precision]
        assert row.status == "measured" or "fails parity" in row.reason, row.reason
        assert row.parity or row.status == "failed"
    sidecar = json.loads((tmp_path / "precisions" / "fp8" / "engine.json").read_text())
    assert sidecar["quantization"]["library"] == "torchao" and "calibration" in sidecar["quantization"]
    static = json.loads((tmp_path / "precisions" / "fp8-static" / "engine.json").read_text())["quantization"]
    assert static["scheme"] == "fp8-static" and static["input_amax"] and "bundled photos" in static["calibration"]


@pytest.fixture(scope="module")
def fused_served(tmp_path_factory):
    """`--gpu-photo-path fused` on GPU instances: the inductor engine inside the photo path's process."""
    from builder.repository.writer import build_repository
    from builder.serving.server import LocalServer, ServerSettings

    from builder.repository import configs

    root = tmp_path_factory.mktemp("fused-served")
    repo = build_repository(tiny_settings(
        root / "repo", preprocess="gpu", engine="inductor", gpu_photo_path="fused",
        classifier_instances=s.InstanceGroup("KIND_GPU", 1), preprocess_instances=s.InstanceGroup("KIND_GPU", 1),
        # One instance, as written: the build's measurement of the setup is the quick-start test's to check.
        photo_setup=s.PhotoSetup(mode="fixed")))
    # Beside it, the same model made hybrid: batches of 1-2 images in its process, larger ones by BLS.
    name = "swin_tiny_patch4_window7_224"
    shutil.copytree(repo / name, repo / f"{name}_hybrid", ignore=shutil.ignore_patterns("config.pbtxt"))
    config = configs.read(repo / name / "config.pbtxt")
    config.name = f"{name}_hybrid"
    config.parameters["local_max_batch"].string_value = "2"
    configs.write(config, repo / config.name)
    http, grpc, metrics = free_ports(3)
    # Under the server's own MPS daemon where the host has one (as served for throughput: README).
    mps = shutil.which("nvidia-cuda-mps-control") is not None
    with LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(root / "server"), mps=mps)) as server:
        yield repo, server


def _mps_servers(daemon) -> list:
    """The MPS server pids a control daemon reports (one per user with CUDA clients)."""
    import os
    import subprocess

    done = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", capture_output=True, text=True,
                          env={**os.environ, **daemon.env()}, timeout=30)
    return [line for line in done.stdout.split() if line.strip().isdigit()]


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None, reason="no CUDA MPS control program here")
def test_the_servers_mps_daemon_takes_cuda_clients_and_quits(tmp_path):
    """`builder serve --mps`'s daemon: private to the workdir, a CUDA process under its variables becomes its
    client, and stop quits it (its control pipe answers no more)."""
    import os
    import subprocess
    import sys

    from builder.core.mps import MpsDaemon

    daemon = MpsDaemon(tmp_path)
    daemon.start()
    try:
        assert (tmp_path / "mps-daemon").is_file()
        client = subprocess.Popen(
            [sys.executable, "-c", "import sys, torch; x = torch.ones(1 << 20, device='cuda'); print(float(x.sum()));"
                                   " sys.stdout.flush(); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **daemon.env()})
        assert client.stdout.readline().strip() == str(float(1 << 20))
        servers = _mps_servers(daemon)  # the MPS server started for the client
        client.communicate("", timeout=60)
        assert servers, "no MPS server ran for the CUDA client"
    finally:
        daemon.stop()
    assert not (tmp_path / "mps-daemon").exists() and not _mps_servers(daemon)


@pytest.mark.server
def test_fused_photo_path_matches_the_exact_path(fused_served, tiny_model, params):
    """Bytes -> GPU decode -> the engine's CUDA graph in the same process -> logits, against exact + FP32, and
    the same answers as the classifier model serves for direct clients."""
    import torch

    from builder.compare import compare_logits
    from builder.core import imaging

    _, server = fused_served
    images = [p.read_bytes() for p in photo_files()][:MAX_BATCH]
    classifier = "swin_tiny_patch4_window7_224_classifier"
    before = _inferences(server, classifier)
    got = _infer(server, "swin_tiny_patch4_window7_224", images)
    assert _inferences(server, classifier) == before  # fused: the classifier model was not called
    pixels = np.stack([imaging.preprocess(i, params) for i in images])
    with torch.no_grad():
        reference = tiny_model.module(torch.from_numpy(pixels))
    figures = compare_logits(reference.numpy(), got)
    print("fused vs exact + FP32:", json.dumps(figures))
    assert figures["min_cosine"] >= 0.999 and figures["top1_agreement"] >= 0.85, figures
    # The classifier model, as a direct client calls it with the exact path's pixels: the same answers.
    direct = _infer_pixels(server, classifier, pixels)
    figures = compare_logits(direct, got)
    print("fused vs the classifier model on exact pixels:", json.dumps(figures))
    assert figures["min_cosine"] >= 0.999 and figures["top1_agreement"] >= 0.85, figures
    log = server.log_path.read_text(errors="replace")
    assert "in this process" in log and "load-time parity gate passed" in log, log[-3000:]
    assert "compiling from scratch" not in log  # the engine's links to inductor.bin were used
    # The hybrid copy (local limit 2): one image in its own process, the batch by BLS to the classifier model,
    # as Triton's own statistics of the classifier count them; the same answers.
    before = _inferences(server, classifier)
    one = _infer(server, "swin_tiny_patch4_window7_224_hybrid", images[:1])
    assert _inferences(server, classifier) == before
    batch = _infer(server, "swin_tiny_patch4_window7_224_hybrid", images)
    assert len(images) > 2 and _inferences(server, classifier) == before + len(images)
    figures = compare_logits(np.concatenate([got[:1], got]), np.concatenate([one, batch]))
    print("hybrid vs fused:", json.dumps(figures))
    assert figures["min_cosine"] >= 0.9999 and figures["top1_agreement"] == 1.0, figures


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is None, reason="no CUDA MPS control program here")
def test_class_count_on_every_output_of_the_gpu_photo_path(fused_served, tmp_path):
    """Triton's classification extension on every output of every model served on the GPU (the fused and hybrid
    photo paths, the classifier, the GPU preprocess, the postprocess): each answers, the server stays up; NVIDIA's
    `ensemble_image_client.py` (where TRITON_CLIENT_EXAMPLES names it) classifies JPEGs through the photo path."""
    from conftest import TRITON_CLIENT_EXAMPLES, class_count_on_every_output, nvidia_ensemble_image_client

    _, server = fused_served
    jpegs = sorted(p for p in photo_files() if p.suffix == ".jpg")[:3]
    answers = class_count_on_every_output(server, [jpegs[0].read_bytes()])
    failed = {key: answer for key, answer in answers.items() if not isinstance(answer, list)}
    assert len({model for _, model, _ in answers}) == 5 and not failed, failed
    best = int(answers[("grpc", "swin_tiny_patch4_window7_224", "probabilities")][0].split(":")[1])
    assert int(_infer(server, "swin_tiny_patch4_window7_224", [jpegs[0].read_bytes()])[0].argmax()) == best
    if TRITON_CLIENT_EXAMPLES:
        folder = tmp_path / "jpegs"
        folder.mkdir()
        for path in jpegs:
            shutil.copy2(path, folder / path.name)
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            printed = nvidia_ensemble_image_client(url, protocol, "swin_tiny_patch4_window7_224", folder)
            assert printed[jpegs[0].name]["probabilities"][0][1] == best, printed
    assert server.is_ready()
