"""Triton model configs as `ModelConfig` protobuf messages.

Configs are built with the schema tritonclient ships
(`tritonclient.grpc.model_config_pb2`) and written with `text_format`, so a
misspelled field fails here instead of in tritonserver. Two proto3 traps are
handled on purpose: `max_batch_size: 0` is never written (zero is the default
and is dropped), and `dynamic_batching` / `ensemble_scheduling` share one
oneof, so an ensemble never gets a dynamic batcher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builder.core.contract import CLASSIFIER_LOGITS, WARMUP_IMAGE, Contract, TensorSpec
from builder.settings import Batching, InstanceGroup, VersionPolicy

ModelConfig = mc.ModelConfig


def _tensor(message, spec: TensorSpec) -> None:
    message.name = spec.name
    message.data_type = mc.DataType.Value(spec.config_dtype)
    message.dims.extend(spec.dims)


def _add_io(config: mc.ModelConfig, inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> None:
    for spec in inputs:
        _tensor(config.input.add(), spec)
    for spec in outputs:
        _tensor(config.output.add(), spec)
        if spec.label_filename:  # an output indexed by class: Triton's classification extension names them
            config.output[-1].label_filename = spec.label_filename


def _version_policy(config: mc.ModelConfig, policy: VersionPolicy) -> None:
    if policy.kind == "latest":
        config.version_policy.latest.num_versions = policy.num_versions
    elif policy.kind == "all":
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.specific.versions.extend(policy.versions)


def _instances(config: mc.ModelConfig, group: InstanceGroup) -> None:
    message = config.instance_group.add()
    message.kind = mc.ModelInstanceGroup.Kind.Value(group.kind)
    message.count = group.count
    message.gpus.extend(group.gpus)


def _dynamic_batching(config: mc.ModelConfig, batching: Batching) -> None:
    config.dynamic_batching.SetInParent()
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    if batching.max_queue_size or batching.queue_timeout_us:
        policy = config.dynamic_batching.default_queue_policy
        policy.timeout_action = mc.ModelQueuePolicy.TimeoutAction.REJECT  # proto3's zero: not in the text
        policy.default_timeout_microseconds = batching.queue_timeout_us
        policy.allow_timeout_override = True  # a client may ask for a shorter deadline, never a longer queue
        policy.max_queue_size = batching.max_queue_size
    if batching.priority_levels:
        config.dynamic_batching.priority_levels = batching.priority_levels
        config.dynamic_batching.default_priority_level = batching.priority_levels  # unmarked requests go last


def _parameters(config: mc.ModelConfig, parameters: Mapping[str, str]) -> None:
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)


def parameters(config: mc.ModelConfig) -> Dict[str, str]:
    """Every config parameter as a string, as a Python-backend model reads them."""
    return {key: value.string_value for key, value in config.parameters.items()}


def parameter(config: mc.ModelConfig, key: str, default: str = "") -> str:
    """A config parameter's string value, or `default` when the config has none."""
    return config.parameters[key].string_value if key in config.parameters else default


def _base(name: str, batching: Batching, policy: VersionPolicy) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, max_batch_size=batching.max_batch_size)
    _version_policy(config, policy)
    return config


def python_model(
    name: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    batching: Batching,
    instances: InstanceGroup,
    policy: VersionPolicy,
    parameters: Optional[Mapping[str, str]] = None,
    response_cache: bool = False,
) -> mc.ModelConfig:
    """A Python-backend model with dynamic batching.

    Args:
        name: Model name.
        inputs: Input tensors (dims without batch).
        outputs: Output tensors.
        batching: max_batch_size and dynamic batcher settings.
        instances: Instance group.
        policy: Version policy.
        parameters: String parameters the model reads in `initialize`.
        response_cache: Identical requests answered from Triton's response cache.

    Returns:
        The config message.
    """
    config = _base(name, batching, policy)
    config.backend = "python"
    _add_io(config, inputs, outputs)
    _dynamic_batching(config, batching)
    _instances(config, instances)
    _parameters(config, parameters or {})
    _response_cache(config, response_cache)
    return config


def _response_cache(config: mc.ModelConfig, enabled: bool) -> None:
    if enabled:  # assigning even False would write an empty `response_cache {}` block
        config.response_cache.enable = True


def _classification(config: mc.ModelConfig, contract: Contract, batching: Batching) -> mc.ModelConfig:
    """What makes the classifier a Triton image classifier for any client and tool.

    The image input declares its layout (FORMAT_NCHW, which generic image
    clients require; the logits carry the labels file as every class-indexed output
    of the contract does), and a zero-filled warm-up runs at every
    preferred batch size, so the first real request is as fast as the tenth.
    """
    config.input[0].format = mc.ModelInput.FORMAT_NCHW
    for size in sorted({1, *batching.preferred_batch_sizes}):
        warmup = config.model_warmup.add(name=f"zeros_batch_{size}", batch_size=size)
        tensor = warmup.inputs[contract.pixels.name]
        tensor.data_type = mc.DataType.Value(contract.pixels.config_dtype)
        tensor.dims.extend(contract.pixels.dims)
        tensor.zero_data = True
    return config


