"""Triton's Model Analyzer on this project's repository: one command, the local server, its reports kept.

Model Analyzer (`pip install triton-model-analyzer`, in its own environment: it needs a newer tritonclient
than the pinned 2.51) launches tritonserver itself in `local` mode. What it needs from this project, and
what this module passes it: the pip tritonserver prepared with our Python-backend stub
(`--backend-directory`), the environment the stub needs (our venv's `python3` first on PATH, the bundled
libraries), and perf_analyzer 2.51 with libcudart.so.12 on LD_LIBRARY_PATH. The ensemble is profiled
with real photos as input data.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

from builder.errors import BuilderError

log = logging.getLogger("perf")


def analyzer_config(repository: Path, models: Sequence[str], workdir: Path, images: Sequence[str],
                    max_instances: int, max_concurrency: int, max_batch: int, search: str) -> Dict:
    """The Model Analyzer `profile` config for `models` of `repository`."""
    from builder.server import server_dir, server_env
    from perf.sweep import perf_analyzer_env, perf_analyzer_path, write_image_data

    from perf.first_request import free_ports

    http, grpc, metrics = free_ports(3)  # not the defaults a running server may hold
    root = server_dir(workdir / "server")
    # Model Analyzer gives perf_analyzer the server's environment too: libcudart.so.12 must be in it.
    env = server_env(perf_analyzer_env().get("LD_LIBRARY_PATH", "").split(os.pathsep))
    config = {
        "model_repository": str(repository),
        "output_model_repository_path": str(workdir / "output_models"),
        "override_output_model_repository": True,
        "export_path": str(workdir / "reports"),
        "checkpoint_directory": str(workdir / "checkpoints"),
        "triton_launch_mode": "local",
        "triton_server_path": str(root / "bin" / "tritonserver"),
        "triton_server_flags": {"backend-directory": str(root / "backends"), "cache-directory": str(root / "caches"),
                                "http-port": http, "grpc-port": grpc, "metrics-port": metrics},
        "triton_http_endpoint": f"localhost:{http}",
        "triton_grpc_endpoint": f"localhost:{grpc}",
        "triton_metrics_url": f"http://localhost:{metrics}/metrics",
        "triton_server_environment": {"PATH": env["PATH"], "LD_LIBRARY_PATH": env["LD_LIBRARY_PATH"],
                                      "PYTHONDONTWRITEBYTECODE": "1"},
        "triton_output_path": str(workdir / "tritonserver.log"),
        "perf_analyzer_path": perf_analyzer_path(),
        "client_protocol": "grpc",
        "run_config_search_mode": search,
        "run_config_search_max_instance_count": max_instances,
        "run_config_search_max_concurrency": max_concurrency,
        "run_config_search_max_model_batch_size": max_batch,
        "perf_analyzer_timeout": 300,
        # Model Analyzer reads GPU metrics through DCGM, which pip installs do not have; with DCGM off it still
        # sees the GPUs (numba) and searches KIND_GPU configs, measuring throughput and latency with
        # perf_analyzer. Without a GPU it searches KIND_CPU configs either way.
        "dcgm_disable": ctypes.util.find_library("dcgm") is None,
        "profile_models": list(models),
    }
    # Time windows instead of Model Analyzer's growing request counts: bounded runs on a slow (CPU) host.
    config["perf_analyzer_flags"] = {"measurement-mode": "time_windows", "measurement-interval": 2000,
                                     "stability-percentage": 25}
    if images:
        config["perf_analyzer_flags"]["input-data"] = str(write_image_data(images, workdir / "images.json"))
    return config


def run_analyzer(analyzer: str, config: Dict, workdir: Path) -> Path:
    """Runs `model-analyzer profile` with `config`; returns the reports folder."""
    import yaml

    if not shutil.which(analyzer) and not Path(analyzer).is_file():
        raise BuilderError(f"model-analyzer not found at {analyzer}; run `make analyzer` (it installs "
                           "triton-model-analyzer into .venv-analyzer)")
    if Path(analyzer).is_file():
        analyzer = str(Path(analyzer).resolve())  # it runs in `workdir`
    # Model Analyzer starts its first server with its own environment: give it the server's (our python3 first
    # on PATH for the stub, the bundled libraries, libcudart.so.12 for perf_analyzer).
    env = dict(os.environ, **config["triton_server_environment"])
    env.pop("PYTHONPATH", None)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log.info("model-analyzer profile -f %s (log: %s)", path, workdir / "model-analyzer.log")
    with (workdir / "model-analyzer.log").open("w") as out:
        # Its own process group: an interrupted run takes the tritonserver it launched down with it.
        process = subprocess.Popen([analyzer, "profile", "-f", str(path)], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=workdir, start_new_session=True)
        # A SIGTERM (kill, a CI timeout) must unwind like Ctrl-C does, so the group below is taken down too.
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            process.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if process.poll() is None or _group_alive(process.pid):
                os.killpg(process.pid, signal.SIGKILL)
    result = process
    if result.returncode != 0:
        tail = (workdir / "model-analyzer.log").read_text(errors="replace").splitlines()[-5:]
        raise BuilderError(f"model-analyzer failed (exit {result.returncode}): {' | '.join(tail)}")
    return workdir / "reports"


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def best_configs(reports: Path) -> List[Dict]:
    """Model Analyzer's measurements (`results/metrics-model-inference.csv`), best throughput first."""
    import csv

    path = reports / "results" / "metrics-model-inference.csv"
    if not path.is_file():
        raise BuilderError(f"model-analyzer wrote no {path}")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    key = next((k for k in rows[0] if k.lower().startswith("throughput")), None) if rows else None
    return sorted(rows, key=lambda r: -float(r[key] or 0)) if key else rows
