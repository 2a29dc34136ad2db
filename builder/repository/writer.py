"""Writing the Triton model repository: the build's steps in order, staged, checked, swapped atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple
import hashlib

from builder.core.contract import Contract, contract_tensors
from builder.core.manifest import read_manifest, write_manifest_file
from builder.engines.race import race
from builder.errors import BuilderError
from builder.meta import package_versions
from builder.repository.output import carry_over, check_output, clean_stale, staging_dir, swap_into_place
from builder.repository.readme import write_readme
from builder.repository.models import LOAD_GATE, labels_text, write_models, write_photo_path_model
from builder.repository.monitoring_files import check_monitoring_output, monitoring_dir, render, write_monitoring
from builder.repository.versions import contract_changes, move_version_in, refuse_contract_changes, same_repository
from builder.settings import (IN_PROCESS_PHOTO_PATHS, MANY_PHOTO_PATH_INSTANCES, TRITON_RELEASE, TRITON_VERSION,
                              RepoSettings, classifier_kind)

log = logging.getLogger("builder")


def _version_entry(settings: RepoSettings, model, parity: Dict[str, float]) -> Dict:
    return {"version": settings.version, "created_unix_s": int(time.time()), "weights": model.weights,
            "timm_name": settings.source.model_name, "flavor": settings.flavor, "plan": bool(settings.plan),
            "engine": settings.engine, "preprocess": settings.preprocess,
            "parity": parity}


def build_repository(settings: RepoSettings, add_version: bool = False, overrides=()) -> Path:
    """Exports, validates and writes a complete model repository.

    The repository is built in a staging folder beside `settings.output`,
    checked with :func:`builder.repository.check.check_repository`, and only then swapped
    into place: a failed or interrupted build leaves the previous repository
    untouched.

    With `add_version`, the repository must exist: the models are written as
    the next version number beside the served ones, each new version
    directory moves in with one atomic rename, then the configs (version
    policy) and the manifest are replaced atomically. A server in poll or
    explicit model-control mode loads the new version while the old one keeps
    serving, then retires the old one per the version policy. The served
    configs keep what they were tuned in (instances, dynamic batching, version
    policy, response cache), except what `overrides` names; each difference is logged.

    Args:
        settings: What to build and where.
        add_version: Add a version to the existing repository instead of replacing it.
        overrides: With `add_version`: the `builder repo` options the user gave (dest names, e.g.
            "instance_count"), whose values win over the served configs'.

    Returns:
        The repository path.

    Raises:
        BuilderError: Any problem the user can fix (the message says which).
    """
    from builder.repository.check import check_repository
    from builder.export.onnx_export import export_onnx, validate_onnx

    output, settings, previous = _before_loading(settings, add_version)
    started = time.perf_counter()
    with staging_dir(output) as staging:
        log.info("[1/5] loading %s", settings.source.model_name)
        model, contract, params = _load(settings)
        if previous is not None:  # before the export: a version that cannot be served fails in seconds
            refuse_contract_changes(contract_changes(previous, settings, contract, labels=labels_record(model)))
        onnx_file = staging / "model.onnx"
        log.info("[2/5] exporting ONNX")
        export_onnx(model, contract, onnx_file, settings.opset)
        log.info("[3/5] validating ONNX Runtime against PyTorch")
        parity = validate_onnx(onnx_file, model, contract, settings.parity)
        raced = race(settings, model, contract, params, onnx_file, parity)
        settings, choice = _place_classifier(_photo_path(raced.settings), raced.choice), raced.choice
        designed = raced.settings.gpu_photo_path  # `auto` is settled again if the measured setup differs
        gates = {**raced.gates, **_preprocess_gate(settings, model, params)}
        log.info("[4/5] writing %s models (%s flavor)", len(contract.model_names), settings.flavor)
        # The engine gates ran on the exact preprocessing; the served one may decode JPEGs at a reduced scale.
        served = dataclasses.replace(params, jpeg_draft=settings.preprocess == "draft").to_parameters()
        if previous is not None:  # the engine is settled now
            refuse_contract_changes(contract_changes(previous, settings, contract, served))
        photo_parameters = write_models(staging, settings, contract, onnx_file, served, model.class_names)
        settings, photo = settle_photo_setup(settings, designed, staging, contract, photo_parameters,
                                              model.class_names, add_version)
        versions = (previous or {}).get("model_versions", []) + [_version_entry(settings, model, parity)]
        write_readme(staging, settings, contract, choice, {"onnxruntime_vs_pytorch": parity, **gates}, photo)
        write_manifest(staging, settings, contract, model, served, parity, versions, gates, choice, photo)
        log.info("[5/5] checking the repository")
        problems = check_repository(staging)
        if problems:
            raise BuilderError("the built repository fails its check: " + "; ".join(problems))
        # Its Prometheus rules and Grafana dashboard, for the models it serves (`builder monitoring` for other
        # settings): rendered before the repository moves in, so a failure there leaves the previous one.
        watching = render(read_manifest(staging)["contract"])
        _put_in_place(staging, output, contract, settings.version, add_version, overrides)
    watched = write_monitoring(monitoring_dir(output), watching)
    log.info("wrote %s in %.1f s: ensemble %r (Prometheus and Grafana files in %s)", output,
             time.perf_counter() - started, contract.ensemble, watched)
    return output


def _before_loading(settings: RepoSettings, add_version: bool) -> Tuple[Path, RepoSettings, Optional[Dict]]:
    """Everything about the output, checked before the model loads (a bad path fails in a second): the output
    folder, the settings (with `add_version`, the served repository's), and the served manifest (None: a new
    repository)."""
    output = check_output(Path(settings.output), replace=not add_version)
    check_monitoring_output(monitoring_dir(output))
    if settings.plan:  # a file that is not the plan its plan.json describes never reaches a repository
        from builder.engines.plan_check import verify_plan

        verify_plan(settings.plan)
    clean_stale(output)
    if not add_version:
        return output, settings, None
    previous = read_manifest(output)
    return output, same_repository(settings, previous, output), previous


def labels_record(model) -> Dict[str, str]:
    """The served class names' source and hash (every version of a model shares its labels.txt)."""
    text = labels_text(model.class_names)
    return {"source": model.labels, "count": len(model.class_names),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _load(settings: RepoSettings):
    """The timm model, the contract it gives (input size, classes) and its exact preprocessing."""
    from builder.export.model import load_model
    from builder.core.imaging import PreprocessParams

    model = load_model(settings.source)
    _, height, width = model.data_config["input_size"]
    contract = Contract(settings.model_name, (int(height), int(width)), model.num_classes)
    try:
        params = PreprocessParams.from_timm(model.data_config, settings.max_image_pixels)
    except ValueError as exc:
        raise BuilderError(f"preprocessing: {exc}") from None
    return model, contract, params


def _put_in_place(staging: Path, output: Path, contract: Contract, version: int, add_version: bool,
                  overrides=()) -> None:
    """Moves the checked build in: the new version beside the served ones, or the whole tree swapped in."""
    if add_version:
        move_version_in(staging, output, contract, version, overrides)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        # Other models and files the user keeps in the repository move into the new tree, never away.
        carry_over(output, staging)
        swap_into_place(staging, output)


def _preprocess_gate(settings: RepoSettings, model, params) -> Dict[str, Dict]:
    """The non-exact preprocessing's gate against the exact one (a build step of its own); {} for `exact`."""
    if settings.preprocess == "exact":
        return {}
    from builder.repository.preprocess_gate import preprocess_parity

    figures = preprocess_parity(model.module, params, settings.preprocess_parity, settings.preprocess)
    if settings.preprocess == "gpu":
        figures["load_gate"] = dict(LOAD_GATE)
        if not str(figures.get("device", "")).startswith("cuda"):
            figures["gate_note"] = ("gated on this build host's CPU with libjpeg-turbo, not with the serving "
                                    "GPU's decoder; the served model re-checks its decoder on its GPU when it "
                                    "loads (load_gate) and refuses to load if off")
            log.warning("the gpu preprocessing was gated on the CPU (libjpeg-turbo), not nvJPEG: the served "
                        "model checks its own decoder on %d photos when it loads", len(LOAD_GATE["photos"]))
    return {f"{settings.preprocess}_preprocess_vs_exact": figures}


def write_manifest(root: Path, settings: RepoSettings, contract: Contract, model, preprocess: Dict[str, str],
                   parity: Dict[str, float], versions: Optional[list] = None, gates: Optional[Dict] = None,
                   choice: Optional[Dict] = None, photo_setup: Optional[Dict] = None) -> Path:
    """Writes manifest.json: versions, model, weights, contract, parity, the photo path's setup and file hashes."""
    manifest = {
        "created_unix_s": int(time.time()),
        "flavor": settings.flavor,
        "target": {"tritonserver": TRITON_VERSION, "ngc_release": TRITON_RELEASE},
        "versions": {"python": platform.python_version(),
                     **package_versions("torch", "timm", "onnx", "onnxruntime", "tritonclient", "numpy", "pillow")},
        "model": {"timm_name": settings.source.model_name, "kwargs": settings.source.kwargs,
                  "weights": model.weights, "random_weights": model.weights.startswith("random:"),
                  "num_classes": model.num_classes, "data_config": model.data_config,
                  "labels": labels_record(model)},
        "contract": {
            "ensemble": contract.ensemble, "models": list(contract.model_names),
            "tensors": contract_tensors(contract),
            "max_batch_size": settings.ensemble_max_batch,  # the most images a request may carry
        },
        "model_version": settings.version,
        "model_versions": versions or [_version_entry(settings, model, parity)],
        "settings": asdict(settings),
        "preprocess": preprocess,
        "parity": {"onnxruntime_vs_pytorch": parity, **_plan_parity(settings), **(gates or {})},
        "engine": choice or {"requested": settings.engine, "chosen": settings.engine},
        # How `builder serve` serves it unless told otherwise.
        "serve": {"mps": settings.serve_with_mps},
        **({"photo_setup": photo_setup} if photo_setup else {}),
    }
    return write_manifest_file(root, manifest)


def settle_photo_setup(settings: RepoSettings, designed: str, staging: Path, contract: Contract,
                        parameters: Dict[str, str], class_names: list, add_version: bool,
                        device: Optional[str] = None) -> Tuple[RepoSettings, Optional[Dict]]:
    """A GPU photo path's processes, batch limit and MPS, measured on this host's GPU (`photo_setup.settle`);
    the staged photo-path model is written again when the winner differs. Returns the settings and the record
    for the manifest and the README (None: no GPU photo path).

    Args:
        designed: `gpu_photo_path` as given (`auto` is settled again for the measured instance count).
        device: Where to measure (tests: "cpu"); None: cuda:0 when this host has a CUDA GPU, else not measured.
    """
    wanted = settings.photo_setup
    instances, batching = settings.preprocess_instances, settings.preprocess_batching
    if settings.preprocess != "gpu" or instances.kind != "KIND_GPU":
        return settings, None
    written = {"processes": instances.count, "batch": batching.max_batch_size, "mps": settings.serve_with_mps}
    reason = None
    if wanted.mode == "fixed":
        reason = "--photo-setup fixed"
    elif settings.gpu_photo_path not in IN_PROCESS_PHOTO_PATHS:
        reason = f"the {settings.gpu_photo_path} design runs no engine in the photo path's process"
    elif add_version:
        reason = "a new version keeps the served setup"
    elif wanted.candidates < 2:
        reason = "every value given by hand"
    elif device is None:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else None
        reason = None if device else "no CUDA GPU on the build host"
    if reason:
        log.info("photo path setup not measured (%s): %s", reason, written)
        return settings, {"measured": False, "reason": reason, "chosen": written}
    from builder.core.photos import load_photo_files
    from builder.repository.photo_setup import settle

    log.info("measuring the photo path's setup on %s (%d candidates, about %.0f s each; --photo-setup fixed skips "
             "it)", device, wanted.candidates, wanted.seconds + 1)
    record = settle(staging / contract.ensemble, wanted, [p.read_bytes() for p in load_photo_files()], device)
    chosen = record["chosen"]
    measured = dataclasses.replace(
        settings, gpu_photo_path=designed, mps=chosen["mps"],
        preprocess_instances=dataclasses.replace(instances, count=chosen["processes"]),
        preprocess_batching=dataclasses.replace(batching, max_batch_size=chosen["batch"]))
    measured = _photo_path(measured)
    log.info("photo path setup measured: %d processes, batches of up to %d, MPS %s (%s design): %.0f img/s with "
             "no server", chosen["processes"], chosen["batch"], "on" if chosen["mps"] else "off",
             measured.gpu_photo_path, chosen["img_per_s"])
    if (measured.preprocess_instances, measured.preprocess_batching, measured.gpu_photo_path) != (
            instances, batching, settings.gpu_photo_path):
        shutil.rmtree(staging / contract.ensemble)
        write_photo_path_model(staging, measured, contract, parameters, class_names)
    return measured, record


def _photo_path(settings: RepoSettings) -> RepoSettings:
    """Settles `gpu_photo_path` once the engine is known: with the inductor engine `auto` is fused, or hybrid
    with `MANY_PHOTO_PATH_INSTANCES` or more GPU photo-path instances; with any other engine, bls.

    Measured on an H200 (perf/results/): with its default 2 instances fused served one photo per request at
    p50 2.5 ms at concurrency 1 (bls 5.0 ms) and 5,335 img/s at 256 (bls 4,723; h200-photo-designs).
    With 6 or 8 instances under MPS the classifier model, fed by several photo-path processes, beat each process
    running its own engine (bls 6,702 and 6,924 against fused 6,409 and 6,473; h200-photo-buckets), and
    hybrid keeps that with a lone photo in the process (8 instances: 7,493 img/s, p50 3.7 ms at concurrency 1
    against bls's 7,367 and 5.4 ms; h200-photo-hybrid).
    """
    if settings.preprocess != "gpu":
        return settings
    if settings.gpu_photo_path != "auto":  # fused with another engine was refused by the settings
        return settings
    if settings.engine != "inductor":
        return dataclasses.replace(settings, gpu_photo_path="bls")
    instances = settings.preprocess_instances
    many = instances.kind == "KIND_GPU" and instances.count >= MANY_PHOTO_PATH_INSTANCES
    return dataclasses.replace(settings, gpu_photo_path="hybrid" if many else "fused")


def _place_classifier(settings: RepoSettings, choice: Dict) -> RepoSettings:
    """The classifier's instances where its engine runs, unless their kind was given (`classifier_kind`)."""
    if not settings.place_classifier_by_engine:
        return settings
    instances = settings.classifier_instances
    kind = classifier_kind(settings.flavor, settings.engine, settings.preprocess_instances, choice.get("gpu"),
                           instances.gpus)
    if kind != instances.kind:
        log.info("classifier instances: %s, where its %s engine runs (pass --instance-kind to choose)", kind,
                 settings.engine)
    return dataclasses.replace(settings, classifier_instances=dataclasses.replace(instances, kind=kind))


def _plan_parity(settings: RepoSettings) -> Dict:
    sidecar = Path(settings.plan).with_name("plan.json") if settings.plan else None
    if sidecar is None or not sidecar.is_file():
        return {}
    info = json.loads(sidecar.read_text(encoding="utf-8"))
    figures = {"tensorrt_vs_pytorch": info["parity"]} if info.get("parity") else {}
    if info.get("calibration_source"):  # INT8 calibrated on photos, or on noise asked for on purpose
        figures["tensorrt_calibration_source"] = info["calibration_source"]
    return figures
