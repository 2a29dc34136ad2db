"""Each CLI option is declared once, its default taken from the settings dataclasses; make passes only what
the user set."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from builder import settings as s
from builder.__main__ import build_parser
from builder.cli.args import field_default

ROOT = Path(__file__).resolve().parents[1]


def _subparser(name):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[name]


def test_repo_defaults_are_the_settings_defaults():
    args = build_parser().parse_args(["repo"])
    repo, batching = s.RepoSettings(), s.Batching()
    assert (args.max_batch_size, args.max_queue_delay_us, args.max_queue_size, args.queue_timeout_us,
            args.priority_levels) == (batching.max_batch_size, batching.max_queue_delay_us, batching.max_queue_size,
                                      batching.queue_timeout_us, batching.priority_levels)
    assert (args.opset, args.version, args.output, args.preprocess, args.engine, args.gpu_photo_path,
            args.gpu_decoder) == (repo.opset, repo.version, repo.output, repo.preprocess, repo.engine,
                                  repo.gpu_photo_path, repo.gpu_decoder)
    assert args.preprocess_max_batch_size is None  # the same as --max-batch-size
    assert args.hybrid_local_batch == repo.hybrid_local_batch
    assert args.instance_count == repo.classifier_instances.count
    assert args.preprocess_instances == repo.preprocess_instances.count
    assert (args.max_abs, args.min_cosine) == (repo.parity.max_abs, repo.parity.min_cosine)
    assert (args.seed, args.model_kwargs, args.checkpoint) == (0, "{}", None) == (
        s.ModelSource().seed, s.ModelSource().model_kwargs, s.ModelSource().checkpoint)


def test_shared_options_are_declared_once():
    """The model and parity options come from one group each, the same in every parser that has them."""
    for name in ("repo", "export"):
        groups = {g.title: {a.dest for a in g._group_actions} for g in _subparser(name)._action_groups}
        assert {"model", "pretrained", "checkpoint", "model_kwargs", "seed"} <= groups["model"], name
        assert {"max_abs", "min_cosine"} <= groups["parity gate"], name
    quantize = build_parser().parse_args(["quantize", "--onnx", "a", "--calibration", "b", "--output", "c"])
    assert (quantize.max_abs, quantize.min_cosine, quantize.min_top1) == (
        s.LOW_PRECISION_PARITY.max_abs, s.LOW_PRECISION_PARITY.min_cosine, s.LOW_PRECISION_PARITY.min_top1)
    from builder.engines.trt import main

    assert callable(main)  # imports with the shared group (TensorRT-only Pythons run it)

    assert field_default(s.RepoSettings, "parity") == s.Parity()


def _make_argv(target: str, *variables: str) -> list:
    """The argv of the `-m builder`/`-m perf` line that `make -n target VAR=value...` prints, split as the shell
    would. Run as a user would, not as a child of `make test` (whose flags and variables reach a sub-make)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", target, *variables],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.replace("\\\n", " ").splitlines() if " -m builder " in line or " -m perf " in line)
    return shlex.split(line)


def _value_after(argv: list, flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_make_passes_only_what_the_user_set():
    assert _make_argv("repo")[-4:] == ["builder", "repo", "--output", "model_repository"]
    set_by_user = _make_argv("repo", "MAX_BATCH=8", "PREPROCESS=gpu", "ENGINE=inductor", "MAX_QUEUE=0",
                             "PREPROCESS_INSTANCES=6", "GPU_PHOTO_PATH=hybrid", "PREPROCESS_MAX_BATCH=4",
                             "HYBRID_LOCAL_BATCH=2")
    for option, value in (("--max-batch-size", "8"), ("--max-queue-size", "0"), ("--preprocess", "gpu"),
                          ("--engine", "inductor"), ("--preprocess-instances", "6"), ("--gpu-photo-path", "hybrid"),
                          ("--preprocess-max-batch-size", "4"), ("--hybrid-local-batch", "2")):
        assert _value_after(set_by_user, option) == value
    assert not {"--preferred-batch-sizes", "--max-queue-delay-us", "--model"} & set(set_by_user)
    assert not {"--preprocess-max-batch-size", "--hybrid-local-batch"} & set(_make_argv("repo"))
    assert "--mps" in _make_argv("serve", "MPS=1") and "--mps" not in _make_argv("serve")


def test_make_passes_values_with_spaces_and_quotes_whole():
    kwargs = '{"embed_dim": 32, "note": "it\'s \\"quoted\\""}'
    argv = _make_argv("repo", "REPO=my repo/with space", f"MODEL_KWARGS={kwargs}", "WEIGHTS=/tmp/my weights.pt",
                      "NAME=swin.v2", "PREFERRED=32,64")
    assert _value_after(argv, "--output") == "my repo/with space"
    assert _value_after(argv, "--model-kwargs") == kwargs
    assert _value_after(argv, "--checkpoint") == "/tmp/my weights.pt"
    assert _value_after(argv, "--name") == "swin.v2"
    assert _value_after(argv, "--preferred-batch-sizes") == "32,64"
    assert _value_after(_make_argv("serve", "REPO=a b"), "--repository") == "a b"
    assert _make_argv("check", "REPO=a b")[-1] == "a b"


def _recipes() -> dict:
    """Makefile target -> its recipe text."""
    recipes, target = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([a-z][a-z-]*):", line)
        if match:
            target = match.group(1)
            recipes[target] = ""
        elif line.startswith("\t") and target:
            recipes[target] += line + "\n"
    return recipes


# Make's own variables, not settings a user passes.
MAKE_INTERNAL = {"PY", "PYTHON", "STAMP", "VENV", "WEIGHT_ARGS", "MAKE", "ANALYZER_VENV"}


def test_make_help_names_every_variable_each_target_takes():
    shown = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    recipes = _recipes()
    for target in ("repo", "check", "serve", "stop", "test", "test-gpu", "analyze", "clean"):
        assert f"make {target} " in shown, target
        used = set(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", recipes[target])) - MAKE_INTERNAL
        missing = sorted(name for name in used if not re.search(rf"\b{name}\b", shown))
        assert not missing, f"make help does not name {missing} that `make {target}` takes"


def test_builder_stop_takes_only_what_it_uses():
    """stop finds its server by the workdir alone: it offers no ports or repository that it would ignore."""
    stop = {a.dest for a in _subparser("stop")._actions} - {"help", "verbose"}
    assert stop == {"workdir"}
