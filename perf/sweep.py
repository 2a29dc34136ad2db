"""perf_analyzer sweeps over models, concurrency, batch size, protocol and shared memory.

perf_analyzer 2.51 comes from the `tritonclient[all]==2.51.0` wheel (it needs
Debian's libb64-0d and libcudart.so.12 from `nvidia-cuda-runtime-cu12`, found
here and put on LD_LIBRARY_PATH); in NVIDIA's SDK container the system one is
used. Each configuration is one perf_analyzer run with a fixed concurrency,
stability settings and its CSV (`--verbose-csv`) parsed into a flat row with
units in the keys.
"""

from __future__ import annotations

import base64
import csv
import itertools
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from builder.core import contract as C
from builder.errors import BuilderError, field_error
from perf.observe import cpu_times, model_statistics, somaxconn, stage_times, tcp_counters

log = logging.getLogger("perf")
CSV_FIELDS = {  # perf_analyzer CSV column -> our key (all latencies in microseconds)
    "Inferences/Second": "throughput_infer_per_s",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "p50 latency": "latency_p50_us",
    "p90 latency": "latency_p90_us",
    "p95 latency": "latency_p95_us",
    "p99 latency": "latency_p99_us",
    "Avg latency": "latency_avg_us",
}


def perf_analyzer_path() -> str:
    """The perf_analyzer binary: the venv's (tritonclient wheel) first, else PATH (SDK container)."""
    local = Path(sys.executable).parent / "perf_analyzer"
    found = str(local) if local.is_file() else shutil.which("perf_analyzer")
    if not found:
        raise BuilderError("perf_analyzer not found; run `make venv` (tritonclient[all]==2.51.0 ships it) "
                           "or use NVIDIA's tritonserver SDK container")
    return found


