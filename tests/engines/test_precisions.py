"""The inductor engine's precisions: torchao quantization of an exported program's Linear layers (int8 on the CPU
here; fp8 needs Hopper/Ada, see tests/gpu), the settings, the compile time box, and the race's bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from builder import settings as s
from builder.compare import compare_logits
from builder.core.contract import Contract
from builder.engines import choice as ec
from builder.engines import inductor
from builder.errors import BuilderError


@pytest.fixture(scope="module")
def program(tmp_path_factory, tiny_model):
    contract = Contract("tiny", (224, 224), tiny_model.num_classes)
    return inductor.export_program(tiny_model, contract, tmp_path_factory.mktemp("p") / inductor.FILE, 8)


def _linears(module):
    return [n for n in module.graph.nodes if n.op == "call_function"
            and n.target in (torch.ops.aten.linear.default, torch.nn.functional.linear)]


def test_int8_quantizes_every_linear_but_the_head_and_keeps_the_answer(program, tiny_model):
    from torchao.quantization import Int8Tensor

    from builder.engines.torch_runner import quantize_linears

    module = torch.export.load(str(program)).module()
    linears = _linears(module)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 224, 224), dtype=np.float32))
    with torch.no_grad():
        reference = tiny_model.module(x).numpy()
        count = quantize_linears(module, "int8")
        quantized = module(x).numpy()
    heads = [n for n in linears if n.args[1].target.startswith("head")]
    assert len(heads) == 1 and count == len(linears) - 1 > 0
    assert type(module.get_submodule("head.fc").weight) is torch.nn.Parameter  # the head stays FP32
    assert isinstance(module.get_submodule("layers.0.blocks.0.mlp.fc1").weight, Int8Tensor)
    figures = compare_logits(reference, quantized)
    assert figures["min_cosine"] > 0.99 and figures["top1_agreement"] == 1.0
    assert figures["max_abs"] > 0  # quantized for real: not bit-equal to FP32


def test_precision_settings_name_the_choices():
    assert s.RepoSettings().inductor_precision == "auto" and s.RepoSettings().served_precision == "fp16"
    assert s.RepoSettings(flavor="local", engine="inductor", inductor_precision="fp8").served_precision == "fp8"
    with pytest.raises(BuilderError, match="inductor_precision: 'int4' is unknown; use one of auto, fp16, fp32, "
                                           "int8, fp8, fp8-tensor, fp8-static"):
        s.RepoSettings(engine="inductor", inductor_precision="int4")
    with pytest.raises(BuilderError, match="compile_timeout_s: is 0"):
        s.RepoSettings(compile_timeout_s=0)


def test_served_runner_knows_every_precision_the_settings_allow():
    from builder.engines.torch_runner import PRECISIONS

    assert set(PRECISIONS) == set(s.INDUCTOR_PRECISIONS)
    assert {p for p, (_, scheme) in PRECISIONS.items() if scheme} == set(s.QUANTIZED_PRECISIONS)
    assert set(s.RACED_PRECISIONS) <= set(s.INDUCTOR_PRECISIONS)


def test_a_compile_past_its_time_box_is_stopped_with_a_message(program):
    folder = program.parent
    (folder / inductor.SIDECAR).write_text(json.dumps({"environment": inductor.environment()}))
    params = {"precision": "fp16", "compile": "reduce-overhead", "batch_buckets": "1,8", "input_dims": "3,224,224"}
    with pytest.raises(BuilderError, match=r"the TorchInductor compile step did not finish in 1 s \(stopped\); "
                                           r"raise --compile-timeout-s"):
        inductor.compile_engine(folder, params, 8, timeout_s=1)


def test_the_table_and_the_choice_tell_precisions_apart(tmp_path):
    from builder.engines.race import _keep_winner

    def rows(b1, b128):
        return [{"batch_size": 1, "throughput_img_per_s": b1, "latency_p50_ms": 1000 / b1},
                {"batch_size": 128, "throughput_img_per_s": b128, "latency_p50_ms": 128_000 / b128}]

    fp16 = ec.Candidate("inductor", "measured", timings=rows(1600, 12_000), precision="fp16")
    fp8 = ec.Candidate("inductor", "measured", timings=rows(1500, 15_000), precision="fp8",
                       parity={"max_abs": 0.2, "top1_agreement": 1.0})
    int8 = ec.Candidate("inductor", "failed", "fails parity", timings=rows(1700, 16_000), precision="int8")
    assert ec.choose([fp16, fp8, int8]) is fp8  # a failed gate is never served, however fast
    table = ec.markdown_table([fp16, fp8, int8])
    assert "| inductor fp8 | **served** |" in table and "| inductor int8 | failed |" in table
    # The served precision's files move beside the program; the others' go.
    for precision in ("fp16", "fp8"):
        (tmp_path / "precisions" / precision).mkdir(parents=True)
        (tmp_path / "precisions" / precision / inductor.SIDECAR).write_text(precision)
        (tmp_path / "precisions" / precision / inductor.ARTIFACTS).write_bytes(precision.encode())
    (tmp_path / inductor.FILE).write_bytes(b"program")
    gates = {"inductor_vs_pytorch": {}}
    _keep_winner(tmp_path, fp8, gates)
    assert (tmp_path / inductor.SIDECAR).read_text() == "fp8" and (tmp_path / inductor.ARTIFACTS).read_bytes() == b"fp8"
    assert not (tmp_path / "precisions").exists() and gates["inductor_served_vs_pytorch"] == fp8.parity


def test_the_container_image_cannot_serve_quantized_precisions():
    with pytest.raises(BuilderError, match=r"inductor_precision: fp8 needs torch >= 2.11 \(and torchao for "
                                           r"the dynamic scales\), and the container image's torch is older"):
        s.RepoSettings(flavor="container", engine="inductor", inductor_precision="fp8")
    assert s.RepoSettings(flavor="container", engine="inductor").inductor_precision == "auto"  # fp16 races alone


def test_static_fp8_quantizes_every_calibrated_linear_from_the_sidecar_and_keeps_the_answer(program, tiny_model):
    """fp8-static: the build's calibration on the bundled photos (each Linear input's absolute maximum), then the
    runner's rewrite of the exported program (FP8 weights, static scales, one `torch._scaled_mm` per layer; the
    head and its weight stay FP32). On the CPU the served runner keeps FP32 (`precision` applies on CUDA); the
    rewrite itself runs here with torch's CPU FP8 matrix product."""
    from builder.core.imaging import PreprocessParams
    from builder.core.photos import photo_batch
    from builder.engines import static_fp8
    from builder.engines.torch_runner import _fp8_linear, quantize_static_fp8

    photos = photo_batch(PreprocessParams.from_timm(tiny_model.data_config))[:8]  # the program's max batch
    amax = static_fp8.calibrate(tiny_model.module, photos)
    record = static_fp8.quantization_record(amax, len(photos))
    assert record["input_amax"] == amax and "the 8 bundled photos" in record["calibration"]
    module = torch.export.load(str(program)).module()
    linears = _linears(module)
    assert len(amax) == len(linears) - 1 and not any(name.startswith("head") for name in amax)
    with torch.no_grad():
        reference = tiny_model.module(torch.from_numpy(photos)).numpy()
        count, folded = quantize_static_fp8(module, json.loads(json.dumps(amax)))  # as read back from engine.json
        quantized = module(torch.from_numpy(photos)).numpy()
    assert count == len(amax) and not _linears(module)[1:]  # only the head's linear call is left
    assert folded == 0  # timm's attention: every input quantized where Inductor compiles its producer
    assert sum(n.target is _fp8_linear for n in module.graph.nodes) == count
    qkv = module.get_submodule("layers.0.blocks.0.attn.qkv")
    assert qkv.weight_fp8.dtype == torch.float8_e4m3fn and not hasattr(qkv, "weight")
    assert module.get_submodule("head.fc").weight.dtype == torch.float32
    figures = compare_logits(reference, quantized)
    assert figures["min_cosine"] > 0.99 and figures["max_abs"] > 0, figures


