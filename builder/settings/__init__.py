"""Validated build settings: small frozen dataclasses, each value declared once.

`parts.py`: what every stage's settings are made of (the model's source, batching, instance groups, parity, the
version policy, the choices and limits); `repo.py`: the repository build's settings (`RepoSettings`) and the GPU
photo path's setup. Everything is read from here (`from builder import settings as s`).
"""

from builder.errors import BuilderError  # what every check raises
from builder.settings.parts import (
    DEFAULT_MODEL, FLAVORS, PREPROCESS, GPU_PHOTO_PATHS, IN_PROCESS_PHOTO_PATHS, GPU_DECODERS, ENGINES,
    TORCH_COMPILE, INDUCTOR_PRECISIONS, QUANTIZED_PRECISIONS, TORCHAO_PRECISIONS, RACED_PRECISIONS,
    FUSED_RACED_PRECISIONS, WINDOW_ATTENTIONS, INSTANCE_KINDS,
    TENSORRT_PRECISIONS, TRITON_RELEASE, TRITON_VERSION, TENSORRT_VERSION, MAX_QUEUE_DELAY_US, MAX_INSTANCES,
    check_model_name, ModelSource, Batching, InstanceGroup, Parity, LOW_PRECISION_PARITY, VersionPolicy)
from builder.settings.repo import (
    PYTHON_MODEL_INSTANCES, GPU_PHOTO_PATH_SETUP, PHOTO_SETUP_MODES, PhotoSetup, MANY_PHOTO_PATH_INSTANCES,
    torch_threads, classifier_kind, default_preprocess_instances, RepoSettings)

__all__ = ['BuilderError', 'DEFAULT_MODEL', 'FLAVORS', 'PREPROCESS', 'GPU_PHOTO_PATHS', 'IN_PROCESS_PHOTO_PATHS',
           'GPU_DECODERS', 'ENGINES', 'TORCH_COMPILE', 'INDUCTOR_PRECISIONS', 'QUANTIZED_PRECISIONS',
           'TORCHAO_PRECISIONS', 'RACED_PRECISIONS', 'FUSED_RACED_PRECISIONS', 'WINDOW_ATTENTIONS', 'INSTANCE_KINDS',
           'TENSORRT_PRECISIONS', 'TRITON_RELEASE',
           'TRITON_VERSION', 'TENSORRT_VERSION', 'MAX_QUEUE_DELAY_US', 'MAX_INSTANCES', 'check_model_name',
           'ModelSource', 'Batching', 'InstanceGroup', 'Parity', 'LOW_PRECISION_PARITY', 'VersionPolicy',
           'PYTHON_MODEL_INSTANCES', 'GPU_PHOTO_PATH_SETUP', 'PHOTO_SETUP_MODES', 'PhotoSetup',
           'MANY_PHOTO_PATH_INSTANCES', 'torch_threads', 'classifier_kind', 'default_preprocess_instances',
           'RepoSettings']
