"""Writing the Triton model repository: staged, validated, swapped atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import struct
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple

from builder.engines import inductor
from builder.repository import configs
from builder.repository.readme import README, write_readme
from builder.repository.contract import LABELS_FILE, WARMUP_IMAGE, Contract
from builder.errors import BuilderError
from builder.meta import package_versions
from builder.repository.output import (MANIFEST, carry_over, check_output, clean_stale, staging_dir,
                                       swap_into_place)
from builder.settings import TRITON_RELEASE, TRITON_VERSION, Batching, RepoSettings
from builder.timing import timing_batches

log = logging.getLogger("builder")

MODELS_DIR = Path(__file__).parent / "triton_models"
BUILDER_DIR = Path(__file__).resolve().parents[1]
# builder.engines.trt, its runner and what they import: stdlib, numpy, tensorrt and polygraphy only, so they run
# in a TensorRT-only Python (NVIDIA's TensorRT container, a Python-backend stub with the tensorrt wheel).
TRT_MODULES = ("builder/__init__.py", "builder/errors.py", "builder/compare.py", "builder/timing.py",
               "builder/engines/__init__.py", "builder/engines/plan_check.py", "builder/engines/plan_runner.py",
               "builder/engines/trt.py")


# The gpu preprocessing's load-time gate: JPEGs that take the GPU path (baseline, progressive, gray, EXIF-rotated)
# and per-photo tensor thresholds loose enough for nvJPEG's IDCT vs libjpeg-turbo's (on an H100 the 12 bundled
# photos differed by 0.0036 on average) and tight enough to stop a wrong colour conversion or orientation.
LOAD_GATE = {"photos": ("astronaut_640x480.jpg", "astronaut_progressive.jpg", "camera_gray.jpg", "coffee_exif6.jpg"),
             "max_mean_abs": 0.03, "min_cosine": 0.999}


def contract_tensors(contract: Contract) -> Dict[str, Dict]:
    """The contract's tensors as the manifest records them (name -> dtype, dims without the batch)."""
    return {spec.name: {"dtype": spec.dtype, "dims": list(spec.dims)}
            for spec in (contract.image, contract.pixels, *contract.ensemble_outputs)}


def _write_labels(path: Path, class_names: list) -> None:
    path.write_text("\n".join(class_names) + "\n", encoding="utf-8")


def _copy_gate_photos(version_dir: Path) -> None:
    """The load-time gate's photos into a served gpu model's version directory (`gate/` beside model.py)."""
    gate = version_dir / "gate"
    gate.mkdir(parents=True, exist_ok=True)
    for photo in LOAD_GATE["photos"]:
        shutil.copy2(BUILDER_DIR / "parity_images" / photo, gate / photo)


def file_hashes(root: Path) -> Dict[str, str]:
    """sha256 of every file under `root` but the manifest, keyed by relative path."""
    hashes = {}
    for path in sorted(p for p in Path(root).rglob("*")
                       if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts):
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        hashes[path.relative_to(root).as_posix()] = digest.hexdigest()
    return hashes


def _copy_python_model(source_name: str, version_dir: Path, extras=()) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    for extra in extras:
        shutil.copy2(MODELS_DIR / extra, version_dir / extra)
    shutil.copy2(MODELS_DIR / source_name, version_dir / "model.py")


