"""The fused window attention as an inductor engine variant (`--window-attention`): the settings, what the race
enters, and a repository built with it, checked and served by a real tritonserver on the CPU (where the op runs
timm's own math; the kernel itself is tested on Triton's interpreter, tests/engines/test_window_attention_kernel.py,
and on the GPU by `make test-gpu`)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from builder import settings as s
from builder.compare import compare_logits
from builder.core.manifest import read_manifest
from builder.engines import choice as ec
from builder.engines.race import raced_variants, variant_key
from builder.errors import BuilderError
from conftest import free_ports, tiny_settings


def test_window_attention_settings_name_the_fix():
    assert s.RepoSettings().window_attention == "auto" and s.RepoSettings().served_attention == "timm"
    assert s.RepoSettings(flavor="local", window_attention="fused").served_attention == "fused"
    with pytest.raises(BuilderError, match="window_attention: 'flash' is unknown; use one of auto, timm, fused"):
        s.RepoSettings(window_attention="flash")
    with pytest.raises(BuilderError, match="window_attention: fused runs in the local flavor's inductor engine"):
        s.RepoSettings(window_attention="fused")  # the container flavor's torch is older
    with pytest.raises(BuilderError, match="use --flavor local with --engine inductor or auto"):
        s.RepoSettings(flavor="local", engine="onnxruntime", window_attention="fused")


def test_the_race_enters_the_fused_program_at_fp16_and_static_fp8_and_every_precision_when_asked():
    every = {"fp16": None, "int8": None, "fp8": None, "fp8-static": None}  # what raced_precisions gives under auto
    timms = [("fp16", "timm"), ("int8", "timm"), ("fp8", "timm")]
    local = s.RepoSettings(flavor="local")
    assert raced_variants(local, every) == timms + [("fp16", "fused"), ("fp8-static", "fused")]
    fused = s.RepoSettings(flavor="local", window_attention="fused")
    assert raced_variants(fused, every) == [(p, "fused") for p in every]
    assert raced_variants(s.RepoSettings(flavor="local", window_attention="timm"), every) == timms
    assert raced_variants(s.RepoSettings(), every) == timms  # container: timm's only
    named = s.RepoSettings(flavor="local", engine="inductor", inductor_precision="fp8-static")
    assert raced_variants(named, {"fp8-static": None}) == [("fp8-static", "timm"), ("fp8-static", "fused")]
    listed = {"fp16": None, "fp8-static": None}  # perf/gpu/precisions.py's list: each with both attentions
    assert raced_variants(local, listed, listed=True) == [
        ("fp16", "timm"), ("fp8-static", "timm"), ("fp16", "fused"), ("fp8-static", "fused")]
    assert [variant_key(p, a) for p, a in raced_variants(local, every)] == [
        "fp16", "int8", "fp8", "fp16-fused", "fp8-static-fused"]
    row = ec.Candidate("inductor", "measured", precision="fp16", attention="fused")
    assert row.label == "inductor fp16 fused-attention" and row.to_dict()["attention"] == "fused"
    assert ec.Candidate("inductor", "measured", precision="fp16", attention="timm").label == "inductor fp16"


def test_a_model_the_kernel_does_not_take_fails_fused_by_name_in_one_line(tmp_path):
    """A head size the kernel does not take (here 24): `--window-attention fused` fails the build, naming the fix."""
    from builder.repository.writer import build_repository

    odd = s.ModelSource(s.DEFAULT_MODEL, model_kwargs='{"embed_dim": 24, "depths": [1, 1, 1, 1], '
                                                      '"num_heads": [1, 1, 1, 1]}', seed=0)
    with pytest.raises(BuilderError, match="window_attention: the fused window attention does not take this model: "
                                           "head size 24.*build with --window-attention timm"):
        build_repository(tiny_settings(tmp_path / "repo", source=odd, engine="inductor", torch_compile="none",
                                       window_attention="fused"))
    assert not (tmp_path / "repo").exists()  # nothing half-written


@pytest.mark.server
def test_a_fused_attention_repository_is_checked_served_and_gives_timms_answers(tmp_path, photos, timm_reference):
    from builder.repository.check import check_repository
    from builder.repository.writer import build_repository
    from builder.serving.server import LocalServer, ServerSettings
    from clients import Classifier, ClientSettings

    repo = build_repository(tiny_settings(tmp_path / "repo", engine="inductor", torch_compile="none",
                                          window_attention="fused"))
    version = repo / "swin_tiny_patch4_window7_224_classifier" / "1"
    config = (version.parent / "config.pbtxt").read_text()
    assert 'key: "window_attention"\n  value {\n    string_value: "fused"' in config
    assert (version / "window_attention.py").is_file() and check_repository(repo) == []
    with zipfile.ZipFile(version / "model.pt2") as stored:  # the op is in the served program, not timm's attention
        assert any(b"swin_triton.window_attention" in stored.read(n) for n in stored.namelist() if n.endswith(".json"))
    manifest = read_manifest(repo)
    assert manifest["parity"]["inductor_vs_pytorch"]["max_abs"] < 1e-4
    (row,) = manifest["engine"]["candidates"]
    assert row["attention"] == "fused" and row["chosen"]
    http, grpc, metrics = free_ports(3)
    with LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv"))):
        with Classifier(ClientSettings(url=f"127.0.0.1:{grpc}", model=manifest["contract"]["ensemble"])) as client:
            results = client.classify(photos[:4], return_logits=True)
    served = np.stack([r.logits for r in results])
    figures = compare_logits(timm_reference(photos[:4]), served)
    assert figures["max_abs"] < 1e-3 and figures["top1_agreement"] == 1.0, figures


def test_the_race_builds_gates_and_times_both_programs_and_serves_the_winners(tmp_path, tiny_model, params):
    """The race's own flow for the inductor variants, run here on the CPU as it runs on a GPU (no compile: the
    program as exported, in fresh processes): timm's program and the fused one each loaded, gated and timed; the
    winner's program, sidecar and gate are what is kept beside the ONNX file, the other's folder is removed."""
    import torch

    from builder.core.contract import Contract
    from builder.engines import inductor
    from builder.engines.race import _keep_winner, inductor_candidates

    settings = tiny_settings(tmp_path / "repo", engine="inductor", torch_compile="none", inductor_precision="fp16")
    contract = Contract(s.DEFAULT_MODEL, (224, 224), tiny_model.num_classes)
    rows, gates = inductor_candidates(settings, tiny_model, contract, params, tmp_path, "this host", [1, 4],
                                      strict=True)
    assert [(r.label, r.status) for r in rows] == [("inductor fp16", "measured"),
                                                   ("inductor fp16 fused-attention", "measured")]
    for row in rows:  # both against PyTorch FP32 on the bundled photos (CPU instances run FP32)
        assert row.parity["top1_agreement"] == 1.0 and row.parity["max_abs"] < 1e-3, row.parity
        assert [t["batch_size"] for t in row.timings] == [1, 4]
    assert gates["inductor_fused_vs_pytorch"]["max_abs"] < 1e-4
    fused = rows[1]
    _keep_winner(tmp_path, fused, gates)
    assert not (tmp_path / "precisions").exists() and not (tmp_path / "fused").exists()
    assert json.loads((tmp_path / inductor.SIDECAR).read_text())["window_attention"] == "fused"
    kept = torch.export.load(str(tmp_path / inductor.FILE))
    assert any("swin_triton" in str(n.target) for n in kept.graph.nodes)  # the fused program is the one kept
    assert gates["inductor_vs_pytorch"]["max_abs"] < 1e-4 and "inductor_fused_vs_pytorch" not in gates


def test_a_fused_program_the_kernel_cannot_take_is_a_row_not_a_failed_build(tmp_path, params):
    """A precision asked for by name fails the build if it fails; the fused program beside it under `auto` only
    fails its own row (here: a head size the kernel does not take), and timm's program is measured."""
    from builder.core.contract import Contract
    from builder.engines.race import inductor_candidates
    from builder.export.model import load_model

    odd = s.ModelSource(s.DEFAULT_MODEL, model_kwargs='{"embed_dim": 24, "depths": [1, 1, 1, 1], '
                                                      '"num_heads": [1, 1, 1, 1]}', seed=0)
    model = load_model(odd)
    settings = tiny_settings(tmp_path / "repo", source=odd, engine="inductor", torch_compile="none",
                             inductor_precision="fp16")
    rows, _ = inductor_candidates(settings, model, Contract(s.DEFAULT_MODEL, (224, 224), model.num_classes), params,
                                  tmp_path, "this host", [1], strict=True)
    assert [(r.label, r.status) for r in rows] == [("inductor fp16", "measured"),
                                                   ("inductor fp16 fused-attention", "skipped")]
    assert "head size 24" in rows[1].reason


