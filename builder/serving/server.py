"""A real tritonserver without Docker: the binary inside `nvidia-pytriton==0.7.0`.

That wheel bundles tritonserver 2.51.0 (NGC 24.10) with only the Python
backend. Its binary runs directly once it has three things: a writable copy of
its folder with the Python backend stub of our Python version placed in
`backends/python/`, its bundled libraries on LD_LIBRARY_PATH, and our virtual
environment's `bin` first on PATH (the stub takes its Python environment from
`python3` on PATH and ignores PYTHONPATH).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple
import importlib.util
import secrets
import tempfile

from builder.core import contract as C
from builder.errors import BuilderError
from builder.core import procs
from builder.core.mps import MpsDaemon

log = logging.getLogger("builder")
MODEL_CONTROL = ("none", "poll", "explicit")
# What tritonserver exports on its metrics port: nothing; its counters and gauges (its own default); or those plus
# latency summaries (quantiles computed in the server on every request).
METRICS_FLAGS = {"off": ("--allow-metrics=false",), "counters": (),
                 "summaries": ("--metrics-config=summary_latencies=true",)}
METRICS = tuple(METRICS_FLAGS)
# Triton's admin APIs that only requests with the admin key may use: loading, unloading and reconfiguring
# models (model-repository), tracing and log settings. Inference, health, metadata, model configs (read only;
# generic Triton clients read them) and statistics stay open.
RESTRICTED = ("model-repository", "trace", "logging")
ADMIN_HEADER = "triton-admin-key"
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"


def admin_headers(key: Optional[str], protocol: str = "http") -> Optional[dict]:
    """Request headers that carry the admin key (Triton's gRPC server expects its own prefix)."""
    if not key:
        return None
    return {(ADMIN_HEADER if protocol == "http" else f"triton-grpc-protocol-{ADMIN_HEADER}"): key}


def prepare_workdir(workdir) -> Path:
    """The server's working folder, created if missing; refuses a file or a folder it cannot write.

    Raises:
        BuilderError: `workdir` is a file, cannot be created, or is not writable.
    """
    path = Path(workdir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise BuilderError(f"workdir: {workdir} is a file; pass a folder for --workdir (default .server)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuilderError(f"workdir: cannot create {workdir} ({exc.strerror or exc}); pass a --workdir in a "
                           "folder you can write") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BuilderError(f"workdir: {workdir} is not writable; pass a --workdir you can write")
    return path


def admin_key(workdir: str = ".server", create: bool = False) -> Optional[str]:
    """The admin key: $TRITON_ADMIN_KEY, else `<workdir>/admin-key` (made, mode 0600, when `create`)."""
    key = os.environ.get(ADMIN_KEY_ENV)
    if key:
        return key
    path = Path(workdir) / "admin-key"
    if path.is_file():
        return path.read_text().strip()
    if not create:
        return None

    prepare_workdir(path.parent)
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


@dataclass(frozen=True)
class ServerSettings:
    """How to run the local tritonserver.

    Attributes:
        repository: Model repository folder.
        http_port: KServe v2 HTTP port.
        grpc_port: KServe v2 gRPC port.
        metrics_port: Prometheus metrics port.
        workdir: Where the server copy, its log and pid file live.
        model_control: `none`, `poll` (rescan every `poll_seconds`) or `explicit`.
        poll_seconds: Repository poll interval for `poll`.
        load_models: Models to load at start with `explicit` (empty: all).
        admin_key: When set, the RESTRICTED APIs answer only requests with
            the header `triton-admin-key: <admin_key>` (HTTP and gRPC).
        extra_args: More tritonserver flags, passed as they are.
        extra_env: Environment variables set for tritonserver only, as (name, value) pairs (e.g.
            CUDA_VISIBLE_DEVICES to serve on some of the host's GPUs).
        mps: Start a CUDA MPS control daemon of this server's own first (`builder.core.mps`), so that its
            GPU model instances share each GPU at once instead of in time slices; quit when the server stops.
        metrics: What the metrics port exports, one of METRICS: `counters` (Triton's default, what the generated
            Prometheus rules read), `summaries` (latency quantiles too), or `off`.
    """

    repository: str = "model_repository"
    http_port: int = C.HTTP_PORT
    grpc_port: int = C.GRPC_PORT
    metrics_port: int = C.METRICS_PORT
    workdir: str = ".server"
    model_control: str = "none"
    poll_seconds: int = 2
    load_models: Tuple[str, ...] = ()
    admin_key: Optional[str] = None
    extra_args: Tuple[str, ...] = field(default_factory=tuple)
    extra_env: Tuple[Tuple[str, str], ...] = ()
    mps: bool = False
    metrics: str = "counters"

    def __post_init__(self) -> None:
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if any(not 0 < p < 65536 for p in ports) or len(set(ports)) != 3:
            raise BuilderError(f"ports: {ports} must be three different numbers in 1..65535")
        if self.model_control not in MODEL_CONTROL:
            raise BuilderError(f"model_control: {self.model_control!r} is unknown; use one of {MODEL_CONTROL}")
        if self.poll_seconds < 1:
            raise BuilderError("poll_seconds: use 1 or more")
        if self.metrics not in METRICS:
            raise BuilderError(f"metrics: {self.metrics!r} is unknown; use one of {', '.join(METRICS)}")


def free_ports(count: int) -> list:
    """Ports free on localhost right now (bound to port 0, then released): for servers nobody else should reach."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _pytriton_root() -> Path:
    # Locate without importing: only the bundled binaries are used, not PyTriton's Python API.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BuilderError("nvidia-pytriton is not installed; run `make venv` (it ships tritonserver)")
    return Path(list(spec.submodule_search_locations)[0])


def server_dir(workdir: Path) -> Path:
    """Prepares (once) a writable tritonserver folder with our Python's backend stub.

    Args:
        workdir: Folder that holds the copy.

    Returns:
        The tritonserver folder (with bin/ and backends/).
    """
    root = _pytriton_root()
    source = root / "tritonserver"
    target = Path(workdir) / "tritonserver"
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise BuilderError(f"the pytriton wheel has no Python backend stub for Python {pyver}; "
                           "use Python 3.8 to 3.13 for the virtual environment")
    marker = target / ".prepared"
    stamp = f"{source}:{pyver}:{(source / 'bin' / 'tritonserver').stat().st_mtime}:with-caches"
    if os.path.lexists(target) and not marker.is_file():
        # Only a copy this tool made (it carries the marker) is ever replaced: this folder is someone else's.
        raise BuilderError(f"workdir: {target} exists and was not made by this tool (no .prepared marker); "
                           "move it away, or pass another --workdir")
    if not (marker.is_file() and marker.read_text() == stamp):
        # Made aside and renamed into place with its marker: a copy cut short never looks like someone else's.
        aside = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=target.parent))
        try:
            shutil.copytree(source, aside / "tree", ignore=shutil.ignore_patterns("python_backend_stubs"))
            shutil.copy2(stub, aside / "tree" / "backends" / "python" / "triton_python_backend_stub")
            (aside / "tree" / ".prepared").write_text(stamp)
            shutil.rmtree(target, ignore_errors=True)  # an older copy of ours (it has the marker)
            os.rename(aside / "tree", target)
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    return target


def stub_path(workdir: Path) -> Path:
    """The Python-backend stub a server run from `workdir` starts its model processes with (in its copy)."""
    return Path(workdir) / "tritonserver" / "backends" / "python" / "triton_python_backend_stub"


def server_env(extra_lib_dirs: Sequence[str] = ()) -> dict:
    """Environment for tritonserver: bundled libraries and our venv's python3 first on PATH."""
    libs = _pytriton_root().parent / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libs), *extra_lib_dirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)  # the stub ignores it; keep the two environments identical
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # tritonserver's own Python; the stubs ignore it (see sweep_pycache)
    return env


