"""The models of a repository written into a folder: files first, each config last."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Dict, Optional, Tuple

from builder.core.contract import LABELS_FILE, WARMUP_IMAGE, Contract
from builder.core.photos import PHOTOS
from builder.engines import inductor
from builder.engines.race import torch_parameters
from builder.repository import configs
from builder.repository.triton_models import SERVED_MODULES
from builder.settings import IN_PROCESS_PHOTO_PATHS, Batching, InstanceGroup, RepoSettings, torch_threads

log = logging.getLogger("builder")

MODELS_DIR = Path(__file__).parent / "triton_models"
BUILDER_DIR = Path(__file__).resolve().parents[1]
# builder.engines.trt, its runner and what they import: stdlib, numpy, tensorrt and polygraphy only, so they run
# in a TensorRT-only Python (NVIDIA's TensorRT container, a Python-backend stub with the tensorrt wheel).
TRT_MODULES = ("builder/__init__.py", "builder/errors.py", "builder/compare.py", "builder/timing.py",
               "builder/cli/__init__.py", "builder/cli/args.py", "builder/settings/__init__.py",
               "builder/settings/parts.py", "builder/settings/repo.py", "builder/core/__init__.py",
               "builder/core/contract.py",
               "builder/engines/__init__.py", "builder/engines/plan_check.py", "builder/engines/plan_runner.py",
               "builder/engines/trt.py")


# The gpu preprocessing's load-time gate: JPEGs that take the GPU path (baseline, progressive, gray, EXIF-rotated)
# and per-photo tensor thresholds loose enough for nvJPEG's IDCT vs libjpeg-turbo's (on an H100 the 12 bundled
# photos differed by 0.0036 on average) and tight enough to stop a wrong colour conversion or orientation.
LOAD_GATE = {"photos": ("astronaut_640x480.jpg", "astronaut_progressive.jpg", "camera_gray.jpg", "coffee_exif6.jpg"),
             "max_mean_abs": 0.03, "min_cosine": 0.999}


def labels_text(class_names: list) -> str:
    """labels.txt: one class name per line, in class order (Triton's `label_filename`)."""
    return "\n".join(class_names) + "\n"


def _write_labels(path: Path, class_names: list) -> None:
    path.write_text(labels_text(class_names), encoding="utf-8")


def _copy_gate_photos(version_dir: Path) -> None:
    """The load-time gate's photos into a served gpu model's version directory (`gate/` beside model.py)."""
    gate = version_dir / "gate"
    gate.mkdir(parents=True, exist_ok=True)
    for photo in LOAD_GATE["photos"]:
        shutil.copy2(PHOTOS / photo, gate / photo)


# Modules a served model.py imports, copied beside it (a stub Python imports them from there, not the project).
SHARED_MODULES = {"imaging.py": BUILDER_DIR / "core" / "imaging.py", "gpu_imaging.py": MODELS_DIR / "gpu_imaging.py",
                  "gpu_transform.py": MODELS_DIR / "gpu_transform.py", "served.py": MODELS_DIR / "served.py",
                  "torch_runner.py": BUILDER_DIR / "engines" / "torch_runner.py",
                  "window_attention.py": BUILDER_DIR / "engines" / "window_attention.py"}


def _copy_python_model(source_name: str, version_dir: Path, role: str) -> None:
    """A served model's model.py (from `source_name`) and the modules its role imports from beside it."""
    version_dir.mkdir(parents=True, exist_ok=True)
    for extra in SERVED_MODULES[role]:
        shutil.copy2(SHARED_MODULES[extra], version_dir / extra)
    shutil.copy2(MODELS_DIR / source_name, version_dir / "model.py")


def write_models(root: Path, settings: RepoSettings, contract: Contract, onnx_file: Path,
                 preprocess_parameters: Dict[str, str], class_names: list) -> Dict[str, str]:
    """Writes the four models of the contract into `root` (files first, configs last); returns the
    preprocessing's config parameters, which `write_photo_path_model` takes to write the photo path again.

    Args:
        root: Repository folder (normally a staging folder).
        settings: Build settings (flavor, batching, instances, version).
        contract: Names and tensors.
        onnx_file: The validated classifier; moved into the classifier's version directory.
        preprocess_parameters: The preprocess model's config parameters.
        class_names: One label per class, for the postprocess model.
    """
    pre_config, preprocess_parameters = _write_preprocess(root, settings, contract, preprocess_parameters)
    cls_config = _write_classifier(root, settings, contract, onnx_file, class_names)
    post_config = _write_postprocess(root, settings, contract, class_names)

    version = str(settings.version)
    ens_dir = root / contract.ensemble
    photo_path = settings.preprocess == "gpu"
    if not photo_path:
        (ens_dir / version).mkdir(parents=True, exist_ok=True)  # Triton wants the (empty) version dir
        _write_labels(ens_dir / LABELS_FILE, class_names)  # the labels its outputs carry
        ens_config = configs.ensemble(contract, settings.ensemble_max_batch,
                                      settings.version_policy, settings.response_cache)
    # config.pbtxt last: a polling server never sees a config without its files.
    for name, config in ((contract.preprocess, pre_config), (contract.classifier, cls_config),
                         (contract.postprocess, post_config)):
        configs.write(config, root / name)
    if photo_path:
        write_photo_path_model(root, settings, contract, preprocess_parameters, class_names)
    else:
        configs.write(ens_config, ens_dir)
    return preprocess_parameters


def write_photo_path_model(root: Path, settings: RepoSettings, contract: Contract, parameters: Dict[str, str],
                           class_names: list) -> None:
    """The GPU photo path under the ensemble's name in `root` (after the classifier, whose engine it links)."""
    version = str(settings.version)
    engine = None
    if settings.gpu_photo_path in IN_PROCESS_PHOTO_PATHS:
        engine = (root / contract.classifier / version, torch_parameters(settings, contract))
    config = write_photo_path(root / contract.ensemble / version, settings, contract, parameters, class_names, engine)
    configs.write(config, root / contract.ensemble)


def _write_preprocess(root: Path, settings: RepoSettings, contract: Contract, parameters: Dict[str, str]):
    """The preprocess model's files; returns its config and its parameters (with the GPU path's added)."""
    pre_dir = root / contract.preprocess
    version = str(settings.version)
    on_gpu = settings.preprocess == "gpu"
    instances = direct_preprocess_instances(settings)
    _copy_python_model("preprocess.py", pre_dir / version, "preprocess_gpu" if on_gpu else "preprocess")
    if on_gpu:
        parameters = {**parameters, "preprocess": "gpu", "decoder": settings.gpu_decoder,
                      "intra_op_threads": torch_threads(instances),
                      # Small batches' transforms replay as CUDA graphs ("0": eager; see gpu_transform.TransformGraphs).
                      "transform_graphs": "1",
                      "gate_max_mean_abs": str(LOAD_GATE["max_mean_abs"]),
                      "gate_min_cosine": str(LOAD_GATE["min_cosine"])}
        # The model checks the decoder it serves with on these photos when it loads (see preprocess.py).
        _copy_gate_photos(pre_dir / version)
    (pre_dir / "warmup").mkdir(parents=True, exist_ok=True)
    photo = (PHOTOS / "astronaut_640x480.jpg").read_bytes()
    # Triton reads a BYTES warm-up input as its wire form: a 4-byte little-endian length before the bytes.
    (pre_dir / "warmup" / WARMUP_IMAGE).write_bytes(struct.pack("<I", len(photo)) + photo)
    config = configs.preprocess_warmup(configs.python_model(
        contract.preprocess, [contract.image], [contract.pixels], settings.preprocess_batching,
        instances, settings.version_policy, parameters), contract)
    return config, parameters


def direct_preprocess_instances(settings: RepoSettings) -> InstanceGroup:
    """The preprocess model's instances. The GPU photo path never calls it: it stays for clients that
    preprocess on the server and classify themselves, on one CPU instance, so that it holds no GPU context (an
    idle GPU instance is a process with its own CUDA context, torch heap and load gate on the GPU)."""
    if settings.preprocess == "gpu":
        return InstanceGroup("KIND_CPU", 1)
    return settings.preprocess_instances


def _write_classifier(root: Path, settings: RepoSettings, contract: Contract, onnx_file: Path, class_names: list):
    """The classifier's files (ONNX, plan, inductor program or Python runner, by flavor and engine); its config."""
    cls_dir = root / contract.classifier
    version_dir = cls_dir / str(settings.version)
    batching, instances, policy = settings.classifier_batching, settings.classifier_instances, settings.version_policy
    version_dir.mkdir(parents=True, exist_ok=True)
    _write_labels(cls_dir / LABELS_FILE, class_names)
    shutil.move(str(onnx_file), version_dir / "model.onnx")
    if settings.plan:
        # model.onnx stays beside the plan: it is what the plan is rebuilt from in the TensorRT container.
        shutil.copy2(settings.plan, version_dir / "model.plan")
        sidecar = Path(settings.plan).with_name("plan.json")
        if sidecar.is_file():
            shutil.copy2(sidecar, version_dir / "plan.json")
    if settings.engine == "inductor":  # the same Python-backend model in both flavors: torch runs in the stub
        for name in inductor.FILES:
            if onnx_file.with_name(name).is_file():  # inductor.bin only when built on a GPU
                shutil.move(str(onnx_file.with_name(name)), version_dir / name)
        _copy_python_model("classifier.py", version_dir, "classifier_torch")
        return configs.local_classifier(contract, batching, instances, policy, torch_parameters(settings, contract))
    if settings.flavor == "local":
        parameters = None
        if settings.plan:  # the plan runs through builder.engines.plan_runner: copy it and its numpy-only imports
            for module in TRT_MODULES:
                (version_dir / module).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(BUILDER_DIR.parent / module, version_dir / module)
            # The GPU preprocessing's output stays on the GPU: the runner wraps it by DLPack.
            parameters = {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
        _copy_python_model("classifier.py", version_dir, "classifier")
        return configs.local_classifier(contract, batching, instances, policy, parameters)
    if settings.plan:
        return configs.tensorrt_classifier(contract, batching, instances, policy, settings.cuda_graphs)
    return configs.onnx_classifier(contract, batching, instances, policy, settings.onnxruntime_tensorrt)


def _write_postprocess(root: Path, settings: RepoSettings, contract: Contract, class_names: list):
    """The postprocess model's files (softmax; the labels its outputs carry); its config."""
    version_dir = root / contract.postprocess / str(settings.version)
    _copy_python_model("postprocess.py", version_dir, "postprocess")
    _write_labels(root / contract.postprocess / LABELS_FILE, class_names)
    batching = Batching(settings.classifier_batching.max_batch_size, (),
                        settings.preprocess_batching.max_queue_delay_us)
    return configs.python_model(contract.postprocess, [contract.logits], list(contract.postprocess_outputs),
                                batching, settings.postprocess_instances, settings.version_policy)


def write_photo_path(version_dir: Path, settings: RepoSettings, contract: Contract, parameters: Dict[str, str],
                   class_names: list, engine: Optional[Tuple[Path, Dict[str, str]]] = None):
    """The gpu photo path as one Python model under the ensemble's name (files now; its config returned).

    Same tensors and batch limit as the ensemble; no queue delay (a batch forms from what is queued while an
    instance works, so one request alone does not wait for company) and no Triton warm-up (a BLS call from
    warm-up hung the model's load on an H200; the model warms its decoder itself).

    Args:
        engine: For `fused` and `hybrid`: the classifier's version folder and its torch parameters. Its engine
            files are linked into `engine/` here (no copy on the same file system), so the version folder is
            whole.
    """
    _copy_python_model("photo_path.py", version_dir, "photo_path")
    _copy_gate_photos(version_dir)
    _write_labels(version_dir.parent / LABELS_FILE, class_names)
    engine_parameters = {}
    if engine:
        source, torch_params = engine
        (version_dir / ENGINE_DIR).mkdir()
        for name in inductor.FILES:
            if (source / name).is_file():
                _link_or_copy(source / name, version_dir / ENGINE_DIR / name)
        engine_parameters = {**torch_params, "engine_dir": ENGINE_DIR}
        if settings.gpu_photo_path == "hybrid":  # larger batches go to the classifier model
            local = min(settings.hybrid_local_batch, settings.classifier_batching.max_batch_size)
            engine_parameters["local_max_batch"] = str(local)
    batching = settings.preprocess_batching
    return configs.python_model(
        contract.ensemble, [contract.image], list(contract.ensemble_outputs),
        dataclasses.replace(batching, max_queue_delay_us=0), settings.preprocess_instances, settings.version_policy,
        {**parameters, **engine_parameters, "classifier": contract.classifier,
         "classifier_input": contract.pixels.name, "classifier_output": contract.logits.name,
         "classifier_max_batch": str(settings.classifier_batching.max_batch_size)},
        response_cache=settings.response_cache)  # under the ensemble's name, it keeps the ensemble's cache


ENGINE_DIR = "engine"


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)