def test_static_fp8_built_without_a_gpu_records_its_calibration_for_the_server(tmp_path, tiny_model):
    """Named on a build host with no GPU, fp8-static is compiled where it is served: the program's sidecar holds
    the calibration the served runner reads (a sidecar without it fails the load in one line)."""
    from builder.core.imaging import PreprocessParams
    from builder.engines.race import inductor_candidates
    from builder.engines.torch_runner import _calibration

    settings = s.RepoSettings(flavor="local", engine="inductor", inductor_precision="fp8-static",
                              classifier_batching=s.Batching(8, (), 0))
    contract = Contract("tiny", (224, 224), tiny_model.num_classes)
    params = PreprocessParams.from_timm(tiny_model.data_config)
    rows, _ = inductor_candidates(settings, tiny_model, contract, params, tmp_path, None, [1, 8], strict=True)
    assert [(r.status, r.precision) for r in rows] == [("built", "fp8-static")]
    quantization = json.loads((tmp_path / inductor.SIDECAR).read_text())["quantization"]
    assert quantization["scheme"] == "fp8-static" and "bundled photos" in quantization["calibration"]
    assert _calibration(str(tmp_path)) == quantization["input_amax"] and len(quantization["input_amax"]) > 0
    (tmp_path / inductor.SIDECAR).write_text(json.dumps({"environment": {}}))
    with pytest.raises(RuntimeError, match="built with fp8-static Linear layers and .* holds no calibration"):
        _calibration(str(tmp_path))


def test_a_failed_compile_says_its_exception_not_dynamos_hints():
    """The compile child's output as torch 2.11 ends a failed Inductor compile: the reason shown is the exception."""
    from builder.engines.inductor import _what_failed

    output = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
              "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:",
              "AssertionError: the op's fake returned a tensor on the wrong device", "",
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're reporting a "
              "bug to PyTorch). For even more developer context, set TORCH_LOGS=\"+dynamo\"", ""]
    assert _what_failed(output).startswith("AssertionError: the op's fake returned a tensor on the wrong device | "
                                           "Set TORCHDYNAMO_VERBOSE=1")
    assert _what_failed(["a", "b", "c", "d"]) == "b | c | d"
