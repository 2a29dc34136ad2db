"""Scaling over a host's GPUs: the same repository served on 1, 2, 4, ... GPUs, swept at the same images per
request, with the host CPU's load, so a user sees whether the CPU or the GPUs set the limit.

Each GPU count is a fresh tritonserver that sees only the first N GPUs (CUDA_VISIBLE_DEVICES), so a repository
built without `--gpus` (every GPU-placed model on all GPUs) runs its instances on each of them. Concurrency grows
with N (`concurrency_per_gpu` x N). `0` is the CPU alone (no GPU visible), for repositories of CPU instances.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from builder.errors import BuilderError

log = logging.getLogger("perf")


@dataclass(frozen=True)
class ScalingSettings:
    """One scaling run.

    Attributes:
        repository: The model repository (built without `--gpus`).
        name: The ensemble's name.
        gpu_counts: GPU counts to serve on, e.g. (1, 2, 4, 8); 0: no GPU visible (CPU instances).
        batch_size: Images per request, the same at every count.
        concurrency_per_gpu: Requests in flight per GPU (the CPU run counts as one).
        images: Photos sent (real data).
        measurement_interval_ms: perf_analyzer's window.
        stability_percent: Allowed variation between windows.
        max_trials: Windows tried before giving up on stability.
        cuda_memory_pool_mb: Each visible GPU's CUDA memory pool.
        workdir: Where each server's copy and log live (`<workdir>/gpus-<N>`).
    """

    repository: str
    name: str
    gpu_counts: Tuple[int, ...] = (1, 2, 4, 8)
    batch_size: int = 1
    concurrency_per_gpu: int = 64
    images: Tuple[str, ...] = ()
    measurement_interval_ms: int = 3000
    stability_percent: int = 10
    max_trials: int = 10
    cuda_memory_pool_mb: int = 256
    workdir: str = ".scaling"

    def __post_init__(self) -> None:
        if not self.gpu_counts or min(self.gpu_counts) < 0 or len(set(self.gpu_counts)) != len(self.gpu_counts):
            raise BuilderError(f"gpu_counts: {self.gpu_counts}; use distinct counts >= 0, e.g. 1,2,4,8")
        if self.batch_size < 1 or self.concurrency_per_gpu < 1:
            raise BuilderError("batch_size and concurrency_per_gpu: use 1 or more")
        if not self.images:
            raise BuilderError("images: the ensemble needs real photos; pass --images with a folder of photos")


def check_host(settings: ScalingSettings, host: Sequence[int]) -> None:
    """Refuses, before any server starts, counts past the host's GPUs and a repository pinned to some GPUs."""
    from builder.serving import gpus

    wanted = max(settings.gpu_counts)
    if wanted > len(host):
        fix = (f"pass --gpu-counts up to {len(host)}" if host else
               "run it on a GPU host, or pass --gpu-counts 0 for CPU instances alone")
        raise BuilderError(f"gpu_counts: asks for up to {wanted} GPUs and this host has {len(host) or 'none'}; {fix}")
    pinned = {model: ids for model, ids in gpus.placements(settings.repository).items() if ids}
    if pinned:
        model, ids = sorted(pinned.items())[0]
        raise BuilderError(f"repository: {model} is pinned to GPU {', '.join(map(str, ids))}, so more visible GPUs "
                           "would not serve it; rebuild without --gpus (every GPU) to measure scaling")


def run_scaling(settings: ScalingSettings, host: Sequence[int]) -> Dict:
    """Serves and sweeps each GPU count in turn; the rows, with ratios to N x the one-GPU row."""
    from builder.serving.gpus import memory_pool_args
    from builder.serving.server import LocalServer, ServerSettings, free_ports
    from perf.sweep import SweepSettings, run_sweep

    check_host(settings, host)
    rows: List[Dict] = []
    for count in settings.gpu_counts:
        http, grpc, metrics = free_ports(3)
        visible = ",".join(str(g) for g in host[:count])
        server = LocalServer(ServerSettings(
            settings.repository, http, grpc, metrics, workdir=str(Path(settings.workdir) / f"gpus-{count}"),
            extra_args=tuple(memory_pool_args(settings.cuda_memory_pool_mb, range(count))),
            extra_env=(("CUDA_VISIBLE_DEVICES", visible),)))
        concurrency = settings.concurrency_per_gpu * max(count, 1)
        sweep = SweepSettings(name=settings.name, http_url=server.http_url, grpc_url=server.grpc_url,
                              concurrency=(concurrency,), batch_sizes=(settings.batch_size,),
                              images=settings.images, measurement_interval_ms=settings.measurement_interval_ms,
                              stability_percent=settings.stability_percent, max_trials=settings.max_trials)
        log.info("[%d/%d] %d GPU(s) visible (%s), concurrency %d, %d image(s) per request",
                 len(rows) + 1, len(settings.gpu_counts), count, visible or "none", concurrency, settings.batch_size)
        with server:
            started = time.perf_counter()
            (row,) = run_sweep(sweep, progress=True)  # its row carries the host's CPU load over the run
        row.update(gpus=count, seconds=round(time.perf_counter() - started, 1))
        rows.append(row)
    one = next((r for r in rows if r["gpus"] == 1 and "error" not in r), None)
    for row in rows:
        if one and row["gpus"] >= 1 and "error" not in row:
            ideal = row["gpus"] * one["throughput_img_per_s"]
            row["ratio_to_n_times_one"] = round(row["throughput_img_per_s"] / ideal, 3)
    return {"kind": "scaling", "settings": dataclasses.asdict(settings), "host_gpus": len(host), "rows": rows}


def markdown(result: Dict) -> str:
    """The scaling table."""
    lines = ["| GPUs | concurrency | img/s | vs N x one GPU | host CPU busy | p99 (ms) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['gpus']} | {row['concurrency']} | failed: {row['error'][:80]} | | | |")
            continue
        ratio = row.get("ratio_to_n_times_one")
        cpu = f"{row['host_cpu_busy']:.0%} of {row['host_cores']} cores" if row.get("host_cpu_busy") is not None else "—"
        lines.append(f"| {row['gpus']} | {row['concurrency']} | {row['throughput_img_per_s']:,.0f} | "
                     f"{ratio if ratio is not None else '—'} | {cpu} | {row['latency_p99_us'] / 1000:.1f} |")
    return "\n".join(lines) + "\n"


def plot(result: Dict, path: Path) -> Optional[Path]:
    """img/s against GPUs with the N x one-GPU line, and the host CPU's load on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    if not rows:
        return None
    counts = [r["gpus"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(counts, [r["throughput_img_per_s"] for r in rows], "o-", label="measured img/s")
    one = next((r for r in rows if r["gpus"] == 1), None)
    if one:
        ax.plot(counts, [c * one["throughput_img_per_s"] for c in counts], "--", color="gray", label="N x one GPU")
    ax.set_xlabel("GPUs visible to tritonserver")
    ax.set_ylabel("images per second")
    ax.set_xticks(counts)
    ax.set_ylim(bottom=0)
    cpu = ax.twinx()
    cpu.plot(counts, [100 * r["host_cpu_busy"] if r.get("host_cpu_busy") is not None else float("nan") for r in rows],
             "s:", color="tab:red", label="host CPU busy %")
    cpu.set_ylabel("host CPU busy (%)")
    cpu.set_ylim(0, 100)
    handles = ax.get_legend_handles_labels()[0] + cpu.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left")
    ax.set_title(f"{result['settings']['name']}: {result['settings']['batch_size']} image(s) per request")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
