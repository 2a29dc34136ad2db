"""Image bytes -> the tensor timm's eval transform produces, with numpy and Pillow.

This module is copied next to the preprocess model's `model.py` and runs inside
tritonserver's Python backend, where NVIDIA's image has no torch: it imports
only the standard library, numpy and Pillow. It is also the client-side
preprocessing used when calling the bare classifier.

The transform reproduces `timm.data.create_transform(**resolve_data_config(...))`
on a PIL image (torchvision's PIL code path): resize the shorter edge to
`floor(size / crop_pct)` with Pillow's resampling, center crop, scale to
[0, 1], normalize with mean/std in float32. Before it, uploads are decoded the
way real services need: EXIF orientation applied, first frame of animations,
palette/grayscale/CMYK converted to RGB, 16-bit samples scaled (not clipped)
to 8 bits, transparency composited over a background color, decompression
bombs refused before their pixels are decoded.

With `jpeg_draft` (the `draft` preprocessing) a large JPEG is decoded by
libjpeg at a reduced scale (1/2, 1/4 or 1/8, Pillow's `Image.draft`), the
smallest that still covers the resize size, then resized as usual: not
bit-identical to timm's transform, so the builder gates it against the exact
path and records the figures.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
    "box": Image.BOX,
    "hamming": Image.HAMMING,
}
CROP_MODES = ("center", "squash")
# Resizing the whole image is exact but, for extreme aspect ratios, the resized
# image can be enormous (a 1x10000 strip becomes 248x2480000). Past this
# factor over the crop area only the cropped region is resampled, which is the
# same computation up to float rounding of the sampling positions.
_FULL_RESIZE_MAX_FACTOR = 16


class ImageError(ValueError):
    """An input that is not a usable image; the message names the problem."""


@dataclass(frozen=True)
class PreprocessParams:
    """Parameters of the eval transform, taken from timm's data config.

    Attributes:
        image_size: (height, width) of the output tensor.
        scale_size: (height, width) before cropping; for `center` mode the
            shorter edge is resized to `scale_size[0]`.
        crop_mode: `center` (keep aspect ratio) or `squash`.
        interpolation: Pillow resampling filter name (`bicubic`, ...).
        mean: Per-channel mean, RGB.
        std: Per-channel standard deviation, RGB.
        max_pixels: Largest width*height accepted before decoding.
        background: RGB color transparent pixels are composited over.
        jpeg_draft: Decode JPEGs at the smallest DCT scale that still covers
            the resize size (not exact; see the module docstring).
    """

    image_size: Tuple[int, int]
    scale_size: Tuple[int, int]
    crop_mode: str
    interpolation: str
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    max_pixels: int = 64_000_000
    background: Tuple[int, int, int] = (255, 255, 255)
    jpeg_draft: bool = False

    def __post_init__(self) -> None:
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not supported; use one of {CROP_MODES}")
        if self.crop_mode == "center" and self.image_size[0] != self.image_size[1]:
            raise ValueError("crop_mode 'center' is supported for square image sizes only")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values, std positive")

    @classmethod
    def from_timm(cls, data_config: Dict, max_pixels: int = 64_000_000) -> "PreprocessParams":
        """Builds the parameters from `timm.data.resolve_data_config(...)`.

        Args:
            data_config: timm's data config (input_size, crop_pct, ...).
            max_pixels: Largest accepted image area.

        Returns:
            The matching parameters.
        """
        _, height, width = data_config["input_size"]
        crop_pct = data_config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
        return cls(
            image_size=(int(height), int(width)),
            scale_size=(math.floor(height / crop_pct), math.floor(width / crop_pct)),
            crop_mode=data_config.get("crop_mode") or "center",
            interpolation=data_config.get("interpolation", "bilinear"),
            mean=tuple(float(v) for v in data_config["mean"]),
            std=tuple(float(v) for v in data_config["std"]),
            max_pixels=max_pixels,
        )

    def to_parameters(self) -> Dict[str, str]:
        """Flattens to Triton config `parameters` (string values)."""
        return {key: ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)
                for key, value in asdict(self).items()}

    @classmethod
    def from_parameters(cls, params: Dict[str, str]) -> "PreprocessParams":
        """Inverse of :meth:`to_parameters`."""
        def ints(key: str) -> Tuple[int, ...]:
            return tuple(int(v) for v in params[key].split(","))

        def floats(key: str) -> Tuple[float, ...]:
            return tuple(float(v) for v in params[key].split(","))

        return cls(
            image_size=ints("image_size"),
            scale_size=ints("scale_size"),
            crop_mode=params["crop_mode"],
            interpolation=params["interpolation"],
            mean=floats("mean"),
            std=floats("std"),
            max_pixels=int(params["max_pixels"]),
            background=ints("background"),
            jpeg_draft=_flag(params, "jpeg_draft"),
        )


def _flag(params: Dict[str, str], key: str) -> bool:
    """A True/False config parameter; absent means False (repositories built before it)."""
    value = params.get(key, "False")
    if value not in ("True", "False", "true", "false"):
        raise ValueError(f"parameter {key} is {value!r}; set it to True or False")
    return value in ("True", "true")


def decode(data: bytes, params: PreprocessParams) -> Image.Image:
    """Decodes encoded image bytes into an upright 8-bit RGB image.

    Args:
        data: The file's bytes (JPEG, PNG, WebP, GIF, BMP, TIFF, ...).
        params: Supplies `max_pixels` and the `background` color.

    Returns:
        An RGB PIL image.

    Raises:
        ImageError: Empty, unreadable, corrupt, truncated or too large input.
    """
    if not data:
        raise ImageError("empty input: the image has 0 bytes")
    try:
        with warnings.catch_warnings():
            # The size check below replaces Pillow's own bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(f"not a decodable image ({len(data)} bytes, starting {data[:8]!r}); "
                         "send JPEG, PNG, WebP, GIF, BMP or TIFF bytes") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        # A header cut short or mangled (e.g. a JPEG marker with no segment): Pillow fails in open().
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    width, height = image.size
    if width * height > params.max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels, "
                         f"above the limit of {params.max_pixels}; downscale it before sending")
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    _draft(image, params)
    try:
        image.load()  # truncated or corrupt data fails here, not at open()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image, params.background)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None


def _draft(image: Image.Image, params: PreprocessParams) -> bool:
    """Sets an opened JPEG's decoder to the draft scale (`jpeg_draft`); True when that scale is reduced."""
    if not (params.jpeg_draft and image.format == "JPEG"):
        return False
    size = image.size
    # Both sides at least the largest resize side: the shorter edge still covers the resize whichever way
    # EXIF turns the image. libjpeg then scales in the IDCT (8x8 blocks to 4x4, 2x2 or 1x1): a 12 MP photo
    # decoded about 10x faster on a CPU (perf/results/cpu-draft).
    side = max(params.scale_size)
    image.draft(image.mode, (side, side))
    return image.size != size


