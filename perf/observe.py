"""What the host and the server did while perf_analyzer ran a row: the host's busy cores, its TCP counters, and
Triton's per-model statistics turned into where each request's time went (`perf sweep` records them in each row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple


def cpu_times() -> Tuple[float, float]:
    """(busy, total) jiffies of all cores from /proc/stat; (0, 0) where there is none (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


# TCP counters whose growth during a row says connections had trouble opening: the listening socket's queue
# overflowed (ListenOverflows, ListenDrops), a connect was retried (TCPSynRetrans) or refused or reset
# (AttemptFails, EstabResets), segments were sent again (RetransSegs, TCPTimeouts).
TCP_COUNTERS = {"TcpExt": ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPTimeouts", "TCPAbortOnOverflow"),
                "Tcp": ("ActiveOpens", "AttemptFails", "EstabResets", "RetransSegs")}


def tcp_counters() -> Dict[str, int]:
    """This network namespace's TCP counters named in TCP_COUNTERS (client and server alike); {} without /proc."""
    counters: Dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for names, values in zip(lines[::2], lines[1::2]):  # a header line, then its values
            group, _, header = names.partition(":")
            if group in TCP_COUNTERS:
                table = dict(zip(header.split(), values.partition(":")[2].split()))
                counters.update({k: int(table[k]) for k in TCP_COUNTERS[group] if k in table})
    return counters


def somaxconn() -> Optional[int]:
    """The kernel's cap on a listening socket's accept queue (gRPC servers ask for it), None where unknown."""
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return None


def model_statistics(grpc_url: str) -> Dict[str, Dict]:
    """Triton's cumulative per-model statistics, keyed by model; {} when unreachable.

    Over gRPC, the protocol perf_analyzer measures with: tritonclient's HTTP client needs gevent and greenlet,
    which a serving host may lack. (Proto JSON leaves out zero counts and writes int64 as strings.)
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with grpcclient.InferenceServerClient(grpc_url) as client:
            stats = client.get_inference_statistics(as_json=True, client_timeout=10).get("model_stats", [])
    except (InferenceServerException, OSError, ValueError, KeyError):
        return {}
    return {m["name"]: m for m in stats}


def stage_times(before: Dict[str, Dict], after: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
    """Per model, between two statistics snapshots: where each millisecond went.

    `queue_us` is the time a request waited; the `compute_*_us` figures are the time of the execution (the batch)
    a request rode in, since Triton attributes an execution's whole time to each request in it, so they are per
    batch, not a request's share of it.

    Returns:
        {model: {"requests", "executions", "batch_avg", "failed", "queue_us", "compute_input_us",
        "compute_infer_us", "compute_output_us"}} for every model that served requests.
    """
    def figure(stats: Dict, key: str, field: str) -> int:
        return int(stats.get("inference_stats", {}).get(key, {}).get(field, 0))

    stages = {}
    for name, now in after.items():
        old = before.get(name, {})
        count = figure(now, "success", "count") - figure(old, "success", "count")
        if count <= 0:
            continue
        executions = int(now.get("execution_count", 0)) - int(old.get("execution_count", 0))
        failed = figure(now, "fail", "count") - figure(old, "fail", "count")  # requests the server answered with an error
        row = {"requests": count, "executions": executions, "batch_avg": count / executions if executions else 0.0,
               "failed": failed}
        for key in ("queue", "compute_input", "compute_infer", "compute_output"):
            row[f"{key}_us"] = (figure(now, key, "ns") - figure(old, key, "ns")) / count / 1000.0
        stages[name] = row
    return stages
