"""`--engine auto`: the choice on recorded timings, the recorded TensorRT candidate, the CPU behaviour, and the
inductor build's fresh-process gate and timing (on the CPU here; on a GPU host it also compiles and stores
`inductor.bin`, see perf/results/h100-engine-auto/)."""

from __future__ import annotations

import json

import pytest
import torch

from builder.engines import choice as ec
from builder import settings as s
from builder.core.contract import Contract
from builder.errors import BuilderError
from builder.timing import timing_batches
from builder.core.manifest import read_manifest


def _rows(*pairs):
    """(batch, img/s) pairs as timing rows; latency follows from them."""
    return [{"batch_size": b, "throughput_img_per_s": t, "latency_p50_ms": 1000.0 * b / t} for b, t in pairs]


def test_choose_best_throughput_ties_by_latency_skips_the_unmeasured():
    ort = ec.Candidate("onnxruntime", "measured", timings=_rows((1, 150), (64, 900)))
    inductor = ec.Candidate("inductor", "measured", timings=_rows((1, 1400), (64, 10_800)))
    trt = ec.Candidate("tensorrt", "measured", timings=_rows((1, 830), (64, 7_300)))
    broken = ec.Candidate("tensorrt", "failed", "parity", timings=_rows((1, 99_999)))
    assert ec.choose([ort, inductor, trt, broken]) is inductor
    assert inductor.chosen and not trt.chosen and not broken.chosen
    # Within 3% of the best throughput, the lower batch-1 latency wins.
    close = ec.Candidate("tensorrt", "measured", timings=_rows((1, 2000), (64, 10_600)))
    assert ec.choose([inductor, close]) is close
    with pytest.raises(ValueError):
        ec.choose([ec.Candidate("inductor", "skipped", "no GPU")])
    assert timing_batches((32, 64), 128) == [1, 32, 64, 128]


def test_recorded_tensorrt_counts_only_on_the_same_gpu_and_batches():
    sidecar = {"gpu": "NVIDIA H100 80GB HBM3", "tensorrt_version": "8.6.1", "precision": "fp16", "build_s": 134.3,
               "parity": {"max_abs": 0.004, "min_cosine": 0.99999, "top1_agreement": 1.0},
               "timings": _rows((1, 830), (8, 3000), (64, 7_300))}
    here = ec.recorded_tensorrt(sidecar, "NVIDIA H100 80GB HBM3", [1, 64])
    assert here.status == "measured" and [r["batch_size"] for r in here.timings] == [1, 64]
    assert here.best["throughput_img_per_s"] == 7_300 and here.build_s == 134.3
    other = ec.recorded_tensorrt(sidecar, "NVIDIA A10G", [1, 64])
    assert other.status == "skipped" and "built and timed on NVIDIA H100 80GB HBM3, not this host's NVIDIA A10G" \
        in other.reason
    assert "no timings at batch sizes [2, 4]" in ec.recorded_tensorrt(sidecar, sidecar["gpu"], [2, 4]).reason
    assert "has no timings" in ec.recorded_tensorrt({"gpu": "x"}, "x", [1]).reason
    assert ec.recorded_tensorrt({**sidecar, "parity": {}}, sidecar["gpu"], [1]).status == "failed"
    table = ec.markdown_table([here, other])
    assert "| tensorrt | measured | 1.20 | 7,300 (64) | 134 | 0.004 | 1.000 |" in table


def test_auto_without_a_gpu_serves_onnxruntime_and_says_why(local_repo):
    manifest = read_manifest(local_repo)
    engine = manifest["engine"]
    assert engine["requested"] == "auto" and engine["chosen"] == "onnxruntime" and engine["gpu"] is None
    assert engine["reason"].startswith("no GPU on the build host")
    assert manifest["model_versions"][-1]["engine"] == "onnxruntime"
    readme = (local_repo / "README.md").read_text()
    assert "Asked for `auto`; serving `onnxruntime`: no GPU on the build host" in readme
    assert "| onnxruntime | **served** |" in readme and "| onnxruntime_vs_pytorch |" in readme
    assert "README.md" in manifest["files"]


def test_settings_refuse_mismatched_engine_options(tmp_path):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"x")
    with pytest.raises(BuilderError, match="engine: onnxruntime and a TensorRT plan were both given"):
        s.RepoSettings(engine="onnxruntime", plan=str(plan))
    assert s.RepoSettings(engine="auto", plan=str(plan)).plan == str(plan)  # the plan competes


def test_inductor_build_gates_and_times_in_a_fresh_process(tmp_path, tiny_model):
    from builder.engines import inductor
    from builder.core.imaging import PreprocessParams
    from builder.core.photos import photo_batch

    contract = Contract("tiny", (224, 224), tiny_model.num_classes)
    program = inductor.export_program(tiny_model, contract, tmp_path / inductor.FILE, 8)
    (tmp_path / inductor.SIDECAR).write_text(json.dumps({"environment": inductor.environment()}))
    photos = photo_batch(PreprocessParams.from_timm(tiny_model.data_config))
    with torch.no_grad():
        reference = tiny_model.module(torch.from_numpy(photos)).numpy()
    params = {"precision": "fp16", "compile": "none", "batch_buckets": "1,4,8", "input_dims": "3,224,224"}
    built = inductor.build_inductor(tmp_path, params, 8, [1, 8], photos, reference, s.Parity(1e-4, 0.9999))
    assert built["device"] == "cpu" and built["start_from_scratch_s"] is None  # nothing to compile eager
    assert built["parity_served"]["max_abs"] < 1e-4 and built["parity_served"]["rows"] == len(photos) == 12
    assert [r["batch_size"] for r in built["timings"]] == [1, 8]
    for row in built["timings"]:  # timed for real: several calls, throughput from their mean latency
        assert row["iterations"] >= 3 and row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
        assert row["throughput_img_per_s"] == pytest.approx(row["batch_size"] * 1000 / row["latency_mean_ms"])
    assert program.is_file()
    # The gate refuses what misses its thresholds (here: impossible ones), naming the engine.
    with pytest.raises(BuilderError, match="TorchInductor fp16 engine fails parity with PyTorch FP32"):
        inductor.build_inductor(tmp_path, params, 8, [1], photos, reference + 1.0, s.Parity(1e-4, 0.9999))


def test_trt_timing_batches_come_from_the_triton_config(tmp_path):
    from builder.engines.trt import PlanOptions, batches_from_config

    (tmp_path / "c.pbtxt").write_text("max_batch_size: 128\ndynamic_batching {\n  preferred_batch_size: 32\n"
                                      "  preferred_batch_size: 64\n}\n")
    assert batches_from_config(str(tmp_path / "c.pbtxt")) == (1, 32, 64, 128)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"x")
    with pytest.raises(BuilderError, match="timing_batches"):
        PlanOptions(onnx=str(onnx), plan=str(tmp_path / "p.plan"), max_batch=8, timing_batches=(1, 16))
