"""Triton's Model Analyzer on this project's repository: one command, this project's server, its reports kept.

Model Analyzer (`pip install triton-model-analyzer`, in its own environment: it needs a newer tritonclient
than the pinned 2.51) runs in its `remote` launch mode against a tritonserver this module starts on free
ports in explicit model-control mode: the same server `make serve` runs (our Python-backend stub and its
environment), with no admin key, since only the analyzer talks to it. Remote mode loads each candidate
config with a config override (as `perf tune` does) and needs no DCGM, which Model Analyzer's `local`
mode requires on GPU hosts and pip installs lack. perf_analyzer 2.51 gets libcudart.so.12 on
LD_LIBRARY_PATH. Candidates run on the GPU where there is one (KIND_GPU), else on the CPU. The ensemble
is profiled with real photos as input data.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple
import csv

from builder.core.contract import LOOPBACK
from builder.core.interrupt import raise_interrupt
from builder.errors import BuilderError, field_error

log = logging.getLogger("perf")


def has_gpu() -> bool:
    """Whether the host has an NVIDIA GPU the server can use (nvidia-smi names one)."""
    from perf.environment import gpu

    return bool(gpu())


@dataclass(frozen=True)
class SearchSettings:
    """What Model Analyzer searches and how long it measures each point.

    Attributes:
        search: `brute` or `quick` (the ensemble is always searched quick).
        max_instances: Largest instance count tried.
        min_concurrency, max_concurrency: The client concurrency range (powers of two in between).
        min_batch, max_batch: The max_batch_size range; a config keeps its preferred batch sizes, so sizes
            below the largest preferred one are refused by Model Analyzer as illegal.
        measurement_interval_ms: perf_analyzer's time window.
    """

    search: str = "brute"
    max_instances: int = 2
    min_concurrency: int = 1
    max_concurrency: int = 16
    min_batch: int = 1
    max_batch: int = 8
    measurement_interval_ms: int = 2000

    def __post_init__(self) -> None:
        if self.search not in ("brute", "quick"):
            raise field_error("search", f"{self.search!r} is unknown", "use brute or quick")
        for low, high, name in ((self.min_concurrency, self.max_concurrency, "concurrency"),
                                (self.min_batch, self.max_batch, "batch")):
            if not 1 <= low <= high:
                raise BuilderError(f"{name}: need 1 <= min ({low}) <= max ({high})")
        if self.max_instances < 1 or self.measurement_interval_ms < 100:
            raise BuilderError("max_instances: use 1 or more; measurement_interval_ms: use 100 or more")


def analyzer_config(repository: Path, models: Sequence[str], workdir: Path, images: Sequence[str],
                    search: SearchSettings, ports: Tuple[int, int, int], gpu: bool,
                    composing: Sequence[str] = ()) -> Dict:
    """The Model Analyzer `profile` config for `models`, served by a server on `ports` (http, grpc, metrics).

    Args:
        search: What to search.
        composing: The ensemble's composing models (searched with it in quick mode).
        gpu: Search KIND_GPU configs (else KIND_CPU: `cpu_only`).
    """
    from perf.sweep import perf_analyzer_path, write_image_data

    http, grpc, metrics = ports
    config = {
        "model_repository": str(repository),
        "output_model_repository_path": str(workdir / "output_models"),
        "override_output_model_repository": True,
        "export_path": str(workdir / "reports"),
        "checkpoint_directory": str(workdir / "checkpoints"),
        "triton_launch_mode": "remote",
        "triton_http_endpoint": f"{LOOPBACK}:{http}",
        "triton_grpc_endpoint": f"{LOOPBACK}:{grpc}",
        "triton_metrics_url": f"http://{LOOPBACK}:{metrics}/metrics",
        # GPU metrics come from the server's /metrics in remote mode; DCGM (not in pip installs) stays off.
        "dcgm_disable": True,
        "perf_analyzer_path": perf_analyzer_path(),
        "client_protocol": "grpc",
        "run_config_search_mode": "quick" if composing else search.search,
        "run_config_search_max_instance_count": search.max_instances,
        "run_config_search_min_concurrency": search.min_concurrency,
        "run_config_search_max_concurrency": search.max_concurrency,
        "run_config_search_min_model_batch_size": search.min_batch,
        "run_config_search_max_model_batch_size": search.max_batch,
        "perf_analyzer_timeout": 300,
        "profile_models": {name: {"cpu_only": not gpu} for name in models},
    }
    if composing and not gpu:
        config["cpu_only_composing_models"] = list(composing)
    # Time windows instead of Model Analyzer's growing request counts: bounded runs on a slow (CPU) host.
    config["perf_analyzer_flags"] = {"measurement-mode": "time_windows",
                                     "measurement-interval": search.measurement_interval_ms,
                                     "stability-percentage": 25}
    if images:
        config["perf_analyzer_flags"]["input-data"] = str(write_image_data(images, workdir / "images.json"))
    return config


def analyzer_env() -> Dict[str, str]:
    """The analyzer's environment: perf_analyzer 2.51 finds libcudart.so.12; no PYTHONPATH of ours leaks in."""
    from perf.sweep import perf_analyzer_env

    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = perf_analyzer_env().get("LD_LIBRARY_PATH", env.get("LD_LIBRARY_PATH", ""))
    env.pop("PYTHONPATH", None)
    return env


def run_analyzer(analyzer: str, config: Dict, workdir: Path) -> Path:
    """Runs `model-analyzer profile` with `config` (its server already up); returns the reports folder."""
    import yaml

    if not shutil.which(analyzer) and not Path(analyzer).is_file():
        raise BuilderError(f"model-analyzer not found at {analyzer}; run `make analyzer` (it installs "
                           "triton-model-analyzer into .venv-analyzer)")
    if Path(analyzer).is_file():
        analyzer = str(Path(analyzer).resolve())  # it runs in `workdir`
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log.info("model-analyzer profile -f %s (log: %s)", path, workdir / "model-analyzer.log")
    with (workdir / "model-analyzer.log").open("w") as out:
        # Its own process group: an interrupted run takes perf_analyzer and the rest down with it.
        process = subprocess.Popen([analyzer, "profile", "-f", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                   env=analyzer_env(), cwd=workdir, start_new_session=True)
        # A SIGTERM (kill, a CI timeout) must unwind like Ctrl-C does, so the group below is taken down too.
        previous = signal.signal(signal.SIGTERM, raise_interrupt)
        try:
            process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if process.poll() is None or _group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
    if process.returncode != 0:
        tail = (workdir / "model-analyzer.log").read_text(errors="replace").splitlines()[-5:]
        raise BuilderError(f"model-analyzer failed (exit {process.returncode}): {' | '.join(tail)}")
    return workdir / "reports"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def best_configs(reports: Path) -> List[Dict]:
    """Model Analyzer's measurements (`results/metrics-model-inference.csv`), best throughput first."""
    path = reports / "results" / "metrics-model-inference.csv"
    if not path.is_file():
        raise BuilderError(f"model-analyzer wrote no {path}")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    key = next((k for k in rows[0] if k.lower().startswith("throughput")), None) if rows else None
    return sorted(rows, key=lambda r: -float(r[key] or 0)) if key else rows
