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


# The largest image (in pixels) a model decodes: larger uploads are refused before decoding (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000


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
    max_pixels: int = MAX_IMAGE_PIXELS
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
    def from_timm(cls, data_config: Dict, max_pixels: Optional[int] = None) -> "PreprocessParams":
        """Builds the parameters from `timm.data.resolve_data_config(...)`.

        Args:
            data_config: timm's data config (input_size, crop_pct, ...).
            max_pixels: Largest accepted image area (None: MAX_IMAGE_PIXELS).

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
            max_pixels=max_pixels or MAX_IMAGE_PIXELS,
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


# The JPEG markers read without decoding: which uploads the GPU path's decoder takes (`gpu_imaging`).
_JPEG_SOI = b"\xff\xd8"

# Start-of-frame markers nvJPEG decodes: baseline, extended sequential and progressive, Huffman-coded.
_SOF_HUFFMAN = {0xC0, 0xC1, 0xC2}
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in an EXIF block's TIFF data; 1 when absent or unreadable."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
        at = ifd + 2 + 12 * entry
        if at + 12 > len(tiff):
            break
        if int.from_bytes(tiff[at:at + 2], order) == 0x0112:
            value = int.from_bytes(tiff[at + 8:at + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def gpu_candidate(data: bytes, max_pixels: int) -> Optional[int]:
    """The EXIF orientation of a JPEG the GPU path takes, or None to use the exact CPU path.

    Reads the JPEG markers up to the frame header (a few microseconds, no
    pixels): 8-bit Huffman-coded JPEGs with 1 (gray) or 3 (YCbCr) components
    within the pixel limit go to the GPU; CMYK/YCCK, 12-bit, arithmetic-coded,
    Adobe RGB-transform and anything unusual take the exact path, which also
    gives broken or oversized uploads their error messages.
    """
    if not data.startswith(_JPEG_SOI):
        return None
    orientation, at, size, seen = 1, 2, len(data), set()
    while at + 4 <= size:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            at += 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        segment = data[at + 4:at + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(segment[6:])
        elif marker == 0xEE and segment.startswith(b"Adobe") and len(segment) >= 12 and segment[11] == 0:
            return None  # Adobe transform 0: RGB or CMYK samples without YCbCr; Pillow knows them
        elif marker in _SOF_HUFFMAN:
            if len(segment) < 6 or segment[0] != 8 or segment[5] not in (1, 3):
                return None
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            if not 0 < width * height <= max_pixels:
                return None
            return orientation if _complete_after_frame(data, at + 2 + length, seen) else None
        elif marker in _SOF_OTHER or marker == 0xDA:  # other codings, or scan data before any frame
            return None
        seen.add(marker)
        at += 2 + length
    return None


def _complete_after_frame(data: bytes, at: int, seen: set) -> bool:
    """Whether a JPEG's stream after its frame header is whole: tables, a scan, and the end marker after it.

    nvJPEG decodes a JPEG cut short (and fills in the rest) where libjpeg, and so the exact path, refuses
    it ("image file is truncated"). What the exact path would refuse must get its message, so only whole
    streams go to the GPU: the segments up to the first scan are walked (each length inside the file,
    quantization and Huffman tables present), and an end-of-image marker must follow the scan's start.
    Entropy-coded data cannot hold the bytes FF D9 (an FF there is followed by 00 or a restart marker), so
    the last FF D9 of the file lies after the first scan exactly when the file was not cut inside the scans.
    Anything else, cut short or unusual, takes the exact path and gets its answer there.
    """
    size, seen = len(data), set(seen)  # the markers before the frame count too
    while at + 4 <= size:
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:
            at += 1
            continue
        if marker == 0xD9 or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # image ends, or an odd bare marker
            return False
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if length < 2 or at + 2 + length > size:
            return False
        if marker == 0xDA:
            return {0xDB, 0xC4} <= seen and data.rfind(b"\xff\xd9") >= at + 2 + length
        seen.add(marker)
        at += 2 + length
    return False


def as_bytes(item: Union[bytes, bytearray, memoryview, np.ndarray, np.generic]) -> bytes:
    """Normalizes one element of a Triton BYTES tensor to `bytes`."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray):
        return item.tobytes()
    return bytes(item)