def test_fused_by_name_builds_only_the_fused_program(tmp_path, tiny_model, params):
    """`--window-attention fused`: timm's program is neither exported nor gated (no variant would use it); the fused
    one is the served program from the start, gated under the served program's name."""
    import torch

    from builder.core.contract import Contract
    from builder.engines import inductor
    from builder.engines.race import _keep_winner, inductor_candidates

    settings = tiny_settings(tmp_path / "repo", engine="inductor", torch_compile="none", inductor_precision="fp16",
                             window_attention="fused")
    contract = Contract(s.DEFAULT_MODEL, (224, 224), tiny_model.num_classes)
    rows, gates = inductor_candidates(settings, tiny_model, contract, params, tmp_path, "this host", [1],
                                      strict=True)
    assert [(r.label, r.status) for r in rows] == [("inductor fp16 fused-attention", "measured")]
    assert gates["inductor_vs_pytorch"] == gates["inductor_fused_vs_pytorch"]
    _keep_winner(tmp_path, rows[0], gates)
    assert sorted(gates) == ["inductor_served_vs_pytorch", "inductor_vs_pytorch"]
    kept = torch.export.load(str(tmp_path / inductor.FILE))
    assert any("swin_triton" in str(n.target) for n in kept.graph.nodes)


def test_the_stored_fused_program_compiles_in_fp16_as_the_served_engine_converts_it(tmp_path, tiny_model):
    """The race exports the fused program in FP32 and the served engine converts it to FP16 before compiling: a cast
    to the activations' dtype inside the fused forward was stored as an FP32 assertion, which failed every
    TorchInductor compile of the fused program on an H100 (perf/results/h100-swin-speed). Here the same stored
    program, converted to FP16 and compiled with a dynamic batch (dynamo and AOT autograd, no code generation: the
    failure was in dynamo's tracing), on the CPU where the op runs timm's math."""
    import copy

    import torch

    from builder.core.contract import Contract
    from builder.engines import inductor, window_attention

    fused = copy.deepcopy(tiny_model)
    assert window_attention.fuse_window_attention(fused.module) > 0
    contract = Contract("tiny", (224, 224), tiny_model.num_classes)
    program = inductor.export_program(fused, contract, tmp_path / inductor.FILE, 8)
    module = torch.export.load(str(program)).module().to(torch.float16)
    compiled = torch.compile(module, dynamic=True, backend="aot_eager")
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 3, 224, 224), dtype=np.float32))
    with torch.inference_mode():
        got = compiled(x.half()).float().numpy()
        reference = tiny_model.module(x).numpy()
    figures = compare_logits(reference, got)
    assert figures["min_cosine"] > 0.999 and figures["top1_agreement"] == 1.0, figures


