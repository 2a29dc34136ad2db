"""The `draft` preprocessing: large JPEGs decoded at a reduced DCT scale, gated against the exact path, served."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from builder import settings as s
from builder.compare import compare_logits
from builder.errors import BuilderError
from builder.repository import configs
from builder.core.photos import PHOTOS
from builder.repository.preprocess_gate import preprocess_parity
from builder.core import imaging
from builder.core.manifest import read_manifest
from builder.repository.writer import build_repository
from conftest import MAX_BATCH, free_ports, tiny_settings

LARGE = PHOTOS / "astronaut_2048x1536.jpg"


@pytest.fixture(scope="module")
def drafted(params):
    return dataclasses.replace(params, jpeg_draft=True)


def _rotated_large_jpeg() -> bytes:
    """A 1536x2048 upload stored sideways with EXIF orientation 6, as phones write them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(LARGE).transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def test_draft_decodes_large_jpegs_small_and_leaves_the_rest_exact(params, drafted):
    large = LARGE.read_bytes()
    assert imaging.decode(large, params).size == (2048, 1536)
    assert imaging.decode(large, drafted).size == (512, 384)  # 1/4: the smallest scale still covering 248
    rotated = _rotated_large_jpeg()
    assert imaging.decode(rotated, drafted).size == (512, 384)  # upright after the drafted decode
    for data in (large, rotated):
        exact, fast = imaging.preprocess(data, params).ravel(), imaging.preprocess(data, drafted).ravel()
        cosine = float(exact @ fast / np.linalg.norm(exact) / np.linalg.norm(fast))
        assert cosine > 0.9998 and 0 < np.abs(exact - fast).max() < 0.5
    # Nothing to gain below twice the resize size, and no other format: bit-identical to the exact path.
    for name in ("coffee_640x480.jpg", "astronaut_progressive.jpg", "rocket_cmyk.jpg", "chelsea.png"):
        data = (PHOTOS / name).read_bytes()
        assert np.array_equal(imaging.preprocess(data, params), imaging.preprocess(data, drafted)), name
    # Refusals are the exact path's, before any pixel is decoded.
    small_limit = dataclasses.replace(drafted, max_pixels=1_000_000)
    with pytest.raises(imaging.ImageError, match="above the limit of 1000000"):
        imaging.decode(large, small_limit)
    with pytest.raises(imaging.ImageError, match="corrupt or truncated"):
        imaging.decode(large[:4000], drafted)


def test_draft_travels_in_the_config_parameters(params, drafted):
    assert drafted.to_parameters()["jpeg_draft"] == "True" and params.to_parameters()["jpeg_draft"] == "False"
    assert imaging.PreprocessParams.from_parameters(drafted.to_parameters()) == drafted
    older = {k: v for k, v in params.to_parameters().items() if k != "jpeg_draft"}  # a repository built before it
    assert imaging.PreprocessParams.from_parameters(older) == params
    with pytest.raises(ValueError, match="parameter jpeg_draft is 'yes'; set it to True or False"):
        imaging.PreprocessParams.from_parameters({**older, "jpeg_draft": "yes"})


def test_draft_parity_gate_figures_and_refusal(params, tiny_model):
    figures = preprocess_parity(tiny_model.module, params, s.Parity(max_abs=0.5, min_cosine=0.999, min_top1=0.9),
                                "draft")
    # The 2048x1536 photo at 1/4 and the 512x512 grayscale one at 1/2; the other ten are decoded exactly.
    assert figures["images"] == 12 and figures["decoded_at_reduced_scale"] == 2
    assert figures["min_cosine"] > 0.999 and figures["top1_agreement"] == 1.0 and figures["tensor_max_abs"] > 0
    with pytest.raises(BuilderError, match="the draft preprocessing fails parity with the exact one"):
        preprocess_parity(tiny_model.module, params, s.Parity(max_abs=1e-9, min_cosine=0.5, min_top1=0.0), "draft")
    with pytest.raises(ValueError, match="the gated preprocessings are gpu and draft"):
        preprocess_parity(tiny_model.module, params, s.Parity(), "exact")


@pytest.fixture(scope="module")
def draft_repo(tmp_path_factory):
    return build_repository(tiny_settings(tmp_path_factory.mktemp("draft") / "repo", preprocess="draft"))


def test_draft_repository_records_its_gate_and_parameters(draft_repo):
    manifest = read_manifest(draft_repo)
    gate = manifest["parity"]["draft_preprocess_vs_exact"]
    assert gate["decoded_at_reduced_scale"] == 2 and gate["top1_agreement"] == 1.0
    assert manifest["model_versions"][0]["preprocess"] == "draft" and manifest["preprocess"]["jpeg_draft"] == "True"
    pre = configs.read(draft_repo / "swin_tiny_patch4_window7_224_preprocess" / "config.pbtxt")
    assert pre.parameters["jpeg_draft"].string_value == "True"
    assert "preprocess" not in pre.parameters  # the CPU model: no torch in the stub
    assert "draft preprocessing" in (draft_repo / "README.md").read_text()


def test_check_refuses_a_mistyped_draft_flag(draft_repo, tmp_path):
    """A typo would silently serve the exact path; `builder check` names it instead."""
    import shutil

    from builder.repository.check import check_repository

    copy = tmp_path / "repo"
    shutil.copytree(draft_repo, copy)
    model_dir = copy / "swin_tiny_patch4_window7_224_preprocess"
    config = configs.read(model_dir / "config.pbtxt")
    config.parameters["jpeg_draft"].string_value = "on"
    configs.write(config, model_dir)
    assert check_repository(copy) == ["swin_tiny_patch4_window7_224_preprocess: its preprocessing parameters do "
                                      "not load: parameter jpeg_draft is 'on'; set it to True or False"]


@pytest.mark.server
def test_served_draft_matches_its_gate_and_the_bare_client(draft_repo, drafted, tmp_path):
    """The server decodes drafted (logits = ONNX Runtime on drafted pixels); the bare client reads the same setting."""
    import onnxruntime as ort

    from builder.serving.server import LocalServer, ServerSettings
    from clients import Classifier, ClientSettings

    uploads = [LARGE.read_bytes(), _rotated_large_jpeg(), (PHOTOS / "coffee_640x480.jpg").read_bytes()]
    http, grpc, metrics = free_ports(3)
    with LocalServer(ServerSettings(str(draft_repo), http, grpc, metrics, workdir=str(tmp_path / "srv"))) as server:
        settings = ClientSettings(url=server.grpc_url, model="swin_tiny_patch4_window7_224", max_batch=MAX_BATCH)
        with Classifier(settings) as client:
            served = client.classify(uploads + [b"\xff\xd8broken"], return_logits=True)
        with Classifier(dataclasses.replace(settings, mode="classifier")) as client:
            bare = client.classify(uploads, return_logits=True)
    assert [r.ok for r in served] == [True, True, True, False]
    session = ort.InferenceSession(str(draft_repo / "swin_tiny_patch4_window7_224_classifier" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": np.stack([imaging.preprocess(u, drafted) for u in uploads])})[0]
    got = np.stack([r.logits for r in served[:3]])
    assert compare_logits(expected, got)["max_abs"] < 1e-4
    assert compare_logits(expected, np.stack([r.logits for r in bare]))["max_abs"] < 1e-4
