"""Preprocessing with numpy + Pillow against timm's own eval transform, and real-world uploads."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from builder.core import imaging

# Our transform reproduces torchvision's PIL path operation for operation, so
# on real photographs the tensors are identical. The tolerance is stated
# anyway, in normalized units (1/255/std is about 0.017 per 8-bit step).
PHOTO_ATOL = 1e-6


@pytest.fixture(scope="module")
def timm_transform(tiny_model):
    import timm.data

    return timm.data.create_transform(**tiny_model.data_config)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def reference(transform, image: Image.Image) -> np.ndarray:
    return transform(ImageOps.exif_transpose(image).convert("RGB")).numpy()


def test_params_come_from_timm_data_config(params):
    # swin_tiny_patch4_window7_224's pretrained config: 224, crop_pct 0.9, bicubic.
    assert params.image_size == (224, 224)
    assert params.scale_size == (248, 248)
    assert params.interpolation == "bicubic"
    assert params.mean == (0.485, 0.456, 0.406)
    assert imaging.PreprocessParams.from_parameters(params.to_parameters()) == params


def test_matches_timm_on_real_photos(photos, params, timm_transform):
    worst = 0.0
    for data in photos:
        ours = imaging.preprocess(data, params)
        ref = reference(timm_transform, Image.open(io.BytesIO(data)))
        assert ours.shape == ref.shape == (3, 224, 224) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst <= PHOTO_ATOL, worst


@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {"quality": 90}),
                                        ("BMP", {}), ("TIFF", {})])
def test_formats_match_timm(photos, params, timm_transform, fmt, kwargs):
    data = encode(Image.open(io.BytesIO(photos[1])).convert("RGB"), fmt, **kwargs)
    ref = reference(timm_transform, Image.open(io.BytesIO(data)))
    assert np.abs(imaging.preprocess(data, params) - ref).max() <= PHOTO_ATOL


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "1", "YCbCr"])
def test_color_modes_match_timm(photos, params, timm_transform, mode):
    image = Image.open(io.BytesIO(photos[0])).convert("RGB").convert(mode)
    data = encode(image, "TIFF" if mode in ("CMYK", "YCbCr") else "PNG")
    ref = reference(timm_transform, Image.open(io.BytesIO(data)))
    assert np.abs(imaging.preprocess(data, params) - ref).max() <= PHOTO_ATOL


def test_gif_first_frame(photos, params, timm_transform):
    frames = [Image.open(io.BytesIO(p)).convert("RGB").resize((200, 150)) for p in photos[:3]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = Image.open(io.BytesIO(data))  # Pillow opens on frame 0
    assert np.abs(imaging.preprocess(data, params) - reference(timm_transform, first)).max() <= PHOTO_ATOL


def test_exif_orientation_is_applied(photos, params):
    upright = Image.open(io.BytesIO(photos[3])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers rotate 90 degrees clockwise to display
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    expected = imaging.preprocess(encode(upright, "JPEG", quality=95), params)
    got = imaging.preprocess(data, params)
    # Same picture after the EXIF rotation (JPEG re-encoding differs a little).
    assert np.abs(got - expected).mean() < 0.05
    assert np.abs(imaging.preprocess(encode(stored, "JPEG", quality=95), params) - expected).mean() > 0.3


def test_alpha_is_composited_over_white(params):
    image = Image.new("RGBA", (300, 300), (255, 0, 0, 0))  # fully transparent red
    got = imaging.preprocess(encode(image, "PNG"), params)
    white = imaging.preprocess(encode(Image.new("RGB", (300, 300), (255, 255, 255)), "PNG"), params)
    assert np.array_equal(got, white)
    opaque = imaging.preprocess(encode(Image.new("RGBA", (300, 300), (255, 0, 0, 255)), "PNG"), params)
    red = imaging.preprocess(encode(Image.new("RGB", (300, 300), (255, 0, 0)), "PNG"), params)
    assert np.array_equal(opaque, red)


def test_16bit_png_is_scaled_not_clipped(photos, params):
    gray8 = np.asarray(Image.open(io.BytesIO(photos[7])).convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # the same picture in 16 bits
    data = encode(Image.fromarray(gray16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    expected = imaging.preprocess(encode(Image.fromarray(gray8, "L"), "PNG"), params)
    assert np.abs(imaging.preprocess(data, params) - expected).max() <= PHOTO_ATOL


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (1, 5000), (5000, 1), (224, 224), (247, 600)])
def test_tiny_and_extreme_sizes(params, timm_transform, size):
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    data = encode(image, "PNG")
    got = imaging.preprocess(data, params)
    assert got.shape == (3, 224, 224) and np.isfinite(got).all()
    # Extreme aspect ratios are resampled only in the cropped region: same
    # result as timm up to float rounding of sampling positions.
    assert np.abs(got - reference(timm_transform, image)).max() <= 0.05


def test_large_photo(params, timm_transform, photos):
    image = Image.open(io.BytesIO(photos[5])).convert("RGB").resize((4000, 3000))
    data = encode(image, "JPEG", quality=85)
    ref = reference(timm_transform, Image.open(io.BytesIO(data)))
    assert np.abs(imaging.preprocess(data, params) - ref).max() <= PHOTO_ATOL


def _png_with_size(width: int, height: int) -> bytes:
    """A valid PNG header claiming a huge image, with a tiny compressed body."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,message", [
    (b"", "empty input"),
    (b"hello, this is text", "not a decodable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a decodable image"),
    (_png_with_size(10000, 8000), "above the limit"),
    (_png_with_size(100000, 100000), "decompression bomb"),
])
def test_bad_inputs_raise_clear_errors(params, data, message):
    with pytest.raises(imaging.ImageError, match=message):
        imaging.preprocess(data, params)


def test_truncated_and_corrupt(photos, params):
    jpeg = photos[3]
    with pytest.raises(imaging.ImageError, match="corrupt or truncated"):
        imaging.preprocess(jpeg[: len(jpeg) // 3], params)
    png = photos[1]
    corrupt = png[:200] + bytes(b ^ 0xFF for b in png[200:400]) + png[400:]
    with pytest.raises(imaging.ImageError):
        imaging.preprocess(corrupt, params)


def test_batch_isolates_failures(photos, params):
    batch, errors = imaging.preprocess_many([photos[0], b"junk", photos[1]], params)
    assert batch.shape == (3, 3, 224, 224)
    assert errors[0] is None and errors[2] is None and "not a decodable image" in errors[1]
    assert np.array_equal(batch[2], imaging.preprocess(photos[1], params))
