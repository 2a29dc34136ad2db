"""Each CLI option is declared once, its default taken from the settings dataclasses; make passes only what
the user set."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from builder import settings as s
from builder.__main__ import build_parser
from builder.args import field_default

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


def test_make_passes_only_what_the_user_set():
    # Run as a user would, not as a child of `make test` (whose flags and variables reach a sub-make).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}

    def command(*variables):
        out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "repo", *variables],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        return " ".join(out.replace("\\\n", " ").split())

    assert command().endswith("-m builder repo --output model_repository")
    set_by_user = command("MAX_BATCH=8", "PREPROCESS=gpu", "ENGINE=inductor", "MAX_QUEUE=0", "PREPROCESS_INSTANCES=6",
                          "GPU_PHOTO_PATH=hybrid", "PREPROCESS_MAX_BATCH=4", "HYBRID_LOCAL_BATCH=2")
    assert "--max-batch-size 8 --preferred" not in set_by_user
    for option in ("--max-batch-size 8", "--max-queue-size 0", "--preprocess gpu", "--engine inductor",
                   "--preprocess-instances 6", "--gpu-photo-path hybrid", "--preprocess-max-batch-size 4",
                   "--hybrid-local-batch 2"):
        assert option in set_by_user
    assert "--max-queue-delay-us" not in set_by_user and "--model " not in set_by_user
    assert "--preprocess-max-batch-size" not in command() and "--hybrid-local-batch" not in command()
    serve = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "serve", "MPS=1"], cwd=ROOT,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert "--mps" in serve and "--mps" not in command()


def test_the_gpu_path_runs_on_gpu_instances_from_the_library_too():
    """`RepoSettings(preprocess="gpu")` as a library gets the same GPU instances as the CLI gives it."""
    assert s.RepoSettings(preprocess="gpu").preprocess_instances == s.InstanceGroup("KIND_GPU", 2)
    assert s.RepoSettings().preprocess_instances == s.InstanceGroup("KIND_CPU", 2)
    cli = build_parser().parse_args(["repo", "--preprocess", "gpu"])
    assert s.default_preprocess_instances(cli.preprocess, cli.preprocess_instance_kind, cli.preprocess_instances) \
        == s.RepoSettings(preprocess="gpu").preprocess_instances


def test_verbose_after_the_subcommand_and_the_options_given():
    from builder.cli_parser import build_parser, given_options

    parser = build_parser()
    assert parser.parse_args(["check", "r", "-v"]).verbose and parser.parse_args(["-v", "check", "r"]).verbose
    assert not parser.parse_args(["check", "r"]).verbose
    # Given on the command line, even at its default value: what a new version's config takes over the served one.
    assert given_options(["repo", "--instance-count", "1", "--add-version"]) == {"instance_count", "add_version"}