def torch_parameters(settings: RepoSettings, contract: Contract) -> Dict[str, str]:
    """Config parameters of the torch-engine classifier."""
    batching = settings.classifier_batching
    # Every power of two up to the max, and the preferred sizes: a batch pads to the next bucket, so sparse
    # buckets (1, 32, ...) made batches of 2-8 cost a batch of 32 at low load (measured on an H100: served
    # throughput fell from concurrency 1 to 8). Each bucket is one CUDA graph, captured at load.
    powers = {1 << i for i in range(batching.max_batch_size.bit_length()) if 1 << i <= batching.max_batch_size}
    buckets = sorted(powers | {*batching.preferred_batch_sizes, batching.max_batch_size})
    # A GPU instance only stacks and copies batches on the CPU. torch's default pool, one thread per core in
    # every instance's process, oversubscribed the cores: 2 instances on an H100 served 187 img/s with it and
    # 2,312 with one thread each (perf/results/h100-analyze/threads/). CPU instances compute there: torch decides.
    gpu = settings.classifier_instances.kind == "KIND_GPU"
    return {"precision": settings.inductor_precision, "compile": settings.compile_mode,
            "batch_buckets": ",".join(str(b) for b in buckets),
            "input_dims": ",".join(str(d) for d in contract.pixels.dims),
            "intra_op_threads": "1" if gpu else "0",
            # Inputs stay where the preprocess model left them (the GPU): no copy through the host.
            "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}


def write_models(root: Path, settings: RepoSettings, contract: Contract, onnx_file: Path,
                 preprocess_parameters: Dict[str, str], class_names: list) -> None:
    """Writes the four models of the contract into `root` (files first, configs last).

    Args:
        root: Repository folder (normally a staging folder).
        settings: Build settings (flavor, batching, instances, version).
        contract: Names and tensors.
        onnx_file: The validated classifier; moved into the classifier's version directory.
        preprocess_parameters: The preprocess model's config parameters.
        class_names: One label per class, for the postprocess model.
    """
    version = str(settings.version)
    policy = settings.version_policy
    batching = settings.classifier_batching

    pre_dir = root / contract.preprocess
    gpu_pipeline = settings.preprocess == "gpu"
    _copy_python_model("preprocess.py", pre_dir / version,
                       extras=("imaging.py", "gpu_imaging.py") if gpu_pipeline else ("imaging.py",))
    if gpu_pipeline:
        # GPU instances only launch work on the GPU: one torch CPU thread each, as for the classifier.
        threads = "1" if settings.preprocess_instances.kind == "KIND_GPU" else "0"
        preprocess_parameters = {**preprocess_parameters, "pipeline": "gpu", "decoder": settings.gpu_decoder,
                                 "intra_op_threads": threads,
                                 "gate_max_mean_abs": str(LOAD_GATE["max_mean_abs"]),
                                 "gate_min_cosine": str(LOAD_GATE["min_cosine"])}
        # The model checks the decoder it serves with on these photos when it loads (see preprocess.py).
        _copy_gate_photos(pre_dir / version)
    (pre_dir / "warmup").mkdir(parents=True, exist_ok=True)
    photo = (Path(__file__).parents[1] / "parity_images" / "astronaut_640x480.jpg").read_bytes()
    # Triton reads a BYTES warm-up input as its wire form: a 4-byte little-endian length before the bytes.
    (pre_dir / "warmup" / WARMUP_IMAGE).write_bytes(struct.pack("<I", len(photo)) + photo)
    pre_config = configs.preprocess_warmup(configs.python_model(
        contract.preprocess, [contract.image], [contract.pixels], settings.preprocess_batching,
        settings.preprocess_instances, policy, preprocess_parameters), contract)

    cls_dir = root / contract.classifier
    (cls_dir / version).mkdir(parents=True, exist_ok=True)
    _write_labels(cls_dir / LABELS_FILE, class_names)
    shutil.move(str(onnx_file), cls_dir / version / "model.onnx")
    if settings.plan:
        # model.onnx stays beside the plan: it is what the plan is rebuilt from in the TensorRT container.
        shutil.copy2(settings.plan, cls_dir / version / "model.plan")
        sidecar = Path(settings.plan).with_name("plan.json")
        if sidecar.is_file():
            shutil.copy2(sidecar, cls_dir / version / "plan.json")
    if settings.engine == "inductor":  # the same Python-backend model in both flavors: torch runs in the stub
        for name in (inductor.FILE, inductor.SIDECAR, inductor.ARTIFACTS):
            if onnx_file.with_name(name).is_file():  # inductor.bin only when built on a GPU
                shutil.move(str(onnx_file.with_name(name)), cls_dir / version / name)
        _copy_python_model("classifier.py", cls_dir / version, extras=("torch_runner.py",))
        cls_config = configs.local_classifier(contract, batching, settings.classifier_instances, policy,
                                              torch_parameters(settings, contract))
    elif settings.flavor == "local":
        parameters = None
        if settings.plan:  # the plan runs through builder.engines.plan_runner: copy it and its numpy-only imports
            for module in TRT_MODULES:
                (cls_dir / version / module).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(BUILDER_DIR.parent / module, cls_dir / version / module)
            # The GPU preprocessing's output stays on the GPU: the runner wraps it by DLPack.
            parameters = {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
        _copy_python_model("classifier.py", cls_dir / version)
        cls_config = configs.local_classifier(contract, batching, settings.classifier_instances, policy, parameters)
    elif settings.plan:
        cls_config = configs.tensorrt_classifier(contract, batching, settings.classifier_instances, policy,
                                                 settings.cuda_graphs)
    else:
        cls_config = configs.onnx_classifier(contract, batching, settings.classifier_instances, policy,
                                             settings.onnxruntime_tensorrt)

    post_dir = root / contract.postprocess
    _copy_python_model("postprocess.py", post_dir / version)
    _write_labels(post_dir / version / "labels.txt", class_names)
    post_batching = Batching(batching.max_batch_size, (), settings.preprocess_batching.max_queue_delay_us)
    post_config = configs.python_model(
        contract.postprocess, [contract.logits], list(contract.postprocess_outputs), post_batching,
        settings.postprocess_instances, policy)

    ens_dir = root / contract.ensemble
    if gpu_pipeline and settings.gpu_photo_path != "ensemble":
        engine = None
        if settings.gpu_photo_path == "fused":
            engine = (cls_dir / version, torch_parameters(settings, contract))
        ens_config = _write_pipeline(ens_dir / version, settings, contract, preprocess_parameters, class_names,
                                     engine)
    else:
        (ens_dir / version).mkdir(parents=True, exist_ok=True)  # Triton wants the (empty) version dir
        ens_config = configs.ensemble(contract, batching.max_batch_size, policy, settings.response_cache)

    # config.pbtxt last: a polling server never sees a config without its files.
    for model_dir, config in ((pre_dir, pre_config), (cls_dir, cls_config),
                              (post_dir, post_config), (ens_dir, ens_config)):
        configs.write(config, model_dir)


def _write_pipeline(version_dir: Path, settings: RepoSettings, contract: Contract, parameters: Dict[str, str],
                    class_names: list, engine: Optional[Tuple[Path, Dict[str, str]]] = None):
    """The gpu photo path as one Python model under the ensemble's name (files now; its config returned).

    Same tensors and batch limit as the ensemble; no queue delay (a batch forms from what is queued while an
    instance works, so one request alone does not wait for company) and no Triton warm-up (a BLS call from
    warm-up hung the model's load on an H200; the model warms its decoder itself).

    Args:
        engine: For `fused`: the classifier's version folder and its torch parameters. Its engine files are
            linked into `engine/` here (no copy on the same file system), so the version folder is whole.
    """
    extras = ("imaging.py", "gpu_imaging.py") + (("torch_runner.py",) if engine else ())
    _copy_python_model("pipeline.py", version_dir, extras=extras)
    _copy_gate_photos(version_dir)
    _write_labels(version_dir / "labels.txt", class_names)
    engine_parameters = {}
    if engine:
        source, torch_params = engine
        (version_dir / ENGINE_DIR).mkdir()
        for name in (inductor.FILE, inductor.SIDECAR, inductor.ARTIFACTS):
            if (source / name).is_file():
                _link_or_copy(source / name, version_dir / ENGINE_DIR / name)
        engine_parameters = {**torch_params, "engine_dir": ENGINE_DIR}
    batching = settings.preprocess_batching
    return configs.python_model(
        contract.ensemble, [contract.image], list(contract.ensemble_outputs),
        dataclasses.replace(batching, max_queue_delay_us=0), settings.preprocess_instances, settings.version_policy,
        {**parameters, **engine_parameters, "classifier": contract.classifier,
         "classifier_input": contract.pixels.name, "classifier_output": contract.logits.name,
         "classifier_max_batch": str(settings.classifier_batching.max_batch_size)})


ENGINE_DIR = "engine"


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(source, target)


def _version_entry(settings: RepoSettings, model, parity: Dict[str, float]) -> Dict:
    return {"version": settings.version, "created_unix_s": int(time.time()), "weights": model.weights,
            "timm_name": settings.source.model_name, "flavor": settings.flavor, "plan": bool(settings.plan),
            "engine": settings.engine, "preprocess": settings.preprocess,
            "parity": parity}


def _existing_versions(model_dir: Path) -> list:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) if model_dir.is_dir() else []


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of either


def build_repository(settings: RepoSettings, add_version: bool = False) -> Path:
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
    serving, then retires the old one per the version policy.

    Args:
        settings: What to build and where.
        add_version: Add a version to the existing repository instead of replacing it.

    Returns:
        The repository path.

    Raises:
        BuilderError: Any problem the user can fix (the message says which).
    """
    from builder.repository.check import check_repository
    from builder.export.onnx_export import export_onnx, validate_onnx
    from builder.export.model import load_model
    from builder.repository.triton_models.imaging import PreprocessParams

    # Everything about the output is checked before the model loads: a bad path fails in a second.
    output = check_output(Path(settings.output), replace=not add_version)
    if settings.plan:  # a file that is not the plan its plan.json describes never reaches a repository
        from builder.engines.plan_check import verify_plan

        verify_plan(settings.plan)
    clean_stale(output)
    previous = None
    if add_version:
        previous = read_manifest(output)
        settings = _same_repository(settings, previous, output)
    started = time.perf_counter()
    with staging_dir(output) as staging:
        log.info("[1/5] loading %s", settings.source.model_name)
        model = load_model(settings.source)
        _, height, width = model.data_config["input_size"]
        contract = Contract(settings.model_name, (int(height), int(width)), model.num_classes, settings.top_k)
        if settings.top_k > model.num_classes:
            raise BuilderError(f"top_k: {settings.top_k} is more than the model's {model.num_classes} classes")
        try:
            params = PreprocessParams.from_timm(model.data_config, settings.max_image_pixels)
        except ValueError as exc:
            raise BuilderError(f"preprocessing: {exc}") from None
        if previous is not None:  # before the export: a version that cannot be served fails in seconds
            _refuse_contract_changes(_contract_changes(previous, settings, contract))
        onnx_file = staging / "model.onnx"
        log.info("[2/5] exporting ONNX")
        export_onnx(model, contract, onnx_file, settings.opset)
        log.info("[3/5] validating ONNX Runtime against PyTorch")
        parity = validate_onnx(onnx_file, model, contract, settings.parity)
        settings, gates, choice = _build_engine(settings, model, contract, params, onnx_file, parity)
        settings = _photo_path(settings)
        log.info("[4/5] writing %s models (%s flavor)", len(contract.model_names), settings.flavor)
        # The engine gates ran on the exact preprocessing; the served one may decode JPEGs at a reduced scale.
        served = dataclasses.replace(params, jpeg_draft=settings.preprocess == "draft").to_parameters()
        if previous is not None:  # the engine is settled now
            _refuse_contract_changes(_contract_changes(previous, settings, contract, served))
        write_models(staging, settings, contract, onnx_file, served, model.class_names)
        versions = (previous or {}).get("model_versions", []) + [_version_entry(settings, model, parity)]
        write_readme(staging, settings, contract, choice, {"onnxruntime_vs_pytorch": parity, **gates})
        write_manifest(staging, settings, contract, model, served, parity, versions, gates, choice)
        log.info("[5/5] checking the repository")
        problems = check_repository(staging)
        if problems:
            raise BuilderError("the built repository fails its check: " + "; ".join(problems))
        if add_version:
            _move_version_in(staging, output, contract, settings.version)
            shutil.rmtree(staging, ignore_errors=True)
        else:
            # Other models and files the user keeps in the repository move into the new tree, never away.
            carry_over(output, staging)
            swap_into_place(staging, output)
    log.info("wrote %s in %.1f s: ensemble %r", output, time.perf_counter() - started, contract.ensemble)
    return output


def _build_engine(settings: RepoSettings, model, contract: Contract, params, onnx_file: Path,
                  onnx_parity: Dict) -> Tuple[RepoSettings, Dict, Dict]:
    """Builds the classifier engine(s), runs the non-exact variants' gates, and settles `auto`.

    Returns:
        The settings with the engine resolved (`auto` replaced by the chosen one, a losing plan dropped),
        the gates' figures, and the engine choice record (manifest `engine`, README table).
    """
    from builder.engines import choice as ec

    gates: Dict = {}
    batching = settings.classifier_batching
    batches = timing_batches(batching.preferred_batch_sizes, batching.max_batch_size)
    gpu = _gpu_name()
    requested = settings.engine
    if requested == "auto" and settings.onnxruntime_tensorrt:  # the accelerator is ONNX Runtime's: no race
        requested = "onnxruntime"
    if requested == "auto" and gpu is None:
        names = ["tensorrt" if settings.plan else "onnxruntime"]
        reason = "no GPU on the build host: nothing to time, so " + (
            "the given plan is served" if settings.plan else "ONNX Runtime is served")
    elif requested == "auto":
        names = ["onnxruntime", "inductor"] + (["tensorrt"] if settings.plan else [])
        reason = f"fastest measured on {gpu} at batch sizes {batches}"
    else:
        names, reason = [requested], "asked for"
    candidates = []
    for name in names:
        started = time.perf_counter()
        try:
            candidate = _candidate(name, settings, model, contract, params, onnx_file, onnx_parity, gpu, batches,
                                   gates)
        except BuilderError as exc:
            if requested != "auto":
                raise
            candidate = ec.Candidate(name, "failed", str(exc))
            log.warning("engine candidate %s failed: %s", name, exc)
        if candidate.build_s is None and candidate.status != "skipped":  # a plan's build_s comes from its sidecar
            candidate.build_s = round(time.perf_counter() - started, 1)
        candidates.append(candidate)
    if requested == "auto" and gpu is not None:
        try:
            chosen = ec.choose(candidates).engine
        except ValueError:
            raise BuilderError("engine: no candidate engine could be built and timed on this host: "
                               + "; ".join(f"{c.engine}: {c.reason}" for c in candidates)) from None
        log.info("engine auto: %s", ", ".join(
            f"{c.engine} {c.best['throughput_img_per_s']:,.0f} img/s" if c.best else f"{c.engine} {c.status}"
            for c in candidates))
    else:
        chosen = names[0]
        candidates[0].chosen = True
    if chosen != "inductor":  # a losing program does not ship
        for name in (inductor.FILE, inductor.SIDECAR, inductor.ARTIFACTS):
            onnx_file.with_name(name).unlink(missing_ok=True)
        gates.pop("inductor_vs_pytorch", None)
        gates.pop("inductor_served_vs_pytorch", None)
    log.info("classifier engine: %s (%s)", chosen, reason)
    settings = dataclasses.replace(settings, engine=chosen, plan=settings.plan if chosen == "tensorrt" else None,
                                   torch_compile=settings.torch_compile if chosen == "inductor" else None)
    if settings.preprocess != "exact":
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
        gates[f"{settings.preprocess}_preprocess_vs_exact"] = figures
    choice = {"requested": requested, "chosen": chosen, "reason": reason, "gpu": gpu, "batch_sizes": batches,
              "candidates": [c.to_dict() for c in candidates]}
    return settings, gates, choice


def _gpu_name() -> Optional[str]:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _candidate(name: str, settings: RepoSettings, model, contract: Contract, params, onnx_file: Path,
               onnx_parity: Dict, gpu: Optional[str], batches, gates: Dict):
    """Builds (and on a GPU, gates and times) one engine; its choice-table row."""
    from builder.engines import choice as ec

    if name == "onnxruntime":
        if gpu is None:
            return ec.Candidate(name, "built", "the exported ONNX (gated against PyTorch)", parity=onnx_parity)
        return ec.measure_onnxruntime(str(onnx_file), batches, onnx_parity)
    if name == "tensorrt":
        sidecar_path = Path(settings.plan).with_name("plan.json")
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8")) if sidecar_path.is_file() else {}
        if gpu is None:
            return ec.Candidate(name, "built", f"the given plan ({settings.plan})", parity=sidecar.get("parity") or {},
                                build_s=sidecar.get("build_s"))
        return ec.recorded_tensorrt(sidecar, gpu, batches)
    staging = onnx_file.parent
    program = inductor.export_program(model, contract, staging / inductor.FILE,
                                      settings.classifier_batching.max_batch_size)
    gates["inductor_vs_pytorch"] = inductor.validate_program(program, model, contract, settings.parity)
    sidecar = {"environment": inductor.environment(), "parity": gates["inductor_vs_pytorch"],
               "precision": f"{settings.inductor_precision} on GPU, fp32 on CPU", "compile": settings.compile_mode}
    (staging / inductor.SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    if gpu is None:
        return ec.Candidate(name, "built", "torch.export program; compiled where it is served (no GPU here)",
                            parity=gates["inductor_vs_pytorch"])
    import torch

    from builder.repository.preprocess_gate import photo_batch

    photos = photo_batch(params)
    with torch.no_grad():
        reference = model.module(torch.from_numpy(photos)).numpy()
    built = inductor.build_inductor(staging, torch_parameters(settings, contract),
                                    settings.classifier_batching.max_batch_size, batches, photos, reference,
                                    settings.engine_parity)
    gates["inductor_served_vs_pytorch"] = built["parity_served"]
    # Written before the build too: the fresh processes check stored artifacts against its environment.
    sidecar.update({k: v for k, v in built.items() if k != "parity_served"}, parity_served=built["parity_served"])
    (staging / inductor.SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    starts = f"start {built['start_from_scratch_s']} s cold, {built['start_with_artifacts_s']} s from inductor.bin"
    return ec.Candidate(name, "measured", f"torch {torch.__version__} {settings.inductor_precision.upper()}, "
                        f"compile={settings.compile_mode}; {starts}", built["timings"], parity=built["parity_served"])


def _same_repository(settings: RepoSettings, previous: dict, output: Path) -> RepoSettings:
    """The settings of a version added to `output`: same ensemble and flavor, next version number."""
    if previous["contract"].get("ensemble") != settings.model_name:
        raise BuilderError(f"name: the repository serves {previous['contract'].get('ensemble')!r}, not "
                           f"{settings.model_name!r}; add versions of the same ensemble")
    if previous["flavor"] != settings.flavor:
        raise BuilderError(f"flavor: {output} is a {previous['flavor']} repository and the new version would be "
                           f"{settings.flavor}; one repository serves one flavor: pass --flavor "
                           f"{previous['flavor']} (or leave it out), or build a new repository")
    _refuse_contract_changes(_contract_changes(previous, settings))
    existing = _existing_versions(output / Contract.named(settings.model_name).classifier)
    log.info("adding version %d to %s", (max(existing) if existing else 0) + 1, output)
    return dataclasses.replace(settings, version=(max(existing) if existing else 0) + 1)


def _contract_changes(previous: dict, settings: RepoSettings, contract: Optional[Contract] = None,
                      preprocess: Optional[Dict[str, str]] = None) -> list:
    """What a new version would change of what all versions share: (field, served, new) triples.

    Every version of a model is served under one config.pbtxt, so a new version must keep the tensors,
    batch size, top-k, preprocessing and classifier engine of the served ones; otherwise the server
    cannot load the old versions (or the new one) after the configs are replaced.
    """
    served = previous.get("settings") or {}
    changes = []
    pairs = [("max_batch_size", previous["contract"].get("max_batch_size"), settings.classifier_batching.max_batch_size),
             ("top_k", served.get("top_k"), settings.top_k),
             ("preprocess", served.get("preprocess"), settings.preprocess)]
    if settings.engine != "auto":  # settled once the race ran: compared again then
        pairs.append(("engine", served.get("engine"), settings.engine))
    if contract is not None:
        pairs.append(("tensors", previous["contract"].get("tensors"), contract_tensors(contract)))
    if preprocess is not None:
        pairs.append(("preprocessing parameters", previous.get("preprocess"), preprocess))
    for name, was, now in pairs:
        if isinstance(was, dict) and isinstance(now, dict):  # name the entries that differ, not the whole dict
            changes += [(f"{name} {key}", was.get(key), now.get(key)) for key in sorted({*was, *now})
                        if was.get(key) != now.get(key)]
        elif was is not None and was != now:
            changes.append((name, was, now))
    return changes


def _refuse_contract_changes(changes: list) -> None:
    if not changes:
        return
    said = "; ".join(f"{name} {was!r} -> {now!r}" for name, was, now in changes)
    raise BuilderError(f"add_version: the new version changes what every version shares ({said}); all versions "
                       "are served under one config, so the old ones would stop loading: build it as a new "
                       "repository (without --add-version), or keep the served values")


def _move_model_files(source: Path, target: Path) -> None:
    """Moves a model directory's unversioned files (labels, warm-up inputs) over the served ones, each atomically."""
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if relative.parts[0].isdigit() or path.name == "config.pbtxt" or not path.is_file():
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target / relative)