def test_the_fused_program_in_static_fp8_feeds_each_projection_from_the_kernel_and_compiles(tmp_path, tiny_model):
    """fp8-static on the stored fused program, as the served runner rewrites it: each block's output projection
    reads the attention op's FP8 form (its static scale applied as the kernel stores), the other Linear layers
    quantize their input themselves; the rewritten program compiles with a dynamic batch (dynamo and AOT autograd,
    on the CPU where the ops run timm's math, in FP32: the CPU engine's dtype) and keeps timm's answers."""
    import copy

    import torch

    from builder.core.contract import Contract
    from builder.core.imaging import PreprocessParams
    from builder.core.photos import photo_batch
    from builder.engines import inductor, static_fp8, window_attention
    from builder.engines.torch_runner import quantize_static_fp8

    photos = photo_batch(PreprocessParams.from_timm(tiny_model.data_config))[:8]
    amax = static_fp8.calibrate(tiny_model.module, photos)
    fused = copy.deepcopy(tiny_model)
    blocks = window_attention.fuse_window_attention(fused.module)
    contract = Contract("tiny", (224, 224), tiny_model.num_classes)
    module = torch.export.load(str(inductor.export_program(fused, contract, tmp_path / inductor.FILE, 8))).module()
    count, folded = quantize_static_fp8(module, amax)
    assert count == len(amax) and folded == blocks > 0
    compiled = torch.compile(module, dynamic=True, backend="aot_eager")
    with torch.inference_mode():
        for batch in (3, 8):
            got = compiled(torch.from_numpy(photos[:batch])).numpy()
            figures = compare_logits(tiny_model.module(torch.from_numpy(photos[:batch])).numpy(), got)
            assert figures["min_cosine"] > 0.99, figures
