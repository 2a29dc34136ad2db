"""Static checks of a model repository: what tritonserver would reject.

`check_repository` returns human-readable problems (empty when the repository
is fine). It parses every config.pbtxt with the ModelConfig schema and checks
batching, files, version directories, ONNX tensors against the config, and
ensemble wiring (models, tensor names, dtypes and shapes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple
import difflib

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builder.core.manifest import MANIFEST, manifest_contract
from builder.repository import configs
from builder.repository.triton_models import SERVED_MODULES, served_role
from builder.repository.versions import existing_versions

DEFAULT_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}
# Backends tritonserver 2.51 (NGC 24.10) ships or documents: anything else is a typo.
KNOWN_BACKENDS = ("python", "onnxruntime", "tensorrt", "pytorch", "tensorflow", "openvino", "dali", "fil",
                  "identity", "repeat", "square", "vllm", "tensorrtllm")
# Manifest `settings.engine` values of the inductor classifier ("torch": its name before 2026-11-25).
_TORCH_ENGINES = ("inductor", "torch")
_PLATFORM_BACKEND = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}
_ONNX_DTYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 7: "TYPE_INT64", 6: "TYPE_INT32", 2: "TYPE_UINT8",
                9: "TYPE_BOOL", 8: "TYPE_STRING", 11: "TYPE_FP64"}


def _dtype(value: int) -> str:
    return mc.DataType.Name(value)


def _load_configs(root: Path, problems: List[str], unreadable: set) -> Dict[str, Tuple[Path, mc.ModelConfig]]:
    """The models whose config.pbtxt reads; the others are named in `unreadable`, their problem reported once."""
    models = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = model_dir / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{model_dir.name}: no config.pbtxt")
            continue
        unreadable.add(model_dir.name)
        try:
            config = configs.read(path)
        except text_format.ParseError as exc:
            problems.append(f"{model_dir.name}/config.pbtxt: {exc}")
            continue
        except UnicodeDecodeError as exc:
            problems.append(f"{model_dir.name}/config.pbtxt: not UTF-8 text (byte {exc.start}); "
                            "rewrite it as UTF-8 or rebuild the repository")
            continue
        except OSError as exc:
            problems.append(f"{model_dir.name}/config.pbtxt: cannot read it ({exc.strerror or exc})")
            continue
        unreadable.discard(model_dir.name)
        if config.name and config.name != model_dir.name:
            problems.append(f"{model_dir.name}/config.pbtxt: name {config.name!r} differs from its folder")
        models[model_dir.name] = (model_dir, config)
    return models


def _versions(model_dir: Path, config: mc.ModelConfig) -> List[int]:
    present = existing_versions(model_dir)
    policy = config.version_policy
    if policy.HasField("specific"):
        return [v for v in present if v in policy.specific.versions]
    if policy.HasField("all"):
        return present
    keep = policy.latest.num_versions if policy.HasField("latest") else 1
    return present[-keep:]


def _check_model(name: str, model_dir: Path, config: mc.ModelConfig, problems: List[str]) -> None:
    _check_tensors_and_batching(name, config, problems)
    if config.platform == "ensemble":
        if not _versions(model_dir, config):
            problems.append(f"{name}: no version directory (an ensemble needs an empty one, e.g. {name}/1/)")
        return
    for group in config.instance_group:
        if group.count < 0:  # proto3 reads an unset count as 0, which Triton takes as 1: only negatives fail
            problems.append(f"{name}: instance_group count {group.count} is negative; use 1 or more")
        if any(gpu < 0 for gpu in group.gpus):
            problems.append(f"{name}: instance_group gpus {list(group.gpus)} has a negative id")
    backend = config.backend or _PLATFORM_BACKEND.get(config.platform, "")
    if not backend:
        problems.append(f"{name}: neither backend nor platform is set")
        return
    if backend not in KNOWN_BACKENDS:
        close = difflib.get_close_matches(backend, KNOWN_BACKENDS, 1)
        problems.append(f"{name}: backend {backend!r} is not a Triton backend"
                        + (f"; did you mean {close[0]!r}?" if close else f"; use one of {', '.join(KNOWN_BACKENDS)}"))
        return
    versions = _versions(model_dir, config)
    if not versions:
        problems.append(f"{name}: no version directory matches its version policy")
    _check_files_it_names(name, model_dir, config, backend, problems)
    filename = _model_filename(config)
    for version in versions:
        if filename and not (model_dir / str(version) / filename).is_file():
            problems.append(f"{name}: version {version} lacks {filename}")
        _check_version(name, model_dir / str(version), config, problems)


def _model_filename(config: mc.ModelConfig):
    """The file a model's backend loads from each version folder (None where no default is known)."""
    backend = config.backend or _PLATFORM_BACKEND.get(config.platform, "")
    return config.default_model_filename or DEFAULT_FILES.get(backend)


