"""Triton configs as ModelConfig messages: the written text, and the proto3 traps."""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from builder.repository import configs
from builder import settings as s
from builder.core.contract import Contract
from builder.errors import BuilderError

CONTRACT = Contract("swin", (224, 224), 1000)
POLICY = s.VersionPolicy()


def test_classifier_config_text():
    batching = s.Batching(64, (16, 32, 64), 500)
    text = configs.to_text(configs.onnx_classifier(CONTRACT, batching, s.InstanceGroup("KIND_GPU", 2, (0, 1)), POLICY))
    assert 'name: "swin_classifier"' in text
    assert 'platform: "onnxruntime_onnx"' in text
    assert "max_batch_size: 64" in text
    assert "preferred_batch_size: 16" in text and "preferred_batch_size: 64" in text
    assert "max_queue_delay_microseconds: 500" in text
    assert "count: 2" in text and "kind: KIND_GPU" in text and "gpus: 0" in text and "gpus: 1" in text
    assert 'name: "input"' in text and "dims: 3\n  dims: 224\n  dims: 224" in text
    assert 'name: "logits"' in text and "dims: 1000" in text and 'label_filename: "labels.txt"' in text


def test_ensemble_has_scheduling_and_no_dynamic_batching():
    config = configs.ensemble(CONTRACT, 32, POLICY)
    text = configs.to_text(config)
    assert "ensemble_scheduling" in text and "dynamic_batching" not in text
    assert text.count("step {") == 3
    # dynamic_batching and ensemble_scheduling share a oneof: setting one erases the other.
    config.dynamic_batching.SetInParent()
    assert not config.HasField("ensemble_scheduling")


def test_max_batch_size_zero_is_refused_not_silently_dropped():
    # proto3 drops a zero max_batch_size from the text, which would change the model's shape contract.
    assert "max_batch_size" not in configs.to_text(configs.ModelConfig(name="x", max_batch_size=0))
    with pytest.raises(BuilderError, match="max_batch_size"):
        s.Batching(0)


def test_text_round_trips_and_typos_fail(tmp_path):
    config = configs.python_model("pre", [CONTRACT.image], [CONTRACT.pixels], s.Batching(8), s.InstanceGroup("KIND_CPU"),
                                  s.VersionPolicy("specific", versions=(1, 3)), {"crop_mode": "center"})
    configs.write(config, tmp_path)
    assert configs.read(tmp_path / "config.pbtxt") == config
    text = (tmp_path / "config.pbtxt").read_text()
    assert 'key: "crop_mode"' in text and "specific {\n    versions: 1\n    versions: 3" in text
    (tmp_path / "config.pbtxt").write_text(text.replace("max_batch_size", "max_bacth_size"))
    with pytest.raises(text_format.ParseError, match="max_bacth_size"):
        configs.read(tmp_path / "config.pbtxt")


@pytest.mark.parametrize("make,field", [
    (lambda: s.Batching(8, (16,)), "preferred_batch_sizes"),
    (lambda: s.Batching(8, (), -1), "max_queue_delay_us"),
    (lambda: s.InstanceGroup("KIND_TPU"), "instance kind"),
    (lambda: s.InstanceGroup("KIND_CPU", 1, (0,)), "instance gpus"),
    (lambda: s.RepoSettings(flavor="cloud"), "flavor"),
    (lambda: s.RepoSettings(opset=13), "opset"),
    (lambda: s.RepoSettings(name="a b"), "name"),
    (lambda: s.ModelSource(model_kwargs="{bad"), "model_kwargs"),
    (lambda: s.ModelSource(checkpoint="/nonexistent.pt"), "checkpoint"),
    (lambda: s.Parity(batch=1), "parity batch"),
    (lambda: s.VersionPolicy.parse("specific:"), "version_policy"),
])
def test_settings_errors_name_the_field(make, field):
    with pytest.raises(BuilderError, match=field):
        make()


def test_version_policy_parse():
    assert s.VersionPolicy.parse("latest:2") == s.VersionPolicy("latest", 2)
    assert s.VersionPolicy.parse("all").kind == "all"
    assert s.VersionPolicy.parse("specific:1,2").versions == (1, 2)
