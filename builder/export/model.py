"""Creating the timm model and loading its weights."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from builder.errors import BuilderError
from builder.settings import ModelSource

log = logging.getLogger("builder")


@dataclass
class LoadedModel:
    """A timm model in eval mode with what the repository needs to know.

    Attributes:
        module: The torch module (eval mode, CPU).
        data_config: timm's resolved data config (input size, crop, mean/std).
        num_classes: Number of logits.
        weights: Where the weights came from: `pretrained:<tag>`,
            `checkpoint:<path>` or `random:seed=<n>`.
        class_names: One human-readable name per class.
        labels: Where the class names came from: `file:<path>`,
            `timm:imagenet-1k` (or 22k) or `indices`.
    """

    module: Any
    data_config: Dict[str, Any]
    num_classes: int
    weights: str
    class_names: list
    labels: str = "indices"


def _class_names(num_classes: int, labels: Optional[str] = None) -> Tuple[list, str]:
    """The class names and where they came from: the user's file, timm's ImageNet sets, or indices."""
    if labels:
        return _labels_file(labels, num_classes), f"file:{labels}"
    from timm.data import ImageNetInfo

    if num_classes in (1000, 11821, 12000, 21841, 21843, 22000):
        try:
            subset = "imagenet-1k" if num_classes == 1000 else "imagenet-22k"
            info = ImageNetInfo(subset)
            return [info.index_to_description(i) for i in range(num_classes)], f"timm:{subset}"
        except Exception:  # timm lacks this label set: fall back to indices
            pass
    return [f"class_{i}" for i in range(num_classes)], "indices"


def _labels_file(path: str, num_classes: int) -> list:
    """One class name per line; trailing blank lines are ignored, any other blank or repeated name is refused."""
    try:
        names = Path(path).read_text(encoding="utf-8").rstrip("\n\r ").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BuilderError(f"labels: cannot read {path} as UTF-8 text ({exc}); pass a text file with one class "
                           "name per line") from None
    names = [name.strip() for name in names]
    if len(names) != num_classes:
        raise BuilderError(f"labels: {path} has {len(names)} name(s) and the model has {num_classes} classes; "
                           "give one name per class, in class order")
    blank = next((i for i, name in enumerate(names) if not name), None)
    if blank is not None:
        raise BuilderError(f"labels: line {blank + 1} of {path} is blank; give every class a name")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise BuilderError(f"labels: {path} names {', '.join(map(repr, repeated[:3]))} more than once; "
                           "give each class its own name")
    return names


def _load_checkpoint(path: str) -> Dict[str, Any]:
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own errors for a damaged or foreign file
            raise BuilderError(f"checkpoint: {path!r} is not a readable safetensors file ({type(exc).__name__}: "
                               f"{str(exc)[:160]}); save it with safetensors.torch.save_file") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BuilderError(f"checkpoint: cannot load {path!r} as a state dict ({exc.__class__.__name__}); "
                           "save it with torch.save(model.state_dict(), path) or as .safetensors") from None
    if not isinstance(state, dict):
        raise BuilderError(f"checkpoint: {path!r} holds a {type(state).__name__}, not a state dict; save it with "
                           "torch.save(model.state_dict(), path)")
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items()}


def _own_input_size(module, data_config: Dict[str, Any], source: ModelSource) -> Dict[str, Any]:
    """The data config for the size the model was built for (kwargs such as img_size change it).

    timm resolves the data config from the pretrained config, which keeps the
    default size; the preprocessing must produce what the model takes.

    Raises:
        BuilderError: The model does not run on that size (e.g. a size its windows do not divide).
    """
    import torch

    size = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if size is not None and tuple(size) != tuple(data_config["input_size"][1:]):
        log.info("model_kwargs set the input size to %s (timm's data config says %s)", tuple(size),
                 tuple(data_config["input_size"][1:]))
        data_config = {**data_config, "input_size": (3, *(int(v) for v in size))}
    try:
        with torch.no_grad():
            module(torch.zeros(1, *data_config["input_size"]))
    except Exception as exc:
        raise BuilderError(f"model_kwargs: {source.model_name} with {source.model_kwargs} does not run on its "
                           f"input size {tuple(data_config['input_size'][1:])} "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                           "change img_size or window_size") from None
    return data_config


def load_model(source: ModelSource) -> LoadedModel:
    """Creates the timm model named by `source` with its weights.

    Args:
        source: Model name, weights choice and extra timm kwargs.

    Returns:
        The loaded model.

    Raises:
        BuilderError: Unknown model, hub unreachable, checkpoint mismatch.
    """
    import timm
    import torch

    if not timm.is_model(source.model_name):
        close = timm.list_models(f"*{source.model_name.split('_')[0]}*")[:5]
        raise BuilderError(f"model_name: timm has no model {source.model_name!r}"
                           + (f"; similar: {', '.join(close)}" if close else ""))
    torch.manual_seed(source.seed)
    try:
        module = timm.create_model(source.model_name, pretrained=source.pretrained, **source.kwargs)
    except TypeError as exc:
        raise BuilderError(f"model_kwargs: timm rejected them ({exc})") from None
    except Exception as exc:
        if not source.pretrained:  # values timm accepts by name but cannot build with (negative sizes, ...)
            raise BuilderError(f"model_kwargs: timm could not build {source.model_name} with {source.model_kwargs} "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                               "pass sizes timm's Swin accepts") from None
        raise BuilderError(
            f"pretrained weights for {source.model_name} could not be downloaded from timm's hub "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); run with network access, "
            "pass --checkpoint PATH, or build with random weights") from None
    if source.pretrained:
        tag = module.pretrained_cfg.get("tag") or "default"
        weights = f"pretrained:{module.pretrained_cfg.get('hf_hub_id') or source.model_name}:{tag}"
    elif source.checkpoint:
        state = _load_checkpoint(source.checkpoint)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()
            raise BuilderError(f"checkpoint: {source.checkpoint!r} does not fit {source.model_name}: "
                               f"{' '.join(first[:2])[:300]}") from None
        weights = f"checkpoint:{source.checkpoint}"
    else:
        weights = f"random:seed={source.seed}"
        log.warning("RANDOM WEIGHTS: %s is built with random initialization (seed %d); its predictions "
                    "are meaningless. Use --pretrained or --checkpoint PATH for a real classifier.",
                    source.model_name, source.seed)
    module.eval()
    data_config = timm.data.resolve_data_config({}, model=module)
    num_classes = int(module.num_classes)
    if num_classes < 1:
        raise BuilderError("model_kwargs: num_classes is 0 (a feature extractor); "
                           "the repository needs a classifier head")
    data_config = _own_input_size(module, data_config, source)
    class_names, labels = _class_names(num_classes, source.labels)
    return LoadedModel(module, data_config, num_classes, weights, class_names, labels)
