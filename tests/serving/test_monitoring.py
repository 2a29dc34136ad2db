"""The generated Prometheus rules and Grafana dashboard: promtool, the SDK's own model, and a real Prometheus that
scrapes a real tritonserver, read through its HTTP API and compared with Triton's own statistics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from builder.errors import BuilderError
from builder.repository import monitoring as M
from builder.repository.monitoring_files import monitoring_dir, render, write_monitoring
from conftest import free_ports

ROOT = Path(__file__).resolve().parents[2]

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    not (PROMTOOL and PROMETHEUS), reason="the Debian package prometheus is not installed (`make venv` installs it "
                                          "where apt-get runs as root)")
# The recorded series agree with Triton's statistics to this share. Prometheus extrapolates each counter's rate to
# the window's edges, by up to about one scrape interval of the 20 s window (5%), and less for a counter that would
# reach zero sooner; so the two rates of a ratio (time per request) may be stretched differently.
TOLERANCE = 0.08


def _promtool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


@needs_prometheus
def test_every_repository_gets_rules_and_a_config_that_promtool_passes(local_repo):
    from builder.core.manifest import read_manifest
    from builder.repository.monitoring_files import render

    folder = monitoring_dir(local_repo)
    written = render(read_manifest(local_repo)["contract"], M.MonitoringSettings())
    assert len(written) == 5 and all((folder / name).read_text() == text for name, text in written.items())
    assert (folder / M.MARKER).is_file()
    result = _promtool("check", "config", str(folder / "prometheus.yml"))  # checks the rule file it names too
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    result = _promtool("check", "rules", str(folder / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((folder / "rules.yml").read_text())["groups"]
    recorded = {r["record"] for group in rules for r in group["rules"] if "record" in r}
    alerts = {r["alert"] for group in rules for r in group["rules"] if "alert" in r}
    assert {M.REQUESTS, M.QUEUE_US, M.COMPUTE_US, M.BATCH, M.FAILURE_RATIO, M.GPU_UTILIZATION} <= recorded
    assert alerts == {"TritonQueueTimeHigh", "TritonRequestsFailing", "TritonDown", "TritonModelNotReady"}


def test_the_dashboard_is_grafanas_model_and_reads_only_recorded_series(local_repo):
    from grafana_foundation_sdk.models.dashboard import Dashboard

    folder = monitoring_dir(local_repo)
    doc = json.loads((folder / "grafana/dashboards/swin-triton.json").read_text())
    board = Dashboard.from_json(doc)  # the library's own model of Grafana's schema reads it back
    assert board.uid == "swin-triton" and board.title.startswith("Swin on Triton")
    recorded = {r["record"] for r in M.recording_rules("1m")}
    exprs = [t["expr"] for p in doc["panels"] if p["type"] == "timeseries" for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        assert any(series in expr for series in recorded) and "nv_" not in expr, expr
    titles = [p["title"] for p in doc["panels"]]
    assert "The photo path against the classifier" in titles and "Where a request's time goes" in titles


def test_monitoring_settings_and_folders_are_checked(tmp_path, local_repo):
    with pytest.raises(BuilderError, match="rate_window: 10s holds fewer than two scrapes"):
        M.MonitoringSettings(scrape_interval_s=15, rate_window="10s")
    with pytest.raises(BuilderError, match="target: 'metrics' is not host:port"):
        M.MonitoringSettings(target="metrics")
    with pytest.raises(BuilderError, match="alert_after: 'soon' is not a duration"):
        M.MonitoringSettings(alert_after="soon")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "prometheus.yml").write_text("mine\n")
    result = subprocess.run([sys.executable, "-m", "builder", "monitoring", "--repository", str(local_repo),
                             "--output", str(theirs)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "holds files this tool did not write" in result.stderr
    assert (theirs / "prometheus.yml").read_text() == "mine\n"  # nothing of theirs touched


@contextmanager
def _prometheus(folder: Path, data: Path):
    """A real Prometheus on the generated config; yields its base URL."""
    (port,) = free_ports(1)
    process = subprocess.Popen([PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
                                f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None and time.time() < deadline, process.stderr.read()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _query(url: str, expr: str, at: float = None) -> list:
    params = {"query": expr, **({"time": f"{at:.3f}"} if at else {})}
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode(params)}", timeout=10) as reply:
        doc = json.loads(reply.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def _value(url: str, expr: str, at: float = None) -> float:
    result = _query(url, expr, at)
    assert len(result) == 1, (expr, result)
    return float(result[0]["value"][1])


def _wait_for(what, deadline_s: float, every: float = 0.5):
    deadline = time.time() + deadline_s
    while True:
        found = what()
        if found or time.time() > deadline:
            return found
        time.sleep(every)


def _firing(url: str) -> set:
    with urllib.request.urlopen(f"{url}/api/v1/alerts", timeout=10) as reply:
        alerts = json.loads(reply.read())["data"]["alerts"]
    return {(a["labels"]["alertname"], a["labels"].get("model")) for a in alerts if a["state"] == "firing"}


@needs_prometheus
@pytest.mark.server
def test_a_real_prometheus_records_what_triton_counts_and_fires_on_overload(tmp_path, photos):
    """Prometheus scrapes a real tritonserver. Its recorded series for a known burst of requests agree with Triton's
    own statistics for the same requests; a flood against the bounded queue fires the failure and queue alerts; a
    model that is not served fires the not-ready alert, and served ones do not."""
    from perf.observe import model_statistics
    from clients import Classifier, ClientSettings
    from conftest import MAX_BATCH, bounded_server, flood

    window_s = 20
    with bounded_server(tmp_path, queue=2) as server:
        repo = tmp_path / "repo"
        contract = json.loads((repo / "manifest.json").read_text())["contract"]
        names = M.C.Contract.named(contract["ensemble"])
        # One model that is not served, for the not-ready alert.
        watched = dict(contract, models=list(contract["models"]) + ["not_served"])
        settings = M.MonitoringSettings(target=f"127.0.0.1:{server.settings.metrics_port}", scrape_interval_s=1,
                                        rate_window=f"{window_s}s", queue_budget_ms=0.001, alert_after="0s")
        folder = write_monitoring(tmp_path / "monitoring", render(watched, settings), settings)
        with _prometheus(folder, tmp_path / "tsdb") as url:
            assert _wait_for(lambda: _query(url, f'nv_inference_request_success{{model="{names.classifier}"}}'), 30)
            started = time.time()
            # The burst comes once Prometheus holds nearly a window of samples, so that the window it is read in
            # is covered from edge to edge (a rate is extrapolated to edges that have no samples).
            time.sleep(window_s - 4)
            before, at_before = model_statistics(server.grpc_url), time.time()
            client_settings = ClientSettings(url=server.grpc_url, model=names.ensemble, retries=0,
                                             overload_retries=0, max_batch=1, concurrency=1, timeout_s=120)
            with Classifier(client_settings) as client:
                results = client.classify(photos[:4] * 6)  # 24 requests of one image, one at a time
            assert all(r.ok for r in results)
            after, at_after = model_statistics(server.grpc_url), time.time()
            time.sleep(3)  # two scrapes and rule evaluations after the last request
            at = time.time()
            assert at - at_before < window_s - 2 and at - started > window_s, (at - at_before, at - started)
            _compare_with_triton(url, names, before, after, at_before, at_after, at, window_s)
            _every_dashboard_query_runs(url, folder)

            # Served models are loaded: only the one that is not fires TritonModelNotReady.
            not_ready = {m for alert, m in _firing(url) if alert == "TritonModelNotReady"}
            assert not_ready == {"not_served"}, not_ready
            overload = ClientSettings(url=server.grpc_url, model=names.ensemble, retries=0, overload_retries=0,
                                   max_batch=MAX_BATCH, concurrency=1, timeout_s=120)
            kinds = [kind for kind, _ in flood(overload, photos)]
            assert "overloaded" in kinds, kinds
            firing = _wait_for(lambda: {a for a in _firing(url) if a[0] == "TritonRequestsFailing"}, 20)
            assert firing, _firing(url)
            # Every rejected client shows in the failure counters once scraped (Triton 2.51 counts a request that
            # a composing model's full queue rejected against the ensemble, reason OTHER).
            def failed():
                return sum(float(f["value"][1]) for f in _query(url, "sum(nv_inference_request_failure)"))

            assert _wait_for(lambda: failed() >= kinds.count("overloaded"), 10), (failed(), kinds)
            assert ("TritonQueueTimeHigh", names.classifier) in _firing(url)


def _compare_with_triton(url, names, before, after, at_before, at_after, at, window_s):
    for model in (names.ensemble, names.classifier):
        old, new = before.get(model, {}), after[model]

        def delta(*path):
            value_new, value_old = new, old
            for key in path:
                value_new, value_old = value_new.get(key, {}), value_old.get(key, {})
            return int(value_new or 0) - int(value_old or 0)

        requests = delta("inference_stats", "success", "count")
        assert requests == 24 or model == names.classifier and requests >= 24
        # The scraped counter moved by exactly what Triton counted (its value before the burst, and after).
        counted = (_value(url, f'sum(nv_inference_request_success{{model="{model}"}})', at)
                   - _value(url, f'sum(nv_inference_request_success{{model="{model}"}})', at_before))
        assert counted == requests, (model, counted, requests)
        selector = f'{{model="{model}"}}'
        rate = _value(url, f"sum({M.REQUESTS}{selector})", at)
        assert rate * window_s == pytest.approx(requests, rel=TOLERANCE), (model, rate)
        images = delta("inference_count")
        executions = delta("execution_count")
        queue_us = delta("inference_stats", "queue", "ns") / requests / 1000
        compute_us = sum(delta("inference_stats", part, "ns") for part in
                         ("compute_input", "compute_infer", "compute_output")) / requests / 1000
        request_us = delta("inference_stats", "success", "ns") / requests / 1000
        recorded = {series: _value(url, f"sum({series}{selector})", at)
                    for series in (M.QUEUE_US, M.COMPUTE_US, M.REQUEST_US, M.BATCH)}
        # Triton's metrics count whole microseconds per request; its statistics nanoseconds.
        assert recorded[M.QUEUE_US] == pytest.approx(queue_us, rel=TOLERANCE, abs=requests), model
        assert recorded[M.COMPUTE_US] == pytest.approx(compute_us, rel=TOLERANCE, abs=3), model
        assert recorded[M.REQUEST_US] == pytest.approx(request_us, rel=TOLERANCE, abs=3), model
        assert recorded[M.BATCH] == pytest.approx(images / executions, rel=TOLERANCE), model
        ratio = _query(url, f"{M.FAILURE_RATIO}{selector}", at)
        assert not ratio or float(ratio[0]["value"][1]) == 0.0  # none failed


def _every_dashboard_query_runs(url, folder):
    doc = json.loads((folder / "grafana/dashboards/swin-triton.json").read_text())
    answered = 0
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            answered += bool(_query(url, target["expr"]))  # each parses and runs; most have data here
    assert answered >= 8, answered


@pytest.mark.server
def test_the_metrics_port_exports_what_serve_is_told(local_repo, tmp_path, photos):
    """`builder serve --metrics summaries` adds latency quantiles to the counters the rules read; `off` closes the
    port."""
    from builder.core.contract import Contract
    from builder.core.manifest import read_manifest
    from builder.serving.server import LocalServer, ServerSettings
    from clients import Classifier, ClientSettings

    ensemble = Contract.named(read_manifest(local_repo)["contract"]["ensemble"]).ensemble
    for metrics in ("summaries", "off"):
        http, grpc, port = free_ports(3)
        settings = ServerSettings(str(local_repo), http, grpc, port, workdir=str(tmp_path / metrics), metrics=metrics)
        with LocalServer(settings) as server:
            with Classifier(ClientSettings(url=server.grpc_url, model=ensemble)) as client:
                assert client.classify(photos[:1])[0].ok
            url = f"http://127.0.0.1:{port}/metrics"
            if metrics == "off":
                with pytest.raises(OSError):
                    urllib.request.urlopen(url, timeout=5)
                continue
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            assert f'nv_inference_request_summary_us{{model="{ensemble}",' in text and "quantile=" in text
            assert "nv_inference_request_success{" in text
    with pytest.raises(BuilderError, match="metrics: 'some' is unknown; use one of off, counters, summaries"):
        ServerSettings(metrics="some")
