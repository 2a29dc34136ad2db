"""perf_analyzer sweeps, reports, comparison, the tuner and the bare benchmark, against the real local server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from builder.repository import configs
from builder.repository.check import check_repository
from builder.serving.server import LocalServer, ServerSettings
from conftest import free_ports
from perf import report
from perf.observe import stage_times
from perf.sweep import SweepSettings, run_sweep, sweep_payload
from perf.tune import candidates, tune

# Short windows and a loose stability bound: this checks the machinery, not the numbers (2 shared CPU cores).
QUICK = dict(measurement_interval_ms=500, stability_percent=99, max_trials=4)


def sweep_settings(server, contract, photo_paths, **kwargs) -> SweepSettings:
    values = dict(name=contract.ensemble, http_url=server.http_url, grpc_url=server.grpc_url,
                  images=tuple(str(p) for p in photo_paths[:4]), **QUICK)
    values.update(kwargs)
    return SweepSettings(**values)



@pytest.mark.server
def test_request_count_rows_carry_the_tail(server, contract, photo_paths, tmp_path):
    """--request-count: one measurement over N requests, each request's latency from the profile export."""
    from builder.errors import BuilderError

    settings = sweep_settings(server, contract, photo_paths, models=("ensemble",), concurrency=(1,),
                              request_count=60)
    rows = run_sweep(settings)
    row = rows[0]
    assert "error" not in row, row
    assert "--request-count 60" in row["command"] and row["requests"] >= 60
    assert row["latency_max_ms"] >= row["latency_p999_ms"] >= row["latency_p50_us"] / 1000 > 0
    assert row["slow_requests"] == len(row["slowest_ms"]) or row["slow_requests"] > 10
    # The start-up wave (one request per client context) apart from the steady load after it.
    assert row["startup_requests"] == 1 and row["startup_max_ms"] <= row["latency_max_ms"]
    assert row["steady_latency_max_ms"] <= row["latency_max_ms"]
    assert row["steady_slow_requests"] <= row["slow_requests"]
    assert row["steady_latency_quantiles_ms"]["100"] == pytest.approx(row["steady_latency_max_ms"], abs=1e-3)
    assert ("slow_sent_ms" in row) == (row["slow_requests"] > 0)
    # The host's TCP counters over the row: perf_analyzer opened its connection(s); none had to be retried here.
    assert row["tcp"]["ActiveOpens"] >= 1 and row["tcp"]["ListenOverflows"] == 0, row["tcp"]
    assert all(v >= 0 for v in row["tcp"].values()) and row["tcp_somaxconn"] > 0
    quantiles = row["latency_quantiles_ms"]
    assert quantiles["100"] == pytest.approx(row["latency_max_ms"], abs=1e-3) and quantiles["50"] <= quantiles["99"]
    png = report.plot_tails([sweep_payload(settings, rows, {"label": "one instance"})], tmp_path / "tails.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(BuilderError, match="run `perf sweep --request-count N`"):
        report.plot_tails([{"results": [{"model": "ensemble", "concurrency": 1}]}], tmp_path / "none.png")
    with pytest.raises(BuilderError, match="request_count: -1 is negative"):
        sweep_settings(server, contract, photo_paths, request_count=-1)


@pytest.mark.server
def test_sweep_report_and_compare(server, contract, photo_paths, tmp_path):
    first = sweep_settings(server, contract, photo_paths, models=("ensemble", "classifier"), concurrency=(1, 2))
    rows = run_sweep(first)
    assert len(rows) == 4 and all("error" not in r for r in rows), [r.get("error") for r in rows]
    for row in rows:
        assert row["latency_p99_us"] >= row["latency_p50_us"] > 0
        # Little's law ties perf_analyzer's throughput to its latency: requests in flight / time per request.
        little = row["concurrency"] * row["batch_size"] * 1e6 / row["latency_avg_us"]
        assert 0.5 * little <= row["throughput_img_per_s"] <= 2 * little, (row["throughput_img_per_s"], little)
        assert row["command"].startswith("perf_analyzer -m ")
        # Triton's own statistics (over gRPC) say where each request's time went, model by model.
        served = row["stages"][contract.classifier]
        assert served["requests"] > 0 and served["compute_infer_us"] > 0 and served["batch_avg"] >= 1
    second = sweep_settings(server, contract, photo_paths, models=("classifier",), protocols=("http",),
                            shared_memory=("system",), concurrency=(2,), batch_sizes=(2,))
    rows2 = run_sweep(second)
    assert "error" not in rows2[0], rows2
    doc1, doc2 = sweep_payload(first, rows), sweep_payload(second, rows2)
    assert doc1["environment"]["versions"]["tritonclient"] == "2.51.0" and doc1["environment"]["cpu"]

    text = report.markdown(doc1, {"results": [{"batch_size": 1, "throughput_img_per_s": 100.0}]})
    assert text.count("| ensemble |") == 2 and "efficiency" in text and "%" in text
    paths = report.plot(doc1, tmp_path / "report")
    assert [p.name for p in paths] == ["throughput_latency.png", "latency_breakdown.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in paths)
    # The same configuration measured twice compares; disjoint runs say so.
    doc3 = sweep_payload(first, run_sweep(sweep_settings(server, contract, photo_paths, models=("classifier",),
                                                         concurrency=(2,))))
    table = report.compare(doc1, doc3)
    assert "| classifier | grpc | none | 1 | 2 |" in table and "x |" in table
    with pytest.raises(Exception, match="share no configuration"):
        report.compare(doc1, doc2)


@pytest.mark.server
def test_sweep_reports_failures_per_row(server, contract, photo_paths):
    settings = sweep_settings(server, contract, photo_paths, name="no_such_model", models=("classifier",),
                              concurrency=(1,))
    (row,) = run_sweep(settings, progress=False)
    assert "error" in row and "throughput_img_per_s" not in row


@pytest.mark.server
def test_a_perf_analyzer_that_runs_past_its_time_is_a_failed_row(server, contract, photo_paths, monkeypatch):
    """A perf_analyzer that never ends (requests the server never answers) is stopped and its row failed, with
    what it printed; the sweep goes on to the next row instead of ending in a traceback."""
    import perf.sweep

    monkeypatch.setattr(perf.sweep, "analyzer_timeout_s", lambda settings: 0.3)  # a real run takes seconds
    settings = sweep_settings(server, contract, photo_paths, models=("classifier",), concurrency=(1, 2))
    rows = run_sweep(settings, progress=False)
    assert len(rows) == 2
    for row in rows:
        assert row["error"].startswith("perf_analyzer did not finish in 0 s and was stopped"), row
        assert "throughput_img_per_s" not in row and isinstance(row["analyzer_output"], list)


def test_a_perf_analyzer_left_with_only_its_main_thread_is_stopped_as_hung(monkeypatch):
    """perf_analyzer 2.51's request-count hang leaves one thread waiting forever: a process down to one thread
    for `LONE_THREAD_S` is stopped as hung in that time, not at the row's time limit; a process that keeps
    other threads (a perf_analyzer whose workers still run) is left to finish."""
    import perf.sweep

    monkeypatch.setattr(perf.sweep, "LONE_THREAD_S", 1.0)
    started = time.monotonic()
    returncode, _, hung = perf.sweep._run_analyzer(["sleep", "60"], dict(os.environ), timeout=60)
    assert returncode is None and hung and time.monotonic() - started < 10
    working = ("import threading, time; t = threading.Thread(target=time.sleep, args=(3,)); t.start(); t.join(); "
               "print(1)")
    returncode, printed, hung = perf.sweep._run_analyzer([sys.executable, "-c", working], dict(os.environ), 60)
    assert (returncode, printed.strip(), hung) == (0, "1", False)



def test_a_row_that_keeps_hanging_is_run_hung_runs_times_and_says_so(monkeypatch, tmp_path):
    """A hang is run again, up to `HUNG_RUNS` runs in all, each stop and rerun recorded in the row (no server:
    the row's server statistics are left empty)."""
    import perf.sweep

    monkeypatch.setattr(perf.sweep, "LONE_THREAD_S", 0.5)
    settings = SweepSettings(name="m", grpc_url="127.0.0.1:1", http_url="127.0.0.1:1", models=("classifier",))
    starts = tmp_path / "starts"
    cmd = ["sh", "-c", f"echo run >> {starts}; exec sleep 60"]
    row = {}
    returncode, _, hung = perf.sweep._measured_until_unhung(settings, cmd, dict(os.environ), row,
                                                            tmp_path / "run1.csv")
    assert returncode is None and hung
    assert starts.read_text().count("run") == perf.sweep.HUNG_RUNS == 3
    assert row["retried"].endswith("stopped and run again (2 of 2)"), row

@pytest.mark.server
def test_a_failed_point_gives_its_cause_a_non_zero_exit_and_a_table_row(server, contract, photo_paths, tmp_path):
    """perf_analyzer says only "failed to maintain the load"; the cause is what its threads were told."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "empty.jpg").write_bytes(b"")
    out = tmp_path / "sweep.json"
    cmd = [sys.executable, "-m", "perf", "sweep", "--name", contract.ensemble, "--http-url", server.http_url,
           "--grpc-url", server.grpc_url, "--images", str(photos), "--models", "ensemble,classifier",
           "--concurrency", "1", "--measurement-interval-ms", "400", "--stability-percent", "99",
           "--max-trials", "4", "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: 1 of 2 configuration(s) failed; the first: " in result.stderr and "empty input" in result.stderr
    failed, passed = json.loads(out.read_text())["results"]
    assert "empty input" in failed["error"] and "Failed to maintain" not in failed["error"]
    assert "error" not in passed
    rep = subprocess.run([sys.executable, "-m", "perf", "report", str(out), "--output", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    table = [line for line in rep.stdout.splitlines() if line.startswith("| ensemble") or line.startswith("| model")]
    assert table[0].count("|") == table[1].count("|") and "| failed [1] |" in table[1]
    assert "1 of 2 configuration(s) failed:" in rep.stdout and "1. " in rep.stdout


@pytest.mark.server
def test_sweep_cli_writes_results_and_report(server, contract, photo_paths, tmp_path):
    out = tmp_path / "sweep.json"
    photos_dir = tmp_path / "photos"
    photos_dir.mkdir()
    for path in photo_paths[:3]:
        shutil.copy(path, photos_dir / path.name)
    (photos_dir / "README.txt").write_text("not an image: skipped by suffix")
    cmd = [sys.executable, "-m", "perf", "sweep", "--name", contract.ensemble, "--http-url", server.http_url,
           "--grpc-url", server.grpc_url, "--images", str(photos_dir), "--concurrency", "1",
           "--measurement-interval-ms", "500", "--stability-percent", "99", "--max-trials", "4", "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[1/1] ensemble grpc" in result.stderr  # progress
    doc = json.loads(out.read_text())
    row = doc["results"][0]
    assert doc["kind"] == "sweep" and "error" not in row
    little = row["concurrency"] * row["batch_size"] * 1e6 / row["latency_avg_us"]
    assert 0.5 * little <= row["throughput_img_per_s"] <= 2 * little
    rep = subprocess.run([sys.executable, "-m", "perf", "report", str(out), "--output", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "r" / "report.md").is_file() and (tmp_path / "r" / "throughput_latency.png").is_file()


@pytest.mark.server
def test_tuner_reloads_live_and_writes_back(local_repo, contract, photo_paths, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(local_repo, repo)
    http, grpc, metrics = free_ports(3)
    server = LocalServer(ServerSettings(str(repo), http, grpc, metrics, workdir=str(tmp_path / "srv"),
                                        model_control="explicit")).start()
    try:
        sweep = SweepSettings(name=contract.ensemble, http_url=server.http_url, grpc_url=server.grpc_url,
                              models=("classifier",), concurrency=(2,), **QUICK)
        grid = candidates([1, 2], [500], [(), (4,)], [8])
        result = tune(str(repo), sweep, contract.classifier, grid, p99_budget_ms=10_000, write=True)
        assert len(result["results"]) == 4 and all("throughput_img_per_s" in r for r in result["results"])
        best = result["best"]
        assert best == max(result["results"], key=lambda r: r["throughput_img_per_s"])
        written = configs.read(repo / contract.classifier / "config.pbtxt")
        assert written.instance_group[0].count == best["instance_count"]
        assert list(written.dynamic_batching.preferred_batch_size) == best["preferred_batch_sizes"]
        assert check_repository(repo) == []
        assert server.is_ready()  # never restarted
        import tritonclient.http as httpclient

        from perf.tune import served_settings

        client = httpclient.InferenceServerClient(server.http_url)
        # The live server serves the winner that was written, not the last candidate measured.
        assert served_settings(client.get_model_config(contract.classifier)) == served_settings(written)
        none = tune(str(repo), sweep, contract.classifier, grid[-1:], p99_budget_ms=0.001)
        assert none["best"] is None  # nothing meets an impossible budget
        from builder.errors import BuilderError

        for budget in (-5, 0, float("nan")):  # refused before the search, the server untouched
            with pytest.raises(BuilderError, match="p99_budget_ms: .* is a budget no candidate can meet"):
                tune(str(repo), sweep, contract.classifier, grid, p99_budget_ms=budget)
        # Another repository than the server runs: refused before its config is pushed into the server.
        other = tmp_path / "other"
        shutil.copytree(repo, other)
        edited = configs.read(other / contract.classifier / "config.pbtxt")
        edited.parameters["threads"].string_value = "3"
        configs.write(edited, other / contract.classifier)
        with pytest.raises(BuilderError, match=f"serves another {contract.classifier} than .* holds \\(parameters"):
            tune(str(other), sweep, contract.classifier, grid, p99_budget_ms=100)
        # Without a winner (or without --write) the server is back on the repository's own config.
        assert served_settings(client.get_model_config(contract.classifier)) == served_settings(written)
        _interrupted_tune_keeps_what_it_measured(repo, server, contract, tmp_path / "tune.json")
        assert served_settings(client.get_model_config(contract.classifier)) == served_settings(written)
    finally:
        server.stop()


def _interrupted_tune_keeps_what_it_measured(repo, server, contract, out):
    """SIGTERM after the first candidate: the measured one is written (marked interrupted), exit 130."""
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "perf", "tune", "--repository", str(repo), "--name", contract.ensemble,
         "--http-url", server.http_url, "--grpc-url", server.grpc_url, "--models", "classifier",
         "--concurrency", "2", "--instance-counts", "1,2,3", "--queue-delays-us", "500", "--max-batch-sizes", "8",
         "--p99-budget-ms", "10000", "--measurement-interval-ms", "500", "--stability-percent", "99",
         "--max-trials", "4", "--server-workdir", str(server.workdir), "--output", str(out)],
        stderr=subprocess.PIPE, text=True)
    seen = ""
    for line in process.stderr:  # the progress log: one line per candidate measured
        seen += line
        if "[1/3]" in line:
            process.send_signal(signal.SIGTERM)
            break
    seen += process.stderr.read()
    assert process.wait(timeout=120) == 130, seen
    assert seen.strip().splitlines()[-1].startswith("interrupted"), seen
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True and doc["best"] is None
    assert 1 <= len(doc["results"]) <= 2 and doc["results"][0]["instance_count"] == 1


def test_bare_onnxruntime(local_repo, contract, tmp_path):
    out = tmp_path / "bare.json"
    onnx = local_repo / contract.classifier / "1" / "model.onnx"
    result = subprocess.run([sys.executable, "-m", "perf", "bare", "--engines", "onnxruntime", "--onnx", str(onnx),
                             "--batches", "1,4", "--iterations", "3", "--warmup", "1", "--output", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    for row in rows:  # three timed calls each, throughput from their mean latency
        assert row["engine"] == "onnxruntime" and row["iterations"] == 3
        assert row["throughput_img_per_s"] == pytest.approx(row["batch_size"] * 1000 / row["latency_mean_ms"])


def test_help_is_fast():
    """`--help` imports none of the heavy libraries: that keeps it instant."""
    from conftest import heavy_imports_of_help

    for command in ((), ("sweep",), ("tune",), ("report",)):
        assert heavy_imports_of_help("perf", *command) == [], command


def test_settings_errors_name_the_field(contract):
    from builder.errors import BuilderError

    with pytest.raises(BuilderError, match="images"):
        SweepSettings(name="x", models=("ensemble",))
    with pytest.raises(BuilderError, match="protocols"):
        SweepSettings(name="x", models=("classifier",), protocols=("ftp",))


@pytest.mark.server
def test_model_analyzer_config_points_at_this_server(local_repo, tmp_path):
    """What Model Analyzer needs to search configs against the server `perf analyze` starts (run: `make analyze`)."""
    from pathlib import Path

    from builder.errors import BuilderError
    from perf.analyze import SearchSettings, analyzer_config, analyzer_env

    ports = (18000, 18001, 18002)
    search = SearchSettings(min_concurrency=4, max_concurrency=64, min_batch=8, max_batch=8,
                            measurement_interval_ms=5000)
    config = analyzer_config(local_repo, ["swin_tiny_patch4_window7_224"], tmp_path,
                             [str(p) for p in sorted(Path("builder/parity_images").glob("*.jpg"))[:2]], search,
                             ports, gpu=False, composing=["pre", "cls", "post"])
    assert config["run_config_search_mode"] == "quick"  # an ensemble with its composing models
    assert (config["run_config_search_min_concurrency"], config["run_config_search_max_concurrency"]) == (4, 64)
    assert config["run_config_search_min_model_batch_size"] == config["run_config_search_max_model_batch_size"] == 8
    assert config["perf_analyzer_flags"]["measurement-interval"] == 5000
    with pytest.raises(BuilderError, match="concurrency: need 1 <= min"):
        SearchSettings(min_concurrency=32, max_concurrency=16)
    assert config["triton_launch_mode"] == "remote" and config["dcgm_disable"] is True
    assert config["triton_grpc_endpoint"] == "127.0.0.1:18001"
    assert config["triton_metrics_url"] == "http://127.0.0.1:18002/metrics"
    # No GPU: every candidate and composing model on the CPU.
    assert config["profile_models"] == {"swin_tiny_patch4_window7_224": {"cpu_only": True}}
    assert config["cpu_only_composing_models"] == ["pre", "cls", "post"]
    assert Path(config["perf_analyzer_flags"]["input-data"]).is_file()
    assert Path(config["perf_analyzer_path"]).is_file()
    libdirs = analyzer_env()["LD_LIBRARY_PATH"].split(":")
    assert any((Path(d) / "libcudart.so.12").exists() for d in libdirs)  # perf_analyzer 2.51 runs with this env
    gpu = analyzer_config(local_repo, ["m"], tmp_path, [], SearchSettings(), ports, gpu=True)
    assert gpu["run_config_search_mode"] == "brute"
    assert gpu["profile_models"] == {"m": {"cpu_only": False}} and "cpu_only_composing_models" not in gpu


@pytest.mark.server
def test_model_analyzer_terminated_leaves_nothing_running(local_repo, tmp_path):
    """SIGTERM (a kill, a CI timeout) of `perf analyze` takes down what the analyzer started, like Ctrl-C."""
    import signal

    marker = tmp_path / "started"
    analyzer = tmp_path / "model-analyzer"  # stands in for the analyzer process tree: it starts a child and waits
    analyzer.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {marker}\nwait\n")
    analyzer.chmod(0o755)
    process = subprocess.Popen([sys.executable, "-m", "perf", "analyze", "--repository", str(local_repo),
                                "--analyzer", str(analyzer), "--output", str(tmp_path / "out")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not marker.exists() or not marker.read_text().strip():
        assert time.time() < deadline and process.poll() is None, process.stdout.read()
        time.sleep(0.2)
    child = int(marker.read_text())
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    assert _gone(child), "the analyzer's child outlived perf analyze"


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """The process has exited (or is a zombie waiting for its reaper)."""
    from pathlib import Path

    deadline = time.time() + wait_s
    while time.time() < deadline:
        stat = Path(f"/proc/{pid}/stat")
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.server
def test_scaling_serves_each_count_and_measures_the_host_cpu(local_repo, contract, photo_paths, tmp_path):
    """`perf scaling` for real on this host: a fresh server per count (here the CPU alone, count 0: CI has no
    GPU), perf_analyzer at the same images per request, the host CPU's load, the table and the PNG."""
    from conftest import one_line_error, run_module

    output = tmp_path / "scaling.json"
    result = run_module("perf", "scaling", "--repository", str(local_repo), "--name", contract.ensemble,
                        "--gpu-counts", "0", "--batch-size", "2", "--concurrency-per-gpu", "2",
                        "--measurement-interval-ms", "1500", "--stability-percent", "99", "--max-trials", "4",
                        "--images", ",".join(str(p) for p in photo_paths[:4]),
                        "--workdir", str(tmp_path / "w"), "--output", str(output), timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    doc = json.loads(output.read_text())
    (row,) = doc["rows"]
    assert doc["kind"] == "scaling" and row["gpus"] == 0 and row["concurrency"] == 2 and row["batch_size"] == 2
    assert row["throughput_img_per_s"] > 0 and 0 < row["host_cpu_busy"] <= 1 and row["host_cores"] >= 1
    assert "| 0 | 2 |" in result.stdout and output.with_suffix(".png").stat().st_size > 5000
    assert (tmp_path / "w" / "gpus-0" / "tritonserver.log").is_file()
    # More GPUs than the host has, or a repository pinned to some GPUs: refused before any server starts.
    one_line_error(run_module("perf", "scaling", "--repository", str(local_repo), "--gpu-counts", "1,2",
                              "--output", str(tmp_path / "x.json")), "gpu_counts: asks for up to 2 GPUs")


def test_stage_times_from_statistics():
    def stats(count, executions, ns):
        return {"execution_count": executions, "inference_stats": {
            "success": {"count": count}, **{k: {"ns": ns} for k in ("queue", "compute_input", "compute_infer",
                                                                    "compute_output")}}}

    before = {"m": stats(10, 5, 1_000_000), "idle": stats(3, 3, 0)}
    after = {"m": stats(30, 10, 5_000_000), "idle": stats(3, 3, 0)}
    stages = stage_times(before, after)
    assert list(stages) == ["m"]
    assert stages["m"]["requests"] == 20 and stages["m"]["batch_avg"] == 4.0
    assert stages["m"]["compute_infer_us"] == pytest.approx(200.0)
