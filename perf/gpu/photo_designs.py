"""The photo path's other designs beside a `--preprocess gpu` repository's pipeline model, and their knobs.

    python perf/gpu/photo_designs.py write REPO NAME   # <NAME>_fused and <NAME>_ensemble3 beside the pipeline
    python perf/gpu/photo_designs.py set REPO NAME [--decoder D] [--threads N] [--instances N]
                                                  [--profile N --trace-dir DIR]

`write` adds, on the same classifier: `<NAME>_fused` (the pipeline with the classifier's inductor engine in its
own process, as `--gpu-photo-path fused` writes it) and `<NAME>_ensemble3` (preprocess -> classifier ->
postprocess chained by Triton, as `--gpu-photo-path ensemble` writes it). `set` changes config parameters of the
pipeline and fused models: the decoder, torch's CPU threads, GPU instances, and the per-phase profile and trace.
"""

import argparse
import sys
from pathlib import Path

from builder.repository import configs, models
from builder.core.contract import Contract
from builder.core.manifest import read_manifest
from builder.settings import Batching, InstanceGroup, RepoSettings, VersionPolicy


def write(repo: Path, name: str) -> None:
    manifest = read_manifest(repo)
    contract = Contract(name, tuple(manifest["contract"]["tensors"]["input"]["dims"][1:]),
                        manifest["model"]["num_classes"])
    pipeline = configs.read(repo / name / "config.pbtxt")
    params = {k: v.string_value for k, v in pipeline.parameters.items()
              if k not in ("classifier", "classifier_input", "classifier_output", "classifier_max_batch")}
    classifier = configs.read(repo / contract.classifier / "config.pbtxt")
    cls_params = {k: v.string_value for k, v in classifier.parameters.items()}
    queue = pipeline.dynamic_batching.default_queue_policy  # the fused model queues as the pipeline does
    settings = RepoSettings(engine="inductor", preprocess="gpu", gpu_photo_path="fused",
                            classifier_batching=Batching(classifier.max_batch_size, (), 0),
                            preprocess_batching=Batching(pipeline.max_batch_size, (), 0, queue.max_queue_size,
                                                         queue.default_timeout_microseconds),
                            preprocess_instances=InstanceGroup("KIND_GPU", pipeline.instance_group[0].count))
    version = sorted(p.name for p in (repo / contract.classifier).iterdir() if p.name.isdigit())[-1]
    labels = (repo / name / version / "labels.txt").read_text(encoding="utf-8").splitlines()
    fused = repo / f"{name}_fused"
    config = models.write_pipeline(fused / version, settings, contract, params, labels,
                                    (repo / contract.classifier / version, cls_params))
    config.name = fused.name
    configs.write(config, fused)
    config = configs.ensemble(contract, manifest["contract"]["max_batch_size"], VersionPolicy())
    config.name = f"{name}_ensemble3"
    (repo / config.name / "1").mkdir(parents=True, exist_ok=True)
    configs.write(config, repo / config.name)
    print("wrote", fused.name, "and", config.name)


def set_parameters(repo: Path, name: str, args) -> None:
    changes = {"decoder": args.decoder, "intra_op_threads": args.threads, "profile_every": args.profile,
               "trace_dir": args.trace_dir if args.profile else ""}
    for folder in (repo / name, repo / f"{name}_fused"):
        if not folder.is_dir():
            continue
        config = configs.read(folder / "config.pbtxt")
        for key, value in changes.items():
            if value:
                config.parameters[key].string_value = value
        if args.instances:
            config.instance_group[0].count = int(args.instances)
        configs.write(config, folder)
        print(folder.name, {k: v.string_value for k, v in config.parameters.items() if k in changes},
              "instances", config.instance_group[0].count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("write", "set"))
    parser.add_argument("repo", type=Path)
    parser.add_argument("name")
    parser.add_argument("--decoder", default="")
    parser.add_argument("--threads", default="")
    parser.add_argument("--instances", default="")
    parser.add_argument("--profile", default="")
    parser.add_argument("--trace-dir", default="")
    args = parser.parse_args(argv)
    if args.action == "write":
        write(args.repo, args.name)
    else:
        set_parameters(args.repo, args.name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
