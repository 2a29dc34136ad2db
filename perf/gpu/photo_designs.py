"""The photo path's other designs beside a `--preprocess gpu` repository's photo-path model, and their knobs.

    python perf/gpu/photo_designs.py write REPO NAME   # <NAME>_fused and <NAME>_ensemble3 beside the photo path
    python perf/gpu/photo_designs.py set REPO NAME [--decoder D] [--threads N] [--instances N] [--graphs 0|1]
                                                  [--profile N --trace-dir DIR]
    python perf/gpu/photo_designs.py copy REPO SOURCE TARGET [the knobs of set, --buckets B,B,..., --classifier M,
                                                                  --max-batch N, --queue-delay-us N, --local-batch N]
    python perf/gpu/photo_designs.py null REPO NAME   # <NAME>_null: the photo path's tensors, no work

`write` adds, on the same classifier: `<NAME>_fused` (the photo path with the classifier's inductor engine in its
own process, as `--gpu-photo-path fused` writes it) and `<NAME>_ensemble3` (preprocess -> classifier ->
postprocess chained by Triton: the design the build dropped, kept here to compare). `set` changes config
parameters of the photo-path and fused models: the decoder, torch's CPU threads, GPU instances, the transform's
CUDA graphs, and the per-phase profile and trace.
`copy` serves a model again under another name with some knobs changed (variants side by side on one server);
`null` writes a model with the photo path's config that answers without work: the serving stack's ceiling.
"""

import argparse
import shutil
import sys
from pathlib import Path

from builder.repository import configs, models
from builder.core.contract import LABELS_FILE, Contract
from builder.core.manifest import read_manifest
from builder.settings import Batching, InstanceGroup, RepoSettings, VersionPolicy