def sweep_pycache(repository: str) -> int:
    """Removes the `__pycache__` folders that serving wrote into the repository's version folders.

    The Python backend's stub runs an isolated interpreter: it ignores PYTHONDONTWRITEBYTECODE and
    PYTHONPYCACHEPREFIX and writes the model's bytecode beside its model.py. Only a folder that holds nothing but
    bytecode of the version's own .py files is removed. Returns how many were.
    """
    removed = 0
    for cache in Path(repository).glob("*/[0-9]*/__pycache__"):
        sources = {p.stem for p in cache.parent.glob("*.py")}
        files = list(cache.iterdir()) if cache.is_dir() else []
        if files and all(f.suffix == ".pyc" and f.name.split(".")[0] in sources for f in files):
            shutil.rmtree(cache, ignore_errors=True)
            removed += 1
    return removed


class LocalServer:
    """Starts, awaits and stops one tritonserver process.

    Usable as a context manager (start + wait on enter, stop on exit), or
    detached for `make serve` with a pid file that `stop` reads.
    """

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.workdir = Path(settings.workdir).resolve()
        self.log_path = self.workdir / "tritonserver.log"
        self.pid_path = self.workdir / "tritonserver.pid"
        self.process: Optional[subprocess.Popen] = None

    @property
    def http_url(self) -> str:
        return f"{C.LOOPBACK}:{self.settings.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{C.LOOPBACK}:{self.settings.grpc_port}"

    def command(self) -> list:
        """The tritonserver command line."""
        s = self.settings
        root = server_dir(self.workdir)
        cmd = [str(root / "bin" / "tritonserver"),
               f"--model-repository={Path(s.repository).resolve()}",
               f"--backend-directory={root / 'backends'}",
               f"--cache-directory={root / 'caches'}",  # the response cache's local implementation
               f"--http-port={s.http_port}", f"--grpc-port={s.grpc_port}", f"--metrics-port={s.metrics_port}",
               f"--model-control-mode={s.model_control}",
               # Room for a full batch of FP32 images per stub without growing in 1 MB steps.
               "--backend-config=python,shm-default-byte-size=16777216",
               "--backend-config=python,shm-growth-byte-size=16777216",
               "--log-verbose=0", *METRICS_FLAGS[s.metrics]]
        if s.admin_key:
            restricted = f"{','.join(RESTRICTED)}:{ADMIN_HEADER}={s.admin_key}"
            cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        if s.model_control == "poll":
            cmd.append(f"--repository-poll-secs={s.poll_seconds}")
        if s.model_control == "explicit":
            cmd += [f"--load-model={m}" for m in s.load_models] or ["--load-model=*"]
        return cmd + list(s.extra_args)

    def start(self, wait: bool = True, timeout: float = 180.0, detach: bool = False) -> "LocalServer":
        """Starts tritonserver, logging to `<workdir>/tritonserver.log`.

        Args:
            wait: Block until the server is ready.
            timeout: Seconds to wait for readiness.
            detach: Run in its own session so it outlives this process.

        Raises:
            BuilderError: Repository missing, ports taken, server exited or not ready in time.
        """
        if not Path(self.settings.repository).is_dir():
            raise BuilderError(f"repository {self.settings.repository!r} does not exist; run `make repo` first")
        if not any(Path(self.settings.repository).glob("*/config.pbtxt")):  # "ready" would then mean nothing
            raise BuilderError(f"repository {self.settings.repository!r} holds no models (no <model>/config.pbtxt); "
                               "build one with `make repo FLAVOR=local`, or pass --repository")
        prepare_workdir(self.workdir)
        self._check_backends()
        if self.running_pid():
            raise BuilderError(f"a tritonserver started from {self.workdir} is already running "
                               f"(pid {self.running_pid()}); stop it with `make stop`")
        self.end_leftovers()  # a killed server's stubs still hold their GPU memory (and an MPS daemon's clients)
        self._check_ports()
        cmd = self.command()
        shown = " ".join(cmd)
        if self.settings.admin_key:  # logs end up in CI output and tickets: never the key itself
            shown = shown.replace(self.settings.admin_key, "<admin key>")
        env = {**server_env(), **dict(self.settings.extra_env)}
        if self.settings.mps:
            daemon = MpsDaemon(self.workdir)
            daemon.start()
            env.update(daemon.env())
        log.info("starting tritonserver: %s", shown)
        try:
            with self.log_path.open("wb") as logfile:
                self.process = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                                                cwd=self.workdir, start_new_session=detach)
        except OSError:
            MpsDaemon(self.workdir).stop()
            raise
        try:  # from here an interrupt or a failure stops what was started before it leaves
            self.pid_path.write_text(str(self.process.pid))
            if wait:
                self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _check_backends(self) -> None:
        """Refuses a repository that needs backends this server lacks (before starting it)."""
        from builder.repository.check import missing_backends

        available = {p.name for p in (server_dir(self.workdir) / "backends").iterdir() if p.is_dir()}
        missing = missing_backends(Path(self.settings.repository), available)
        if missing:
            raise BuilderError(
                f"the local tritonserver has only the {', '.join(sorted(available))} backend, but "
                f"{', '.join(f'{m} needs {b}' for m, b in missing)}; this is the `container` flavor: rebuild it "
                "with `make repo FLAVOR=local` (builder repo --flavor local) to serve here, or serve this one in "
                "NVIDIA's tritonserver container (make serve-docker)")

    def _check_ports(self) -> None:
        """Refuses ports another process holds: its answers would look like ours."""
        s = self.settings
        for flag, port in (("--http-port", s.http_port), ("--grpc-port", s.grpc_port),
                           ("--metrics-port", s.metrics_port)):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like tritonserver: TIME_WAIT is free
                try:
                    sock.bind(("0.0.0.0", port))
                except OSError:
                    raise BuilderError(f"port {port} is in use by another process; stop it, or pass another "
                                       f"{flag} (make serve {flag[2:].replace('-', '_').upper()}=...)") from None

    def _started_services(self) -> bool:
        """True once our own server's log says its HTTP service listens on our port."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return False
        return f"Started HTTPService at 0.0.0.0:{self.settings.http_port}" in text

    def running_pid(self) -> Optional[int]:
        """The pid in the pid file if that process is alive and is our tritonserver, else None.

        A pid file outlives its server (a reboot, a kill -9), and the pid may since belong to another
        process: it is ours only when its command line runs the tritonserver copied into our workdir. Without
        a pid file (the workdir was removed under a running server, e.g. by `make clean`), the server is found
        by that command line, which outlives the files.
        """
        binary = str(self.workdir / "tritonserver" / "bin" / "tritonserver")
        if not self.pid_path.is_file():
            found = procs.find(lambda pid, argv: argv[0] == binary)
            return found[0] if found else None
        try:
            pid = int(self.pid_path.read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        line = procs.argv(pid)
        if line is None:
            return pid  # no /proc here: the liveness check is all there is
        argv0 = line[0] if line else ""
        if argv0 != binary:
            log.warning("%s names pid %d, which is not a tritonserver of %s (it runs %s); leaving it alone",
                        self.pid_path, pid, self.workdir, argv0 or "?")
            return None
        return pid

    def log_tail(self, lines: int = 25) -> str:
        """The last lines of the server log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def is_ready(self) -> bool:
        """True when /v2/health/ready answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Polls readiness; a server that exits or times out raises with its log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BuilderError(f"tritonserver exited with code {self.process.returncode} while starting; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            # Readiness counts only from the process we started, once its own log shows it listening:
            # another server on the port would answer the probe too.
            if self._started_services() and self.is_ready() and (self.process is None or self.process.poll() is None):
                log.info("tritonserver ready: HTTP %s, gRPC %s", self.http_url, self.grpc_url)
                sweep_pycache(self.settings.repository)  # the models are loaded: their stubs wrote it by now
                return
            time.sleep(0.5)
        raise BuilderError(f"tritonserver was not ready after {timeout:.0f} s; log {self.log_path}:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """Stops the server (SIGTERM, then SIGKILL) and returns its exit code if known.

        Only our own process is signalled: the one this object started, or the pid file's when it is a
        tritonserver of our workdir. Then what it left is ended (`end_leftovers`): its model processes, after
        10 s to end on their own, and its MPS daemon.
        """
        pid = self.process.pid if self.process is not None else self.running_pid()
        code = None
        repository = self._served_repository(pid)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pid = None
        if pid:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process is not None:
                    if self.process.poll() is not None:
                        code = self.process.returncode
                        break
                else:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                time.sleep(0.2)
            else:
                log.warning("tritonserver did not stop in %.0f s; killing it", timeout)
                os.kill(pid, signal.SIGKILL)
                if self.process is not None:
                    code = self.process.wait()
        self.pid_path.unlink(missing_ok=True)
        self.process = None
        self.end_leftovers(grace=10.0)
        if repository:  # versions loaded while it served (poll, explicit) wrote theirs after the start
            sweep_pycache(repository)
        return code

    def _served_repository(self, pid: Optional[int]) -> Optional[str]:
        """The repository the server runs on: ours if this object started it, else its command line's."""
        if self.process is not None:
            return self.settings.repository
        line = procs.argv(pid) if pid else None
        return next((arg.split("=", 1)[1] for arg in line or () if arg.startswith("--model-repository=")), None)

    def stub_pids(self):
        """The Python-backend stub processes of a server run from this workdir (they run its copied stub)."""
        stub = str(stub_path(self.workdir))
        return procs.find(lambda pid, argv: argv[0] == stub)

    def end_leftovers(self, grace: float = 0.0) -> int:
        """Ends what a server of this workdir left once it is gone: its stubs, then its MPS daemon.

        Stubs end on their own when the server exits; a server killed after its stop timeout left them
        running on an H200 under MPS, for minutes, holding their CUDA contexts, and the MPS daemon, which
        does not quit while it has clients, made the next `serve --mps` fail.

        Args:
            grace: Seconds the stubs get to end on their own before they are killed.

        Returns:
            How many stub processes had to be killed.
        """
        if self.running_pid():
            return 0  # a server runs: the stubs are its own
        left = procs.wait_gone(self.stub_pids(), grace)
        if left:
            log.warning("a tritonserver of %s that is gone left %d model process(es) (Python-backend stubs, "
                        "pids %s); killing them", self.workdir, len(left), " ".join(map(str, left)))
            stuck = procs.kill(left)
            if stuck:
                log.warning("model processes %s did not end after SIGKILL", " ".join(map(str, stuck)))
        MpsDaemon(self.workdir).stop()  # after the server and its stubs: the daemon's last clients
        return len(left)

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
