"""Production safety on the real server: bounded queues fail fast, model control needs the admin key."""

from __future__ import annotations

import dataclasses

import pytest

from builder.repository import configs
from builder import settings as s
from builder.serving.server import LocalServer, ServerSettings, admin_headers
from clients import Classifier, ClientSettings
from conftest import MAX_BATCH, bounded_server, flood, free_ports



def _server(repo, workdir, **kwargs) -> LocalServer:
    http, grpc, metrics = free_ports(3)
    return LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(workdir), **kwargs))


def test_queue_policy_is_written():
    config = configs.python_model("m", [], [], s.Batching(8, (), 100, max_queue_size=4, queue_timeout_us=50_000,
                                                          priority_levels=2), s.InstanceGroup("KIND_CPU"),
                                  s.VersionPolicy())
    text = configs.to_text(config)
    # REJECT is the enum's zero: proto3 leaves it out of the text, and Triton reads the default back.
    assert "DELAY" not in text
    policy = configs.read_text(text).dynamic_batching.default_queue_policy
    assert policy.timeout_action == configs.mc.ModelQueuePolicy.TimeoutAction.REJECT
    for line in ("default_timeout_microseconds: 50000", "allow_timeout_override: true",
                 "max_queue_size: 4", "priority_levels: 2", "default_priority_level: 2"):
        assert line in text, text
    plain = configs.to_text(configs.python_model("m", [], [], s.Batching(8, max_queue_size=0),
                                                 s.InstanceGroup("KIND_CPU"), s.VersionPolicy()))
    assert "default_queue_policy" not in plain and "priority" not in plain
    bounded = configs.to_text(configs.python_model("m", [], [], s.Batching(8), s.InstanceGroup("KIND_CPU"),
                                                   s.VersionPolicy()))
    assert "max_queue_size: 256" in bounded  # the default: overload fails fast
    with pytest.raises(s.BuilderError, match="max_queue_size: is negative"):
        s.Batching(8, max_queue_size=-1)


@pytest.mark.server
def test_flood_past_the_queue_bound_fails_fast_then_drains(tmp_path, photos):
    with bounded_server(tmp_path, queue=2) as server:
        settings = ClientSettings(url=server.grpc_url, model="swin_tiny_patch4_window7_224", retries=0,
                                  overload_retries=0, max_batch=MAX_BATCH, concurrency=1, timeout_s=120)
        # Without resubmissions: rejected requests come back at once, each of their images marked alone.
        outcomes = flood(settings, photos)
        kinds = [k for k, _ in outcomes]
        assert kinds.count("overloaded") >= 10 and kinds.count("ok") >= 2, kinds
        slowest_ok = max(t for k, t in outcomes if k == "ok")
        rejected = sorted(t for k, t in outcomes if k == "overloaded")
        assert rejected[len(rejected) // 2] < slowest_ok  # rejections come back without waiting their turn
        assert server.is_ready()
        # With the default backoff and resubmission, the same flood drains: every image is classified.
        drained = flood(dataclasses.replace(settings, overload_retries=12, backoff_s=0.1), photos)
        assert [k for k, _ in drained].count("ok") == len(drained), drained


@pytest.mark.server
def test_one_rejection_does_not_end_a_run(tmp_path, photos):
    """A run of many requests keeps every answered image; only rejected ones are marked, none raise."""
    with bounded_server(tmp_path, queue=1) as server:
        settings = ClientSettings(url=server.grpc_url, model="swin_tiny_patch4_window7_224", retries=0,
                                  overload_retries=0, max_batch=1, concurrency=16, timeout_s=120)
        images = [photos[i % len(photos)] for i in range(200)]
        with Classifier(settings) as client:
            results = client.classify(images)  # never raises for overload
        ok = [r for r in results if r.ok]
        bad = [r for r in results if not r.ok]
        assert len(results) == 200 and ok and bad, (len(ok), len(bad))
        assert all(r.error.startswith("rejected: server overloaded") for r in bad)
        assert all(r.predictions for r in ok)


@pytest.mark.server
def test_model_control_needs_the_admin_key(local_repo, tmp_path, photos, caplog):
    import logging

    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    name = "swin_tiny_patch4_window7_224_postprocess"
    caplog.set_level(logging.INFO, logger="builder")
    with _server(local_repo, tmp_path / "srv", model_control="explicit", admin_key="s3cret") as server:
        started = [r.getMessage() for r in caplog.records if "starting tritonserver" in r.getMessage()]
        assert started and "s3cret" not in started[0] and "triton-admin-key=<admin key>" in started[0]
        for protocol, client in (("http", httpclient.InferenceServerClient(server.http_url)),
                                 ("grpc", grpcclient.InferenceServerClient(server.grpc_url))):
            for call in (lambda h: client.load_model(name, headers=h), lambda h: client.unload_model(name, headers=h)):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call(None)
                with pytest.raises(InferenceServerException, match="restricted"):
                    call(admin_headers("wrong", protocol))
            client.load_model(name, headers=admin_headers("s3cret", protocol))
            assert client.is_model_ready(name)
            assert client.get_model_config(name)  # read-only config stays open for generic clients
        settings = ClientSettings(url=server.grpc_url, model="swin_tiny_patch4_window7_224")
        with Classifier(settings) as client:  # inference needs no key
            assert client.classify(photos[:1])[0].ok