def _move_version_in(staging: Path, output: Path, contract: Contract, version: int) -> None:
    """Moves the new version directories into the live repository, then configs and manifest."""
    names = (contract.preprocess, contract.classifier, contract.postprocess)
    taken = [output / name / str(version) for name in names if (output / name / str(version)).exists()]
    if taken:  # checked for all before moving any, so a refusal changes nothing
        raise BuilderError(f"{taken[0]} already exists; remove it or pick another version")
    for name in names:
        os.rename(staging / name / str(version), output / name / str(version))  # atomic for a poller
    for name in contract.model_names:
        _move_model_files(staging / name, output / name)
        _replace_text(output / name / "config.pbtxt", (staging / name / "config.pbtxt").read_text(encoding="utf-8"))
    os.replace(staging / README, output / README)
    manifest = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"] = file_hashes(output)
    _replace_text(output / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


def write_manifest(root: Path, settings: RepoSettings, contract: Contract, model, preprocess: Dict[str, str],
                   parity: Dict[str, float], versions: Optional[list] = None, gates: Optional[Dict] = None,
                   choice: Optional[Dict] = None) -> Path:
    """Writes manifest.json: versions, model, weights, contract, parity and file hashes."""
    manifest = {
        "created_unix_s": int(time.time()),
        "flavor": settings.flavor,
        "target": {"tritonserver": TRITON_VERSION, "ngc_release": TRITON_RELEASE},
        "versions": {"python": platform.python_version(),
                     **package_versions("torch", "timm", "onnx", "onnxruntime", "tritonclient", "numpy", "pillow")},
        "model": {"timm_name": settings.source.model_name, "kwargs": settings.source.kwargs,
                  "weights": model.weights, "random_weights": model.weights.startswith("random:"),
                  "num_classes": model.num_classes, "data_config": model.data_config},
        "contract": {
            "ensemble": contract.ensemble, "models": list(contract.model_names),
            "tensors": contract_tensors(contract),
            "max_batch_size": settings.classifier_batching.max_batch_size,
        },
        "model_version": settings.version,
        "model_versions": versions or [_version_entry(settings, model, parity)],
        "settings": asdict(settings),
        "preprocess": preprocess,
        "parity": {"onnxruntime_vs_pytorch": parity, **_plan_parity(settings), **(gates or {})},
        "engine": choice or {"requested": settings.engine, "chosen": settings.engine},
        "files": file_hashes(root),
    }
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _photo_path(settings: RepoSettings) -> RepoSettings:
    """Settles `gpu_photo_path` once the engine is known: `auto` is fused with the inductor engine, else pipeline.

    Why fused first: on an H200 it served one photo per request at p50 2.5 ms at concurrency 1 (the BLS
    pipeline 5.0 ms) and 5,335 img/s at 256 (pipeline 4,723): perf/results/h200-photo-designs/.
    """
    if settings.preprocess != "gpu":
        return settings
    if settings.gpu_photo_path != "auto":  # fused with another engine was refused by the settings
        return settings
    return dataclasses.replace(settings, gpu_photo_path="fused" if settings.engine == "inductor" else "pipeline")


def _plan_parity(settings: RepoSettings) -> Dict:
    sidecar = Path(settings.plan).with_name("plan.json") if settings.plan else None
    if sidecar is None or not sidecar.is_file():
        return {}
    info = json.loads(sidecar.read_text(encoding="utf-8"))
    figures = {"tensorrt_vs_pytorch": info["parity"]} if info.get("parity") else {}
    if info.get("calibration_source"):  # INT8 calibrated on photos, or on noise asked for on purpose
        figures["tensorrt_calibration_source"] = info["calibration_source"]
    return figures


def read_manifest(root: Path) -> dict:
    """Reads a repository's manifest.json.

    Raises:
        BuilderError: No manifest (not a repository written by this tool).
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BuilderError(f"{path} does not exist; build the repository with `make repo` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BuilderError(f"{path} cannot be read ({exc}); rebuild the repository with `make repo`") from None
    required = {"contract", "flavor", "files", "settings"}
    if not isinstance(manifest, dict) or not required <= set(manifest) or not isinstance(manifest["contract"], dict):
        missing = sorted(required - set(manifest)) if isinstance(manifest, dict) else ["everything: not an object"]
        raise BuilderError(f"{path} is damaged (lacks {', '.join(missing) or 'its contract'}); rebuild the "
                           "repository with `make repo`")
    return manifest
