"""Kubernetes manifests, checked offline: schemas, the pinned release, ports and probes, real metric names."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from builder import settings as s

K8S = Path(__file__).resolve().parents[2] / "docker" / "k8s"


def documents():
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind):
    return [d for d in documents() if d["kind"] == kind]


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.utils.latest_version()])
def test_manifests_validate_against_the_kubernetes_schema(version):
    docs = documents()
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap",
                                         "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def _container():
    (deployment,) = by_kind("Deployment")
    return deployment, deployment["spec"]["template"]["spec"]["containers"][0]


def test_image_is_the_pinned_release():
    _, container = _container()
    dockerfile = (K8S.parent / "Dockerfile.tritonserver").read_text()
    assert container["image"].endswith(f":{s.TRITON_RELEASE}")
    assert f"FROM nvcr.io/nvidia/tritonserver:{s.TRITON_RELEASE}-py3" in dockerfile


def test_ports_probes_and_shutdown_agree_with_server_flags():
    deployment, container = _container()
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": int(args["--http-port"]), "grpc": int(args["--grpc-port"]),
                     "metrics": int(args["--metrics-port"])}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
    # Drain: the endpoints go first (preStop), then tritonserver gets --exit-timeout-secs for in-flight work.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop + int(args["--exit-timeout-secs"]) < template["spec"]["terminationGracePeriodSeconds"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/models"] == "models" and args["--model-repository"] == "/models"
    for service in by_kind("Service"):
        for port in service["spec"]["ports"]:
            assert port["port"] == ports[port["targetPort"]]
    headless = [sv for sv in by_kind("Service") if sv["spec"].get("clusterIP") == "None"]
    assert headless and headless[0]["spec"]["ports"][0]["name"] == "grpc"


@pytest.mark.server
def test_hpa_metric_comes_from_the_adapter_rule_over_the_recorded_queue_time(server, contract, photos):
    """The autoscaler reads the classifier's queue time as the generated recording rule computes it (the expression
    is written once), its target is the alert's queue budget, and the rule reads what tritonserver 2.51 exports."""
    from builder.repository import monitoring as M

    (hpa,) = by_kind("HorizontalPodAutoscaler")
    (adapter,) = by_kind("ConfigMap")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]
    assert rule["name"]["as"] == metric["name"] == M.HPA_METRIC
    assert rule["seriesQuery"].startswith(M.QUEUE_US + "{") and rule["name"]["matches"] == M.QUEUE_US
    assert f'model="{s.DEFAULT_MODEL}_classifier"' in rule["seriesQuery"] and "nv_" not in rule["metricsQuery"]
    target = hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    assert float(target) == M.MonitoringSettings().queue_budget_ms * 1000
    (queue_rule,) = [r for r in M.recording_rules("1m") if r["record"] == M.QUEUE_US]
    used = set(re.findall(r"\b(nv_[a-z_]+)\[", queue_rule["expr"]))
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    # Those names are what tritonserver 2.51 really exports, once a request was served.
    from clients import Classifier, ClientSettings

    with Classifier(ClientSettings(url=server.grpc_url, model=contract.ensemble)) as client:
        assert client.classify(photos[:1])[0].ok
    with urllib.request.urlopen(f"http://localhost:{server.settings.metrics_port}/metrics", timeout=10) as reply:
        exported = set(re.findall(r"^(nv_[a-z_]+)\{", reply.read().decode(), flags=re.M))
    assert used <= exported, used - exported


def test_model_control_is_locked_like_make_serve():
    from builder.serving.server import ADMIN_HEADER, ADMIN_KEY_ENV, RESTRICTED

    _, container = _container()
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--"))
    expected = f"{','.join(RESTRICTED)}:{ADMIN_HEADER}=$({ADMIN_KEY_ENV})"
    assert args["--http-restricted-api"] == expected and args["--grpc-restricted-protocol"] == expected
    env = {e["name"]: e for e in container["env"]}
    assert env[ADMIN_KEY_ENV]["valueFrom"]["secretKeyRef"]["key"] == "admin-key"  # from a Secret, not the file