def perf_analyzer_env() -> Dict[str, str]:
    """Environment with libcudart.so.12 (pip nvidia-cuda-runtime-cu12) on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime

        libdir = str(Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    except ImportError:
        pass  # the SDK container has CUDA in the default library path
    return env


MODELS = ("ensemble", "classifier", "preprocess")  # preprocess: encoded images in, pixels out


@dataclass(frozen=True)
class SweepSettings:
    """One sweep's grid and measurement settings.

    Attributes:
        name: Ensemble name (the classifier is `<name>_classifier`).
        http_url, grpc_url: Server addresses (host:port).
        models: `ensemble` and/or `classifier`.
        concurrency: Requests in flight to try.
        batch_sizes: Client batch sizes to try.
        protocols: `grpc` and/or `http`.
        shared_memory: `none`, `system` and/or `cuda`.
        images: Image files sent to the ensemble (real data; required for it).
        measurement_interval_ms: perf_analyzer window.
        stability_percent: Allowed variation between windows.
        max_trials: Windows tried before giving up on stability.
        request_count: 0 for time windows, else one measurement over that many requests (tails kept).
        client_threads: 0 for perf_analyzer's synchronous client (a thread per request in flight), else its
            asynchronous client with that many threads (`--async --max-threads`).
    """

    name: str
    http_url: str = C.LOCAL_HTTP_URL
    grpc_url: str = C.LOCAL_GRPC_URL
    models: Tuple[str, ...] = ("ensemble",)
    concurrency: Tuple[int, ...] = (1, 4, 16)
    batch_sizes: Tuple[int, ...] = (1,)
    protocols: Tuple[str, ...] = ("grpc",)
    shared_memory: Tuple[str, ...] = ("none",)
    images: Tuple[str, ...] = ()
    measurement_interval_ms: int = 3000
    stability_percent: int = 10
    max_trials: int = 10
    request_count: int = 0
    client_threads: int = 0

    def __post_init__(self) -> None:
        def fail(field: str, problem: str, fix: str) -> None:
            raise field_error(field, problem, fix)

        if not set(self.models) <= set(MODELS) or not self.models:
            fail("models", f"{self.models}", f"use {', '.join(MODELS)}")
        if not set(self.protocols) <= {"grpc", "http"} or not self.protocols:
            fail("protocols", f"{self.protocols}", "use grpc and/or http")
        if not set(self.shared_memory) <= {"none", "system", "cuda"} or not self.shared_memory:
            fail("shared_memory", f"{self.shared_memory}", "use none, system and/or cuda")
        if not self.concurrency or min(self.concurrency) < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            fail("concurrency", "concurrency and batch sizes must be >= 1", "e.g. --concurrency 1,4,16")
        if {"ensemble", "preprocess"} & set(self.models) and not self.images:
            fail("images", "the ensemble and preprocess models need real images", "pass --images with a folder of photos")
        if self.measurement_interval_ms < 100 or self.max_trials < 1 or self.stability_percent < 1:
            fail("measurement", "interval >= 100 ms, trials >= 1, stability >= 1%", "e.g. 3000 ms, 10, 10%")
        if self.client_threads < 0:
            fail("client_threads", f"{self.client_threads} is negative", "pass 0 (synchronous) or a count, e.g. 8")
        if self.request_count < 0:
            fail("request_count", f"{self.request_count} is negative", "pass 0 (time windows) or a count, e.g. 3000")
        if 0 < self.request_count < max(self.concurrency):
            fail("request_count", f"{self.request_count} is below the concurrency {max(self.concurrency)} (perf_analyzer "
                 "could not keep that many requests in flight)", f"pass at least {max(self.concurrency)}, e.g. 3000")

    def grid(self) -> List[Tuple[str, str, str, int, int]]:
        """(model, protocol, shared memory, batch, concurrency) combinations, in run order."""
        return list(itertools.product(self.models, self.protocols, self.shared_memory, self.batch_sizes,
                                      self.concurrency))


def write_image_data(images: Sequence[str], path: Path) -> Path:
    """perf_analyzer --input-data JSON for the ensemble: each image a BYTES element.

    perf_analyzer takes a BYTES tensor's `b64` as its serialized form: a
    little-endian uint32 length before each element's bytes.
    """
    rows = []
    for image in images:
        data = Path(image).read_bytes()
        rows.append({C.IMAGE: {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode(),
                               "shape": [1]}})
    path.write_text(json.dumps({"data": rows}))
    return path


def parse_csv(path: Path) -> Dict[str, float]:
    """The first data row of a perf_analyzer --verbose-csv file, renamed with units."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise BuilderError(f"perf_analyzer wrote no results to {path}")
    row = rows[0]
    return {key: float(row[column]) for column, key in CSV_FIELDS.items() if row.get(column) not in (None, "")}


def command(settings: SweepSettings, model: str, protocol: str, shm: str, batch: int, concurrency: int,
            input_data: Optional[Path], csv_path: Path) -> List[str]:
    """The perf_analyzer command line for one configuration."""
    names = C.Contract.named(settings.name)
    target = {"ensemble": names.ensemble, "classifier": names.classifier, "preprocess": names.preprocess}[model]
    cmd = [perf_analyzer_path(), "-m", target, "-i", protocol,
           "-u", settings.grpc_url if protocol == "grpc" else settings.http_url,
           "-b", str(batch), "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-interval", str(settings.measurement_interval_ms),
           "-s", str(settings.stability_percent), "-r", str(settings.max_trials),
           "--shared-memory", shm, "-f", str(csv_path), "--verbose-csv"]
    if shm != "none":
        cmd += ["--output-shared-memory-size", str(max(1 << 20, batch * 64 * 1024))]
    if settings.client_threads:  # many requests in flight from a few threads, not one blocked thread each
        cmd += ["--async", "--max-threads", str(settings.client_threads)]
    cmd += ["--input-data", str(input_data) if model in ("ensemble", "preprocess") else "random"]
    if settings.request_count:  # one measurement over that many requests, each one's timestamps exported
        cmd += ["--request-count", str(settings.request_count),
                "--profile-export-file", str(csv_path.with_suffix(".profile.json"))]
    return cmd


# The tail's shape kept in each --request-count row, for `perf tails` plots.
TAIL_QUANTILES = (50, 75, 90, 95, 99, 99.5, 99.8, 99.9, 99.95, 99.98, 100)