def write(repo: Path, name: str) -> None:
    manifest = read_manifest(repo)
    contract = Contract(name, tuple(manifest["contract"]["tensors"]["input"]["dims"][1:]),
                        manifest["model"]["num_classes"])
    photo_path = configs.read(repo / name / "config.pbtxt")
    params = {k: v.string_value for k, v in photo_path.parameters.items()
              if k not in ("classifier", "classifier_input", "classifier_output", "classifier_max_batch",
                           "local_max_batch")}
    classifier = configs.read(repo / contract.classifier / "config.pbtxt")
    cls_params = configs.parameters(classifier)
    queue = photo_path.dynamic_batching.default_queue_policy  # the fused model queues as the photo path does
    settings = RepoSettings(engine="inductor", preprocess="gpu", gpu_photo_path="fused",
                            classifier_batching=Batching(classifier.max_batch_size, (), 0),
                            preprocess_batching=Batching(photo_path.max_batch_size, (), 0, queue.max_queue_size,
                                                         queue.default_timeout_microseconds),
                            preprocess_instances=InstanceGroup("KIND_GPU", photo_path.instance_group[0].count))
    version = sorted(p.name for p in (repo / contract.classifier).iterdir() if p.name.isdigit())[-1]
    labels = (repo / name / LABELS_FILE).read_text(encoding="utf-8").splitlines()
    fused = repo / f"{name}_fused"
    config = models.write_photo_path(fused / version, settings, contract, params, labels,
                                    (repo / contract.classifier / version, cls_params))
    config.name = fused.name
    configs.write(config, fused)
    config = configs.ensemble(contract, manifest["contract"]["max_batch_size"], VersionPolicy())
    config.name = f"{name}_ensemble3"
    (repo / config.name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy2(repo / name / LABELS_FILE, repo / config.name / LABELS_FILE)  # the labels its outputs carry
    configs.write(config, repo / config.name)
    print("wrote", fused.name, "and", config.name)


def _changes(args) -> dict:
    return {"decoder": args.decoder, "intra_op_threads": args.threads, "profile_every": args.profile,
            "trace_dir": args.trace_dir if args.profile else "", "batch_buckets": args.buckets,
            "classifier": args.classifier, "local_max_batch": args.local_batch, "transform_graphs": args.graphs}


def _apply(config, args) -> None:
    for key, value in _changes(args).items():
        if value:
            config.parameters[key].string_value = value
    if args.instances:
        config.instance_group[0].count = int(args.instances)
    if args.queue_delay_us:  # a classifier that waits longer for company runs fuller (cheaper) batches
        config.dynamic_batching.max_queue_delay_microseconds = int(args.queue_delay_us)
    if args.max_batch:  # shorter batches: a request waits behind less work (the p99 at high concurrency)
        config.max_batch_size = int(args.max_batch)
        sizes = [b for b in config.dynamic_batching.preferred_batch_size if b <= config.max_batch_size]
        del config.dynamic_batching.preferred_batch_size[:]
        config.dynamic_batching.preferred_batch_size.extend(sizes)


def _show(config, args) -> None:
    print(config.name, {k: v.string_value for k, v in config.parameters.items() if k in _changes(args)},
          "instances", config.instance_group[0].count, "max batch", config.max_batch_size,
          "queue delay us", config.dynamic_batching.max_queue_delay_microseconds)


def set_parameters(repo: Path, name: str, args) -> None:
    for folder in (repo / name, repo / f"{name}_fused"):
        if not folder.is_dir():
            continue
        config = configs.read(folder / "config.pbtxt")
        _apply(config, args)
        configs.write(config, folder)
        _show(config, args)


def copy(repo: Path, source: str, target: str, args) -> None:
    """`source` again as `target` (files linked where the file system allows), with the knobs changed."""
    shutil.rmtree(repo / target, ignore_errors=True)
    shutil.copytree(repo / source, repo / target, copy_function=models._link_or_copy,
                    ignore=shutil.ignore_patterns("config.pbtxt"))
    config = configs.read(repo / source / "config.pbtxt")
    config.name = target
    _apply(config, args)
    configs.write(config, repo / target)
    _show(config, args)


def null(repo: Path, name: str) -> None:
    """`<name>_null`: the photo-path model's config, a model.py that answers without work."""
    config = configs.read(repo / name / "config.pbtxt")
    config.name = f"{name}_null"
    config.ClearField("parameters")
    # The source's newest version number: its version policy, copied with the config, may name it.
    version = repo / config.name / sorted((p.name for p in (repo / name).iterdir() if p.name.isdigit()), key=int)[-1]
    version.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(__file__).with_name("null_model.py"), version / "model.py")
    shutil.copy2(repo / name / LABELS_FILE, repo / config.name / LABELS_FILE)  # the labels its outputs carry
    configs.write(config, repo / config.name)
    print("wrote", config.name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("write", "set", "copy", "null"))
    parser.add_argument("repo", type=Path)
    parser.add_argument("name")
    parser.add_argument("target", nargs="?", help="copy: the new model's name")
    parser.add_argument("--decoder", default="")
    parser.add_argument("--threads", default="")
    parser.add_argument("--instances", default="")
    parser.add_argument("--profile", default="")
    parser.add_argument("--graphs", default="", choices=("", "0", "1"),
                        help="small batches' transforms as CUDA graphs (1) or eager (0)")
    parser.add_argument("--trace-dir", default="")
    parser.add_argument("--buckets", default="", help="the fused engine's CUDA-graph batch sizes, e.g. 1,2,4,...")
    parser.add_argument("--max-batch", default="", help="the model's max batch size (requests)")
    parser.add_argument("--local-batch", default="", help="a fused or hybrid model's largest batch classified in "
                                                           "its own process (larger: BLS; 0: BLS only)")
    parser.add_argument("--queue-delay-us", default="", help="the model's dynamic batcher delay (microseconds)")
    parser.add_argument("--classifier", default="", help="the photo path's classifier model (e.g. a copy with other "
                        "instances)")
    args = parser.parse_args(argv)
    if args.action == "write":
        write(args.repo, args.name)
    elif args.action == "copy":
        copy(args.repo, args.name, args.target, args)
    elif args.action == "null":
        null(args.repo, args.name)
    else:
        set_parameters(args.repo, args.name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
