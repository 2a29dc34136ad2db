"""Every command of the README runs as written on a CPU host (the tiny Swin through Make's MODEL_KWARGS).

The README's code blocks are read in order and run in a copy of the project: the
Make variables that choose the model size and the ports come from the
environment, and the fixed ports of the examples are mapped to free ones.
Commands that need Docker or a GPU are listed in SKIPPED with the reason; a new
README command that is neither runnable nor listed fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_KWARGS, free_ports, project_copy

ROOT = Path(__file__).resolve().parents[1]
# The README's GPU quick start begins so (tests/gpu runs it as written).
GPU_QUICK_START = "make repo FLAVOR=local PREPROCESS=gpu"
SKIPPED = {
    "make test": "this suite",
    "docker build": "needs a Docker engine",
    "docker run": "needs a Docker engine and a GPU",
    "make plan-docker": "needs a Docker engine and a GPU",
    "make serve-docker": "needs a Docker engine and a GPU",
    "bash perf/gpu/": "needs a GPU",
    GPU_QUICK_START: "the GPU quick start: needs a GPU (tests/gpu builds and serves it with these commands)",
}
# perf_analyzer measures briefly here: the grid is the README's, each point one measurement over a few requests
# (time windows on a 2-core host that also runs the server did not settle, and a failed point fails the sweep).
FAST_PERF = " --request-count 48"


def readme_commands() -> list:
    """(language, command) pairs from the README's bash and python blocks, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for language, body in re.findall(r"```(bash|python)\n(.*?)```", text, re.S):
        if language == "python":
            commands.append(("python", body))
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(("bash", line))
    return commands


def _skip_reason(command: str):
    return next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)


@pytest.mark.parametrize("command", [c for _, c in readme_commands() if _skip_reason(c)])
def test_readme_command_needs_another_host(command):
    """Each README command this host cannot run is reported as a skip, with the reason."""
    pytest.skip(f"{command!r}: {_skip_reason(command)}")


def make_commands_of(line: str) -> list:
    """The `make` invocations of a README line (`make a X=1 && make b`), each as its argument list."""
    import shlex

    return [shlex.split(part) for part in line.split("&&") if part.strip().startswith("make ")]


def test_readme_gpu_commands_parse_here():
    """Every make command of the README this host cannot run resolves, through the Makefile, to a builder command
    whose options the builder takes."""
    from builder.cli.parser import build_parser
    from test_cli_args import _make_argv

    gpu_lines = [c for _, c in readme_commands() if c.startswith(GPU_QUICK_START)]
    assert gpu_lines, f"the README has no GPU quick start ({GPU_QUICK_START} ...)"
    checked = 0
    for line in [c for _, c in readme_commands() if _skip_reason(c)]:
        for make in make_commands_of(line):
            targets = [a for a in make[1:] if "=" not in a]
            if not {"repo", "serve"} & set(targets):
                continue
            argv = _make_argv(targets[0], *[a for a in make[1:] if "=" in a])
            build_parser().parse_args(argv[argv.index("builder") + 1:])  # exits (fails the test) on a bad option
            checked += 1
    assert checked >= 2


@pytest.mark.server
def test_readme_commands_run_as_written(tmp_path, photo_paths, tiny_model):
    from safetensors.torch import save_file

    commands = readme_commands()
    assert any(c.startswith("make repo FLAVOR=local") for _, c in commands)
    work = project_copy(tmp_path)
    os.symlink(ROOT / ".venv", work / ".venv")
    photos = work / "photos"
    photos.mkdir()
    for path in photo_paths[:4]:
        shutil.copy(path, photos / path.name)
    shutil.copy(photo_paths[3], work / "cat.jpg")  # the names the Python example uses
    shutil.copy(photo_paths[1], work / "dog.png")
    save_file({k: v.clone() + 0.01 for k, v in tiny_model.module.state_dict().items()}, str(work / "new.safetensors"))
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, MODEL_KWARGS=TINY_KWARGS, HTTP_PORT=str(http), GRPC_PORT=str(grpc),
               METRICS_PORT=str(metrics), PYTHONPATH=str(work))
    env.pop("MAKEFLAGS", None)

    def ports(text: str) -> str:
        return text.replace("127.0.0.1:8001", f"127.0.0.1:{grpc}").replace("127.0.0.1:8000", f"127.0.0.1:{http}")

    ran, skipped = [], []
    try:
        for language, command in commands:
            if language == "python":
                argv, shell = [sys.executable, "-c", ports(command)], False
            else:
                reason = _skip_reason(command)
                if reason:
                    skipped.append((command, reason))
                    continue
                assert "…" not in command, f"README command is not runnable as written: {command}"
                shell_command = ports(command)
                if "-m perf sweep" in command or "-m perf tune" in command:
                    shell_command += f" --http-url 127.0.0.1:{http} --grpc-url 127.0.0.1:{grpc}" + FAST_PERF
                argv, shell = shell_command, True
            result = subprocess.run(argv, shell=shell, cwd=work, env=env, capture_output=True, text=True,
                                    timeout=600, executable="/bin/bash" if shell else None)
            assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
            ran.append(command)
    finally:
        subprocess.run(["make", "stop"], cwd=work, env=env, capture_output=True, timeout=120)
    assert len(ran) >= 12, ran
    assert {c for c, _ in skipped} <= {c for _, c in commands}
    # What the examples wrote is real.
    assert (work / "results.jsonl").read_text().count("\n") == 4
    assert (work / "sweep" / "report.md").is_file() and (work / "bare.json").is_file()
    manifest = (work / "model_repository" / "manifest.json").read_text()
    assert '"flavor": "local"' in manifest and "checkpoint:new.safetensors" in manifest
