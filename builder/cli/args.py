"""Options the command lines share, each declared once, its default taken from the settings dataclasses.

In the spirit of Polygraphy's `tools/args`: a group adds its options to a parser and turns the parsed values
back into the settings object it stands for. Standard library and `builder.settings` only, so `--help` stays
instant and the TensorRT-only Python (`builder.engines.trt`) can use it too.
"""

from __future__ import annotations

import argparse
import dataclasses

from builder.settings import DEFAULT_MODEL, ModelSource, Parity


def field_default(cls, name: str):
    """The default of dataclass `cls`'s field `name` (its factory's value for a `default_factory`)."""
    spec = next(f for f in dataclasses.fields(cls) if f.name == name)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def ints(text: str) -> tuple:
    """argparse type: a comma-separated list of integers."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model, --pretrained | --checkpoint, --model-kwargs, --seed: the timm model to build from."""
    source = ModelSource()
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help=f"timm model name (default {source.model_name})")
    weights = group.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights from its hub")
    weights.add_argument("--checkpoint", default=source.checkpoint, help="safetensors file or state dict to load")
    group.add_argument("--model-kwargs", default=source.model_kwargs, help="JSON of extra timm.create_model kwargs")
    group.add_argument("--seed", type=int, default=source.seed, help="seed for random weights")


def model_source(args: argparse.Namespace) -> ModelSource:
    """The `ModelSource` the model options describe."""
    return ModelSource(args.model or DEFAULT_MODEL, args.pretrained, args.checkpoint, args.model_kwargs,
                       args.seed, getattr(args, "labels", None))


def add_parity_args(parser: argparse.ArgumentParser, defaults: Parity, top1: bool = True,
                    what: str = "the candidate") -> None:
    """--max-abs, --min-cosine (and --min-top1): thresholds of a parity gate, defaults from `defaults`."""
    group = parser.add_argument_group("parity gate", f"thresholds {what} must meet against its reference")
    group.add_argument("--max-abs", type=float, default=defaults.max_abs,
                       help=f"largest allowed logit difference (default {defaults.max_abs:g})")
    group.add_argument("--min-cosine", type=float, default=defaults.min_cosine,
                       help=f"smallest allowed cosine of a row of logits (default {defaults.min_cosine:g})")
    if top1:
        group.add_argument("--min-top1", type=float, default=defaults.min_top1,
                           help=f"smallest allowed top-1 agreement (default {defaults.min_top1:g})")


def parity(args: argparse.Namespace, defaults: Parity) -> Parity:
    """The `Parity` the parity options describe (options a parser lacks keep `defaults`' values)."""
    return dataclasses.replace(defaults, max_abs=args.max_abs, min_cosine=args.min_cosine,
                               min_top1=getattr(args, "min_top1", defaults.min_top1))