def tail_figures(profile_export: Path, concurrency: int = 1) -> Dict:
    """Every request's latency from a perf_analyzer profile export: the tail its report leaves out.

    perf_analyzer reports up to p99; a stall that hits one request in a thousand shows only in p99.9, the
    maximum and the count of requests slower than ten times the median (`slow_requests`). The first
    `concurrency` requests sent are the start-up wave (each client context's first request, on streams and
    connections still being set up); `steady_*` are the same figures over the requests after it, and
    `slow_sent_ms` says when, after the first request, the slow ones were sent.
    """
    import numpy as np

    # BYTES outputs are stored raw in the export: latin-1 reads any byte.
    try:
        export = json.loads(Path(profile_export).read_text(encoding="latin-1"))
        requests = export["experiments"][0]["requests"]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        # perf_analyzer 2.51 leaves the file empty for some points (the classifier's FP32 outputs over the wire):
        # the row keeps perf_analyzer's own figures, without the tail.
        log.warning("perf_analyzer's profile export %s cannot be read (%s): this row has no tail figures",
                    profile_export, type(exc).__name__)
        return {"tail_missing": f"perf_analyzer's profile export was unreadable ({type(exc).__name__})"}
    answered = sorted((r for r in requests if r["response_timestamps"]), key=lambda r: r["timestamp"])
    if not answered:
        return {}
    ms = np.array([(r["response_timestamps"][-1] - r["timestamp"]) / 1e6 for r in answered])
    sent_ms = np.array([(r["timestamp"] - answered[0]["timestamp"]) / 1e6 for r in answered])
    median = float(np.median(ms))
    is_slow = ms > 10 * median
    slow = np.sort(ms[is_slow])[::-1]
    steady = ms[concurrency:] if len(ms) > concurrency else ms[-1:]
    figures = {"requests": int(len(ms)), "latency_p999_ms": float(np.percentile(ms, 99.9)),
               "latency_max_ms": float(ms.max()), "slow_requests": int(len(slow)),
               "slowest_ms": [round(float(v), 1) for v in slow[:10]],
               "latency_quantiles_ms": {str(q): round(float(np.percentile(ms, q)), 3) for q in TAIL_QUANTILES},
               "startup_requests": int(min(concurrency, len(ms))),
               "startup_max_ms": float(ms[:concurrency].max()),
               "steady_latency_p999_ms": float(np.percentile(steady, 99.9)),
               "steady_latency_max_ms": float(steady.max()),
               "steady_slow_requests": int((steady > 10 * median).sum()),
               "steady_latency_quantiles_ms": {str(q): round(float(np.percentile(steady, q)), 3)
                                               for q in TAIL_QUANTILES}}
    if len(slow):
        figures["slow_sent_ms"] = [round(float(sent_ms[is_slow].min()), 1), round(float(sent_ms[is_slow].max()), 1)]
    return figures


def run_sweep(settings: SweepSettings, progress: bool = True) -> List[Dict]:
    """Runs every configuration of the grid; failures become rows with an `error`.

    Returns:
        One flat row per configuration.
    """
    rows: List[Dict] = []
    try:
        _run_grid(settings, progress, rows)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: perf_analyzer was killed with its run, the temp folder removed
        raise Interrupted(rows) from None
    return rows


class Interrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C or SIGTERM; `rows` holds the configurations it finished."""

    def __init__(self, rows: List[Dict]):
        super().__init__(f"interrupted after {len(rows)} configuration(s)")
        self.rows = rows


def analyzer_error(output: str, returncode: int) -> str:
    """The cause perf_analyzer gives: what its worker threads were told by the server ("Thread [0] had error:
    ..."), else its own error line(s), not the usage text it prints after them; else its last lines."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    causes = list(dict.fromkeys(line.split("had error:", 1)[1].strip() for line in lines if "had error:" in line))
    errors = [line for line in lines if line.lower().startswith(("error:", "error "))
              or line.lower().startswith("failed to")]
    said = " | ".join(causes[:2] or errors[:3] or lines[-3:]) or f"exit code {returncode}"
    if "connect" in said.lower():  # the usual cause: another port, or the other protocol's port
        said += (" (is the server up, and are --http-url and --grpc-url its ports? tritonserver serves HTTP on 8000 "
                 "and gRPC on 8001 by default)")
    return said


def analyzer_timeout_s(settings: SweepSettings) -> float:
    """How long one perf_analyzer run may take before its row is failed: a minute, every window it may try three
    times over, and half a second a request."""
    return 60 + settings.measurement_interval_ms * settings.max_trials * 3 / 1000 + settings.request_count / 2


# perf_analyzer 2.51 sometimes ends all its worker threads before a --request-count run has its count, and its main
# thread then waits for it forever (gdb: no worker left, the main thread sleeping in InferenceProfiler::Measure,
# over HTTP alone, over gRPC beside the gRPC library's own threads; about one row in 40 at concurrency 16 on the
# 2-core CI host). Its workers carry its name and the library's threads their own, so a perf_analyzer whose
# threads of its own name are down to its main thread this long is that hang: it is stopped and its row run again,
# which the row records.
LONE_THREAD_S = 15.0
# Runs of a hanging row before it fails: one retry left a row failed once in about 40 CI sweeps (at 3916c8c).
HUNG_RUNS = 3


def _own_threads(pid: int) -> Optional[int]:
    """How many threads of a process carry its main thread's name (None where /proc cannot tell)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            name = f.read()
        count = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                count += f.read() == name
        return count
    except OSError:  # gone meanwhile, or no /proc
        return None


def _run_analyzer(cmd: List[str], env: Dict[str, str], timeout: float) -> Tuple[Optional[int], str, bool]:
    """perf_analyzer's exit code (None when it was stopped: past `timeout`, or hung), all it printed, and whether
    it was stopped as hung (only its main thread left for `LONE_THREAD_S`)."""
    with tempfile.TemporaryFile() as printed:
        child = subprocess.Popen(cmd, stdout=printed, stderr=subprocess.STDOUT, env=env)
        started, alone_since, hung = time.monotonic(), None, False
        try:
            while child.poll() is None and time.monotonic() - started < timeout:
                now = time.monotonic()
                alone_since = (alone_since or now) if _own_threads(child.pid) == 1 else None
                if alone_since is not None and now - alone_since >= LONE_THREAD_S:
                    hung = True
                    break
                time.sleep(0.2)
        finally:  # past its time, hung, or Ctrl-C/SIGTERM: it goes with the row
            stopped = child.poll() is None
            if stopped:
                child.kill()
                child.wait()
        printed.seek(0)
        return (None if stopped else child.returncode), printed.read().decode(errors="replace"), hung


def _measured(settings: SweepSettings, cmd: List[str], env: Dict[str, str], row: Dict) -> Tuple[Optional[int], str,
                                                                                              bool]:
    """One perf_analyzer run with what the host and the server did meanwhile (into `row`); as `_run_analyzer`."""
    before = model_statistics(settings.grpc_url)
    busy, total = cpu_times()
    tcp = tcp_counters()
    returncode, output, hung = _run_analyzer(cmd, env, analyzer_timeout_s(settings))
    busy2, total2 = cpu_times()
    # The host's cores busy over the row (client and server together): a saturated host caps what the
    # GPU can be given.
    row["host_cpu_busy"] = round((busy2 - busy) / (total2 - total), 3) if total2 > total else None
    row["host_cores"] = os.cpu_count() or 1
    tcp_after = tcp_counters()
    row["tcp"] = {k: tcp_after[k] - v for k, v in tcp.items() if k in tcp_after}
    row["tcp_somaxconn"] = somaxconn()
    stages = stage_times(before, model_statistics(settings.grpc_url))
    if stages:
        row["stages"] = stages
    return returncode, output, hung


def _measured_until_unhung(settings: SweepSettings, cmd: List[str], env: Dict[str, str], row: Dict,
                           csv_path: Path) -> Tuple[Optional[int], str, bool]:
    """`_measured`, run again while perf_analyzer hangs, up to `HUNG_RUNS` runs in all (`row["retried"]` says how
    often); as `_run_analyzer`."""
    returncode, output, hung = _measured(settings, cmd, env, row)
    for rerun in range(1, HUNG_RUNS):
        if not hung:
            break
        log.warning("perf_analyzer hung (only its main thread left for %g s): run again", LONE_THREAD_S)
        row["retried"] = (f"perf_analyzer was left with only its main thread for {LONE_THREAD_S:g} s (its "
                          f"request-count hang): stopped and run again ({rerun} of {HUNG_RUNS - 1})")
        for path in (csv_path, csv_path.with_suffix(".profile.json")):
            path.unlink(missing_ok=True)  # perf_analyzer refuses an export file that exists
        returncode, output, hung = _measured(settings, cmd, env, row)
    return returncode, output, hung


def _run_grid(settings: SweepSettings, progress: bool, rows: List[Dict]) -> None:
    grid = settings.grid()
    env = perf_analyzer_env()
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        data = (write_image_data(settings.images, Path(tmp) / "images.json")
                if {"ensemble", "preprocess"} & set(settings.models) else None)
        for index, (model, protocol, shm, batch, concurrency) in enumerate(grid, 1):
            csv_path = Path(tmp) / f"run{index}.csv"
            cmd = command(settings, model, protocol, shm, batch, concurrency, data, csv_path)
            row = {"model": model, "protocol": protocol, "shared_memory": shm, "batch_size": batch,
                   "concurrency": concurrency, "command": " ".join(Path(cmd[0]).name if i == 0 else a
                                                                   for i, a in enumerate(cmd))}
            returncode, output, hung = _measured_until_unhung(settings, cmd, env, row, csv_path)
            if returncode is None:
                row["error"] = (f"perf_analyzer hung {HUNG_RUNS} times (only its main thread left) and was stopped"
                                if hung else
                                f"perf_analyzer did not finish in {analyzer_timeout_s(settings):.0f} s and was "
                                "stopped: requests the server never answered (its log says why), or a row that "
                                "needs more time than its windows allow")
                row["analyzer_output"] = output.strip().splitlines()[-15:]
            elif returncode != 0 or not csv_path.is_file():
                row["error"] = analyzer_error(output, returncode)
                # What perf_analyzer said last: its one-line errors ("Worker thread(s) failed ...") name no cause.
                row["analyzer_output"] = output.strip().splitlines()[-15:]
            else:
                row.update(parse_csv(csv_path))
                row["throughput_img_per_s"] = row["throughput_infer_per_s"]  # one inference = one image
                if settings.request_count:
                    row.update(tail_figures(csv_path.with_suffix(".profile.json"), concurrency))
            rows.append(row)
            if progress:
                log.info("[%d/%d] %s %s shm=%s batch=%d concurrency=%d: %s", index, len(grid), model, protocol,
                         shm, batch, concurrency, _outcome(row))


def _outcome(row: Dict) -> str:
    """A row in one line for the progress log: throughput and p99, the tail where measured, TCP trouble."""
    if "error" in row:
        return f"FAILED: {row['error'][:120]}"
    outcome = f"{row['throughput_img_per_s']:.1f} img/s, p99 {row['latency_p99_us'] / 1000:.1f} ms"
    if "latency_max_ms" in row:
        outcome += (f", p99.9 {row['latency_p999_ms']:.1f} ms, max {row['latency_max_ms']:.1f} ms, "
                    f"{row['slow_requests']} of {row['requests']} over 10x the median "
                    f"({row['steady_slow_requests']} after the first {row['startup_requests']}, "
                    f"max {row['steady_latency_max_ms']:.1f} ms)")
    troubles = {k: v for k, v in row.get("tcp", {}).items()
                if v and k in ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "AttemptFails")}
    if troubles:  # connections that opened late or not at all: the slow start of a row's first requests
        outcome += ", TCP " + ", ".join(f"{k} {v}" for k, v in troubles.items())
    return outcome


def sweep_payload(settings: SweepSettings, rows: List[Dict], extra: Optional[Dict] = None) -> Dict:
    """The results document: environment, settings, rows."""
    from perf.environment import describe

    return {"kind": "sweep", "environment": describe(extra), "settings": asdict(settings), "results": rows}