def _check_tensors_and_batching(name: str, config: mc.ModelConfig, problems: List[str]) -> None:
    mbs = config.max_batch_size
    if mbs < 0:
        problems.append(f"{name}: max_batch_size {mbs} is negative")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if not tensors:
            problems.append(f"{name}: has no {kind}s")
        for tensor in tensors:
            if not tensor.dims:
                problems.append(f"{name}: {kind} {tensor.name!r} has no dims")
            if any(d == 0 or d < -1 for d in tensor.dims):
                problems.append(f"{name}: {kind} {tensor.name!r} has invalid dims {list(tensor.dims)}")
    if config.HasField("dynamic_batching"):
        if mbs == 0:
            problems.append(f"{name}: dynamic_batching needs max_batch_size > 0")
        for size in config.dynamic_batching.preferred_batch_size:
            if size > mbs:
                problems.append(f"{name}: preferred batch size {size} is above max_batch_size {mbs}")


def _check_files_it_names(name: str, model_dir: Path, config: mc.ModelConfig, backend: str,
                          problems: List[str]) -> None:
    """Labels and warm-up files the config names, and the preprocessing parameters it gives the model."""
    for tensor in config.output:
        if tensor.label_filename and not (model_dir / tensor.label_filename).is_file():
            problems.append(f"{name}: output {tensor.name!r} names labels file {tensor.label_filename!r}, "
                            "which is not in the model directory")
    for warmup in config.model_warmup:
        for input_name, data in warmup.inputs.items():
            if data.input_data_file and not (model_dir / "warmup" / data.input_data_file).is_file():
                problems.append(f"{name}: warm-up {warmup.name!r} reads warmup/{data.input_data_file}, "
                                "which does not exist")
    if backend == "python" and "scale_size" in config.parameters:  # the preprocess model reads these at load
        from builder.core.imaging import PreprocessParams

        try:
            PreprocessParams.from_parameters(configs.parameters(config))
        except (KeyError, ValueError) as exc:
            problems.append(f"{name}: its preprocessing parameters do not load: {exc}")
    local = configs.parameter(config, "local_max_batch", "0")
    if not local.isdigit():  # the hybrid photo path reads it at load: anything but a whole number stops the model
        problems.append(f"{name}: local_max_batch {local!r} is not a whole number of images; use e.g. 8 "
                        "(0: every batch to the classifier model)")
    graphs = configs.parameter(config, "transform_graphs", "1")
    if graphs not in ("0", "1"):  # the GPU models take anything but "0" as on
        problems.append(f"{name}: transform_graphs {graphs!r} is neither \"1\" (small batches' transforms as CUDA "
                        "graphs) nor \"0\" (eager); use one of them")


def _check_version(name: str, version_dir: Path, config: mc.ModelConfig, problems: List[str]) -> None:
    """One version's files against the config: ONNX and plan shapes, the GPU path's and fused engine's files."""
    version = version_dir.name
    # Every served version against the one config (the local classifier keeps its ONNX too): a version
    # built for another image size or batch would fail its load.
    if (version_dir / "model.onnx").is_file():
        _check_onnx(name, version_dir / "model.onnx", config, problems)
    if (version_dir / "model.plan").is_file():
        _check_plan_sidecar(name, version_dir, config, problems)
    gpu_preprocess = configs.parameter(config, "preprocess") == "gpu"
    missing = []
    if config.backend == "python":  # the modules its model.py imports from beside it, by what the config runs
        role = served_role(configs.parameters(config), version_dir)
        missing = [m for m in SERVED_MODULES[role] if not (version_dir / m).is_file()]
    if missing:
        problems.append(f"{name}: version {version} lacks {', '.join(missing)}, which its model.py imports (built "
                        "by another builder, or for another preprocessing); rebuild the repository")
    elif gpu_preprocess and not any((version_dir / "gate").glob("*.jpg")):
        problems.append(f"{name}: version {version} has no gate/ photos for the gpu preprocessing's load-time "
                        "parity gate, so it would not load; rebuild the repository")
    engine_dir = configs.parameter(config, "engine_dir")
    if engine_dir and not ((version_dir / engine_dir / "model.pt2").is_file()
                           and (version_dir / "torch_runner.py").is_file()):
        problems.append(f"{name}: the config runs the classifier's engine in this model (fused), but version "
                        f"{version} lacks {engine_dir}/model.pt2 or torch_runner.py; rebuild the repository")


