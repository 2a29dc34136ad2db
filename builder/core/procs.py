"""The processes a server of ours may leave behind, found through /proc (Linux; elsewhere none are found).

A tritonserver killed after its stop timeout leaves its Python-backend stubs: on an H200 under CUDA MPS, stubs
of a killed server lived on for minutes, each holding its CUDA context and the MPS server (which does not quit
while it has clients), so the next `serve --mps` failed. What is ours is told by the command line (the stub
copied into our workdir) or by the environment (the MPS pipe folder named after our workdir), never by name
alone: another user's server or daemon is left alone.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

PROC = Path("/proc")


def argv(pid: int) -> Optional[List[str]]:
    """The command line `pid` runs; None when it cannot be read (no /proc, or the process is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def environment(pid: int) -> Dict[str, str]:
    """The environment `pid` was started with (empty when it cannot be read: another user's process)."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return {}
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0") if part)
    return {key: value for key, _, value in pairs}


def find(match: Callable[[int, List[str]], bool]) -> List[int]:
    """The pids (not this process) whose command line `match(pid, argv)` accepts."""
    if not PROC.is_dir():
        return []
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            line = argv(pid)
            if line and match(pid, line):
                found.append(pid)
    return sorted(found)


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, which holds nothing but its exit status, counts as ended)."""
    try:
        state = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state not in ("Z", "X")


def wait_gone(pids: Iterable[int], timeout: float) -> List[int]:
    """Waits up to `timeout` s for `pids` to end; returns those still running."""
    left = [p for p in pids if alive(p)]
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def kill(pids: Iterable[int], timeout: float = 5.0) -> List[int]:
    """SIGKILLs `pids` and waits for them to end; returns those that did not (another user's, or stuck in the kernel)."""
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return wait_gone(pids, timeout)
