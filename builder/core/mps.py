"""A CUDA MPS control daemon of the server's own, so that several GPU model instances share each GPU at once.

Without MPS, every Python-backend instance is a process with its own CUDA context, and the GPU runs one context
at a time (time slices). With many photo-path instances, that is what limits one-image requests: on an H200,
six fused instances served 4,660 img/s without MPS and 5,490 with it (perf/results/h200-photo-mps).

The daemon is private to the server: its pipe and log folders are named after the server's workdir, so it
serves only the processes started with its `env()` (tritonserver and the stubs it starts), not the host's other
CUDA programs, and `stop` quits only it. It needs `nvidia-cuda-mps-control` (the NVIDIA driver's utilities) and
GPUs in the default compute mode.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

from builder.errors import BuilderError
from builder.core import procs

log = logging.getLogger(__name__)
CONTROL = "nvidia-cuda-mps-control"


def host_gpus() -> List[int]:
    """The GPU ids tritonserver will see here: nvidia-smi's GPUs, renumbered by CUDA_VISIBLE_DEVICES when set."""
    count = 0
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=30)
            count = len([line for line in listed.stdout.splitlines() if line.strip()]) if listed.returncode == 0 else 0
        except (OSError, subprocess.TimeoutExpired):
            count = 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # CUDA numbers the visible devices 0..n-1, in the order given
        count = min(count, len([v for v in visible.split(",") if v.strip() and not v.strip().startswith("-")]))
    return list(range(count))


class MpsDaemon:
    """Starts and quits one MPS control daemon for the server run from `workdir`.

    Args:
        workdir: The server's workdir; the daemon's folders are named after it.
    """

    def __init__(self, workdir: Path):
        # Under the temp folder, not the workdir: the pipe is a Unix socket, whose path may not pass 107 bytes.
        key = hashlib.sha1(str(Path(workdir).resolve()).encode()).hexdigest()[:12]
        self.root = Path(tempfile.gettempdir()) / f"swin-triton-mps-{os.getuid()}-{key}"
        self.marker = Path(workdir) / "mps-daemon"  # present while a daemon started for this workdir may run

    def env(self) -> Dict[str, str]:
        """The variables that make a CUDA process a client of this daemon."""
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.root / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(self.root / "log")}

    def start(self) -> None:
        """Starts the daemon (it forks into the background).

        Raises:
            BuilderError: No control program, no GPU, or the daemon did not start.
        """
        control = shutil.which(CONTROL)
        if not control:
            raise BuilderError(f"mps: {CONTROL} is not on PATH (it comes with the NVIDIA driver's utilities); install "
                               "them, or serve without MPS (--no-mps, make serve MPS=0)")
        if not host_gpus():
            raise BuilderError("mps: this host has no GPU (nvidia-smi lists none); serve without MPS (--no-mps, "
                               "make serve MPS=0)")
        self.stop()  # a daemon left by a server of this workdir that was killed: quit before starting anew
        for folder in self.env().values():
            Path(folder).mkdir(parents=True, exist_ok=True)
        done = subprocess.run([control, "-d"], env={**os.environ, **self.env()}, capture_output=True, text=True,
                              timeout=30)
        if done.returncode != 0:
            said = (done.stdout + done.stderr).strip() or f"exit code {done.returncode}"
            raise BuilderError(f"mps: {CONTROL} -d failed ({said}); see {self.root / 'log' / 'control.log'}, or "
                               "serve without MPS (--no-mps, make serve MPS=0)")
        self.marker.write_text(str(self.root))
        log.info("CUDA MPS control daemon started (pipe %s)", self.env()["CUDA_MPS_PIPE_DIRECTORY"])

    def pids(self):
        """The daemon's processes (control and server): MPS programs started with this daemon's pipe folder."""
        pipe = self.env()["CUDA_MPS_PIPE_DIRECTORY"]
        return procs.find(lambda pid, argv: Path(argv[0]).name.startswith("nvidia-cuda-mps")
                          and procs.environment(pid).get("CUDA_MPS_PIPE_DIRECTORY") == pipe)

    def stop(self) -> None:
        """Quits the daemon started for this workdir, if one runs (after the server's processes have ended).

        A daemon that does not quit in 15 s (it waits for clients that no longer answer) is killed: left
        running, it made the next `serve --mps` of this workdir fail ("already running").
        """
        running = self.pids()
        if not running and not self.marker.is_file():
            return
        control = shutil.which(CONTROL)
        if running:
            try:
                if control:
                    subprocess.run([control], input="quit\n", env={**os.environ, **self.env()},
                                   capture_output=True, text=True, timeout=15)
            except subprocess.TimeoutExpired:
                pass
            left = procs.wait_gone(self.pids(), 5.0)
            if left:
                log.warning("the CUDA MPS daemon (pipe %s) did not quit; killing pids %s", self.root / "pipe",
                            " ".join(map(str, left)))
                procs.kill(left)
        self.marker.unlink(missing_ok=True)