def _check_onnx(name: str, path: Path, config: mc.ModelConfig, problems: List[str]) -> None:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and friends: a truncated or foreign file
        problems.append(f"{name}: {path.parent.name}/{path.name} is not a readable ONNX model "
                        f"({type(exc).__name__}); rebuild the repository")
        return
    initializers = {i.name for i in graph.initializer}
    declared = {"input": {t.name: t for t in config.input}, "output": {t.name: t for t in config.output}}
    for kind, values in (("input", [v for v in graph.input if v.name not in initializers]),
                         ("output", list(graph.output))):
        found = {v.name: v for v in values}
        for tensor_name, tensor in declared[kind].items():
            value = found.get(tensor_name)
            if value is None:
                problems.append(f"{name}: config {kind} {tensor_name!r} is not in the ONNX file "
                                f"(it has {sorted(found)})")
                continue
            ttype = value.type.tensor_type
            onnx_dtype = _ONNX_DTYPES.get(ttype.elem_type, f"onnx:{ttype.elem_type}")
            if onnx_dtype != _dtype(tensor.data_type):
                problems.append(f"{name}: {kind} {tensor_name!r} is {onnx_dtype} in ONNX, "
                                f"{_dtype(tensor.data_type)} in the config")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
            expect = ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)
            if len(dims) != len(expect) or any(e != -1 and d not in (e, -1) for d, e in zip(dims, expect)):
                problems.append(f"{name}: {kind} {tensor_name!r} has ONNX shape {dims}, the config "
                                f"implies {expect} (max_batch_size {config.max_batch_size} adds the batch axis)")
            elif config.max_batch_size > 0 and dims and dims[0] != -1:
                problems.append(f"{name}: ONNX {kind} {tensor_name!r} has a fixed batch {dims[0]}, "
                                "but max_batch_size > 0 needs a dynamic batch axis")


def _check_plan_sidecar(name: str, version_dir: Path, config: mc.ModelConfig, problems: List[str]) -> None:
    from builder.engines.plan_check import PlanError, verify_plan

    try:
        info = verify_plan(version_dir / "model.plan")
    except PlanError as exc:
        problems.append(f"{name}: {exc}")
        return
    from builder.settings import TENSORRT_VERSION

    target = TENSORRT_VERSION
    built = str(info.get("tensorrt_version", ""))
    if built.split(".")[:2] != target.split(".")[:2]:
        problems.append(f"{name}: plan in {version_dir.name}/ was built with TensorRT {built or '?'}, "
                        f"the target serving container has {target}; rebuild it with `make plan-docker`")
    profile_max = info.get("profile", {}).get("max")
    if profile_max and config.max_batch_size > profile_max:
        problems.append(f"{name}: max_batch_size {config.max_batch_size} is above the plan's "
                        f"optimization profile max {profile_max}")