def decodes_reduced(data: bytes, params: PreprocessParams) -> bool:
    """Whether :func:`decode` reads this upload at a reduced scale (from its header; no pixels decoded)."""
    try:
        return _draft(Image.open(io.BytesIO(data)), params)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError,
            struct.error):
        return False  # decode refuses it


def _to_rgb(image: Image.Image, background: Tuple[int, int, int]) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: Pillow's convert("RGB") clips at 255, which turns
        # most pixels white. Scale the full range down instead.
        samples = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if samples.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        gray = np.clip(np.rint(samples * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if image.mode == "F":
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _resized_size(width: int, height: int, params: PreprocessParams) -> Tuple[int, int]:
    """Output (width, height) of the resize step, torchvision's rules."""
    if params.crop_mode == "squash":
        return params.scale_size[1], params.scale_size[0]
    size = params.scale_size[0]
    # torchvision.transforms.Resize(int): shorter edge to `size`, the longer
    # edge scaled and truncated with int().
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def transform(image: Image.Image, params: PreprocessParams) -> np.ndarray:
    """Applies the eval transform to an RGB image.

    Args:
        image: RGB PIL image.
        params: The transform's parameters.

    Returns:
        float32 array of shape (3, height, width).
    """
    crop_h, crop_w = params.image_size
    resample = _RESAMPLE[params.interpolation]
    new_w, new_h = _resized_size(image.width, image.height, params)
    if new_w >= crop_w and new_h >= crop_h:
        # torchvision's CenterCrop offsets.
        top = int(round((new_h - crop_h) / 2.0))
        left = int(round((new_w - crop_w) / 2.0))
        if new_w * new_h <= _FULL_RESIZE_MAX_FACTOR * crop_w * crop_h:
            resized = image if (new_w, new_h) == image.size else image.resize((new_w, new_h), resample)
            cropped = resized.crop((left, top, left + crop_w, top + crop_h))
        else:
            sx, sy = image.width / new_w, image.height / new_h
            box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
            cropped = image.resize((crop_w, crop_h), resample, box=box)
        pixels = np.asarray(cropped, dtype=np.uint8)
    else:
        # Smaller than the crop (crop_pct > 1): torchvision pads with zeros
        # around the resized image, then crops the center.
        resized = np.asarray(image.resize((new_w, new_h), resample), dtype=np.uint8)
        pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
        padded = np.pad(resized, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        ph, pw = padded.shape[:2]
        top, left = int(round((ph - crop_h) / 2.0)), int(round((pw - crop_w) / 2.0))
        pixels = padded[top:top + crop_h, left:left + crop_w]
    chw = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(params.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(params.std, dtype=np.float32).reshape(3, 1, 1)
    return (chw - mean) / std


def preprocess(data: bytes, params: PreprocessParams) -> np.ndarray:
    """Decodes and transforms one image (see :func:`decode`, :func:`transform`)."""
    return transform(decode(data, params), params)


def try_preprocess(data: bytes, params: PreprocessParams) -> Tuple[Optional[np.ndarray], Optional[str]]:
    """(pixels, None), or (None, the error message) for an unusable image."""
    try:
        return preprocess(data, params), None
    except ImageError as exc:
        return None, str(exc)


def preprocess_many(
    items: Sequence[bytes], params: PreprocessParams
) -> Tuple[np.ndarray, List[Optional[str]]]:
    """Preprocesses a batch, isolating failures.

    Args:
        items: Encoded images.
        params: The transform's parameters.

    Returns:
        (batch, errors): a float32 array (n, 3, H, W), with zeros where an
        item failed, and one error message or None per item.
    """
    batch = np.zeros((len(items), 3, *params.image_size), dtype=np.float32)
    errors: List[Optional[str]] = []
    for i, data in enumerate(items):
        pixels, error = try_preprocess(data, params)
        if pixels is not None:
            batch[i] = pixels
        errors.append(error)
    return batch, errors


def as_bytes(item: Union[bytes, bytearray, memoryview, np.ndarray, np.generic]) -> bytes:
    """Normalizes one element of a Triton BYTES tensor to `bytes`."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray):
        return item.tobytes()
    return bytes(item)