def preprocess_warmup(config: mc.ModelConfig, contract: Contract) -> mc.ModelConfig:
    """Warms the preprocess model up with the bundled photo (`warmup/` in its model directory)."""
    warmup = config.model_warmup.add(name="photo", batch_size=1)
    tensor = warmup.inputs[contract.image.name]
    tensor.data_type = mc.DataType.Value(contract.image.config_dtype)
    tensor.dims.extend(contract.image.dims)
    tensor.input_data_file = WARMUP_IMAGE
    return config


def _native_classifier(contract: Contract, batching: Batching, instances: InstanceGroup, policy: VersionPolicy,
                       platform: str, backend: str) -> mc.ModelConfig:
    config = _base(contract.classifier, batching, policy)
    config.platform = platform
    config.backend = backend
    _add_io(config, [contract.pixels], [contract.logits])
    _dynamic_batching(config, batching)
    _instances(config, instances)
    return _classification(config, contract, batching)


def onnx_classifier(
    contract: Contract, batching: Batching, instances: InstanceGroup, policy: VersionPolicy,
    tensorrt_accelerator: bool = False,
) -> mc.ModelConfig:
    """The classifier on Triton's native ONNX Runtime backend (`container` flavor).

    With `tensorrt_accelerator`, ONNX Runtime runs it through its TensorRT
    execution provider in FP16, caching the built engines in the model
    directory (`/models/<classifier>/trt_cache`, as the container mounts it).
    """
    config = _native_classifier(contract, batching, instances, policy, "onnxruntime_onnx", "onnxruntime")
    if tensorrt_accelerator:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update({
            "precision_mode": "FP16", "max_workspace_size_bytes": str(4 << 30),
            "trt_engine_cache_enable": "1", "trt_engine_cache_path": f"/models/{contract.classifier}/trt_cache"})
    return config


def tensorrt_classifier(
    contract: Contract, batching: Batching, instances: InstanceGroup, policy: VersionPolicy,
    cuda_graphs: bool = False,
) -> mc.ModelConfig:
    """The classifier as a TensorRT plan on Triton's native tensorrt backend."""
    config = _native_classifier(contract, batching, instances, policy, "tensorrt_plan", "tensorrt")
    if cuda_graphs:
        config.optimization.cuda.graphs = True
        # One graph per preferred batch size (or the largest batch) keeps capture memory bounded.
        for size in batching.preferred_batch_sizes or (batching.max_batch_size,):
            spec = config.optimization.cuda.graph_spec.add()
            spec.batch_size = size
    return config


def local_classifier(
    contract: Contract, batching: Batching, instances: InstanceGroup, policy: VersionPolicy,
    parameters: Optional[Mapping[str, str]] = None,
) -> mc.ModelConfig:
    """The classifier inside the Python backend (ONNX Runtime, a TensorRT plan or the torch engine)."""
    return _classification(python_model(contract.classifier, [contract.pixels], [contract.logits],
                                        batching, instances, policy, parameters), contract, batching)


def ensemble(contract: Contract, max_batch_size: int, policy: VersionPolicy,
             response_cache: bool = False) -> mc.ModelConfig:
    """The ensemble: image bytes -> preprocess -> classifier -> postprocess.

    Its outputs are the probabilities plus the classifier's raw logits, both
    produced by the postprocess step (see `contract.CLASSIFIER_LOGITS`) and both
    labelled (the ensemble's own `labels.txt`).
    """
    config = mc.ModelConfig(name=contract.ensemble, platform="ensemble", max_batch_size=max_batch_size)
    _response_cache(config, response_cache)
    _version_policy(config, policy)
    _add_io(config, [contract.image], contract.ensemble_outputs)
    steps: Sequence[Tuple[str, Dict[str, str], Dict[str, str]]] = (
        (contract.preprocess, {contract.image.name: contract.image.name},
         {contract.pixels.name: contract.pixels.name}),
        (contract.classifier, {contract.pixels.name: contract.pixels.name},
         {contract.logits.name: CLASSIFIER_LOGITS}),
        (contract.postprocess, {contract.logits.name: CLASSIFIER_LOGITS},
         {spec.name: spec.name for spec in contract.postprocess_outputs}),
    )
    for model_name, input_map, output_map in steps:
        step = config.ensemble_scheduling.step.add()
        step.model_name = model_name
        step.model_version = -1
        step.input_map.update(input_map)
        step.output_map.update(output_map)
    return config


def one_line(message) -> str:
    """A config message (or part of one) as one line of config text."""
    return text_format.MessageToString(message, as_one_line=True)


def to_text(config: mc.ModelConfig) -> str:
    """Serializes a config as config.pbtxt text."""
    return text_format.MessageToString(config)


def write(config: mc.ModelConfig, model_dir: Path) -> Path:
    """Writes `config.pbtxt` into `model_dir` (call it after the model's files)."""
    path = Path(model_dir) / "config.pbtxt"
    path.write_text(to_text(config), encoding="utf-8")
    return path


def read_text(text: str) -> mc.ModelConfig:
    """Parses config.pbtxt text.

    Raises:
        google.protobuf.text_format.ParseError: Unknown fields or bad syntax.
    """
    return text_format.Parse(text, mc.ModelConfig())


def read(path: Path) -> mc.ModelConfig:
    """Parses a config.pbtxt file.

    Raises:
        google.protobuf.text_format.ParseError: Unknown fields or bad syntax.
    """
    return read_text(Path(path).read_text(encoding="utf-8"))