def _check_ensemble(name: str, config: mc.ModelConfig, models: Dict[str, Tuple[Path, mc.ModelConfig]],
                    problems: List[str], unreadable: set) -> None:
    # Tensor name -> (dtype, dims) known so far: ensemble inputs, then step outputs.
    available = {t.name: (t.data_type, list(t.dims)) for t in config.input}
    ensemble_outputs = {t.name for t in config.output}
    for index, step in enumerate(config.ensemble_scheduling.step):
        where = f"{name}: step {index + 1} ({step.model_name})"
        if step.model_name in unreadable:  # its config's own problem is reported; what follows depends on it
            return
        if step.model_name not in models:
            problems.append(f"{where}: model {step.model_name!r} is not in the repository")
            continue
        step_config = models[step.model_name][1]
        if config.max_batch_size > step_config.max_batch_size:
            problems.append(f"{where}: ensemble max_batch_size {config.max_batch_size} is above the "
                            f"model's {step_config.max_batch_size}")
        inputs = {t.name: t for t in step_config.input}
        outputs = {t.name: t for t in step_config.output}
        for model_tensor, ensemble_tensor in step.input_map.items():
            if model_tensor not in inputs:
                problems.append(f"{where}: input_map key {model_tensor!r} is not an input of the model "
                                f"(inputs: {sorted(inputs)})")
                continue
            if ensemble_tensor not in available:
                problems.append(f"{where}: input_map value {ensemble_tensor!r} is neither an ensemble input "
                                "nor an output of an earlier step")
                continue
            _match(where, ensemble_tensor, available[ensemble_tensor], inputs[model_tensor], problems)
            if ensemble_tensor in ensemble_outputs:
                problems.append(f"{where}: {ensemble_tensor!r} is both an ensemble output and a step input; "
                                "tritonserver 2.51 then fails requests for a subset of the outputs "
                                "('unexpected deadlock'): give the intermediate tensor its own name")
        for missing in sorted(set(inputs) - set(step.input_map)):
            problems.append(f"{where}: model input {missing!r} is not mapped")
        for model_tensor, ensemble_tensor in step.output_map.items():
            if model_tensor not in outputs:
                problems.append(f"{where}: output_map key {model_tensor!r} is not an output of the model "
                                f"(outputs: {sorted(outputs)})")
                continue
            available[ensemble_tensor] = (outputs[model_tensor].data_type, list(outputs[model_tensor].dims))
    for tensor in config.output:
        if tensor.name not in available:
            problems.append(f"{name}: ensemble output {tensor.name!r} is produced by no step")
        else:
            _match(f"{name}: output", tensor.name, available[tensor.name], tensor, problems)


def _match(where: str, tensor_name: str, produced: Tuple[int, list], consumer, problems: List[str]) -> None:
    dtype, dims = produced
    if dtype != consumer.data_type:
        problems.append(f"{where}: {tensor_name!r} is {_dtype(dtype)} but {_dtype(consumer.data_type)} is expected")
    want = list(consumer.dims)
    if len(dims) != len(want) or any(a != b and -1 not in (a, b) for a, b in zip(dims, want)):
        problems.append(f"{where}: {tensor_name!r} has dims {dims} but {want} are expected")


# Backends each flavor's models run on (ensembles aside).
_FLAVOR_BACKENDS = {"local": {"python"}, "container": {"python", "onnxruntime", "tensorrt"}}


def _check_flavor(root: Path, models: Dict[str, Tuple[Path, mc.ModelConfig]], problems: List[str]) -> None:
    """A repository serves one flavor: the manifest's, in every model and every version."""
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        flavor = manifest["flavor"]
        classifier = manifest_contract(manifest).classifier
        # The inductor classifier is a Python model in both flavors.
        torch_engine = manifest.get("settings", {}).get("engine") in _TORCH_ENGINES
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return  # not written by this tool: nothing to hold it to
    served = manifest.get("settings", {})
    for entry in manifest.get("model_versions", []):
        if entry.get("flavor", flavor) != flavor:
            problems.append(f"manifest.json: version {entry.get('version')} was built for the {entry['flavor']} "
                            f"flavor in a {flavor} repository; rebuild it with --flavor {flavor}")
        for key in ("preprocess", "engine"):  # every version is served under the one config these shaped
            if key in entry and key in served and entry[key] != served[key]:
                problems.append(f"manifest.json: version {entry.get('version')} was built with {key} "
                                f"{entry[key]!r}, the served config is for {served[key]!r}; all versions share "
                                "one config: rebuild the repository")
    for name, (_, config) in models.items():
        if config.platform == "ensemble":
            continue
        backend = config.backend or _PLATFORM_BACKEND.get(config.platform, config.platform)
        if backend not in KNOWN_BACKENDS:
            continue  # a typo, reported by _check_model; not a mix of flavors
        native = name == classifier and flavor == "container" and backend == "python" and not torch_engine
        if backend not in _FLAVOR_BACKENDS.get(flavor, {backend}) or native:
            problems.append(f"{name}: runs on the {backend} backend, but the repository is the {flavor} flavor "
                            f"(manifest.json); the models mix flavors: rebuild with --flavor {flavor}")


def _check_classifier_placement(root: Path, models: Dict[str, Tuple[Path, mc.ModelConfig]],
                                problems: List[str]) -> None:
    """A classifier whose work is on a GPU (the gpu preprocessing's tensors, an engine built for CUDA) runs on
    GPU instances: on CPU instances it would serve at a few images a second."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        classifier = manifest_contract(manifest).classifier
        settings, engine = manifest.get("settings") or {}, manifest.get("engine") or {}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return
    if classifier not in models:
        return
    kinds = {group.kind for group in models[classifier][1].instance_group}
    if not kinds or kinds - {mc.ModelInstanceGroup.KIND_CPU}:
        return  # on the GPU, or left to Triton (KIND_AUTO)
    photo_on_gpu = (settings.get("preprocess") == "gpu"
                    and (settings.get("preprocess_instances") or {}).get("kind") == "KIND_GPU")
    why = ("the gpu photo path's GPU instances hand it GPU tensors" if photo_on_gpu else
           f"its {engine.get('chosen')} engine was built for {engine.get('gpu')}"
           if engine.get("gpu") and engine.get("chosen") in ("inductor", "tensorrt") else None)
    if why:
        problems.append(f"{classifier}: runs on CPU instances (KIND_CPU) and {why}; rebuild with --instance-kind "
                        "KIND_GPU, or without --instance-kind (the build then places it on the GPU)")


def _check_served_files(root: Path, models: Dict[str, Tuple[Path, mc.ModelConfig]], problems: List[str]) -> None:
    """Every served version holds what the build wrote into it (manifest.json's files), and its Python compiles.

    A local classifier loads `model.onnx`, a plan or the inductor program through its `model.py`, and a Python
    model imports the modules copied beside it: none of them is named by the config, so the config alone
    cannot say that one is missing. The manifest can, in every flavor and engine.
    """
    try:
        built = json.loads((root / MANIFEST).read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        built = {}  # not written by this tool: only the Python is checked
    for name, (model_dir, config) in models.items():
        named = _model_filename(config)  # _check_model's to report (one cause, one line)
        for version in _versions(model_dir, config) if config.platform != "ensemble" else ():
            prefix = f"{name}/{version}/"
            missing = sorted(path[len(prefix):] for path in built if path.startswith(prefix)
                             and path[len(prefix):] != named and not (root / path).is_file())
            if missing:
                problems.append(f"{name}: version {version} lacks {', '.join(missing[:3])}"
                                f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}, which the build "
                                "wrote and the model loads; restore it or rebuild the repository")
            for source in sorted((model_dir / str(version)).glob("*.py")):
                try:
                    compile(source.read_bytes(), str(source), "exec")
                except (SyntaxError, ValueError) as exc:
                    where = f", line {exc.lineno}" if getattr(exc, "lineno", None) else ""
                    problems.append(f"{name}: version {version}'s {source.name} does not compile "
                                    f"({getattr(exc, 'msg', exc)}{where}), so the model would not load; fix it "
                                    "or rebuild the repository")


def needs_torch(root) -> bool:
    """Whether the repository's Python models run torch (the inductor engine or the gpu preprocessing).

    Raises:
        BuilderError: No manifest (not a repository written by this tool).
    """
    from builder.core.manifest import read_manifest

    settings = read_manifest(Path(root)).get("settings", {})
    return settings.get("engine") in _TORCH_ENGINES or settings.get("preprocess") == "gpu"


def missing_backends(root: Path, available) -> List[Tuple[str, str]]:
    """(model, backend) pairs of the repository whose backend is not in `available`."""
    missing = []
    for config_path in sorted(Path(root).glob("*/config.pbtxt")):
        try:
            config = configs.read(config_path)
        except (text_format.ParseError, UnicodeDecodeError):
            continue  # the server reports unparsable configs itself
        if config.platform == "ensemble":
            continue
        backend = config.backend or _PLATFORM_BACKEND.get(config.platform, config.platform)
        if backend not in available:
            missing.append((config_path.parent.name, backend))
    return missing


def check_repository(root: Path) -> List[str]:
    """Lists what tritonserver would reject in a model repository.

    Args:
        root: The repository folder.

    Returns:
        One message per problem; empty when none was found.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root} is not a folder; build it with `make repo`"]
    problems: List[str] = []
    unreadable: set = set()
    models = _load_configs(root, problems, unreadable)
    if not models and not problems:
        problems.append(f"{root} holds no models")
    _check_flavor(root, models, problems)
    _check_served_files(root, models, problems)
    _check_classifier_placement(root, models, problems)
    for name, (model_dir, config) in models.items():
        _check_model(name, model_dir, config, problems)
        if config.platform == "ensemble":
            # dynamic_batching cannot appear here: it shares a oneof with ensemble_scheduling, and
            # text_format refuses a config that sets both (reported as a parse error above).
            if not config.ensemble_scheduling.step:
                problems.append(f"{name}: ensemble has no steps")
            _check_ensemble(name, config, models, problems, unreadable)
    return problems
