"""Image bytes -> the eval-transform tensor on the GPU, batched; the exact CPU path for what the GPU can't take.

Copied beside the `model.py` of the `gpu` preprocess model and of the GPU photo path (with `imaging.py`, the exact
path it falls back to, and `gpu_transform.py`, the transform: `models.SERVED_MODULES`). This module routes, decodes,
gates and batches; per batch:

1. Each upload's JPEG markers are read up to the frame header (`imaging.gpu_candidate`,
   no pixels): baseline or progressive 8-bit Huffman JPEGs in YCbCr or grayscale
   within the pixel limit go to the GPU decoder, with their EXIF orientation;
   everything else (PNG, WebP, GIF, TIFF, CMYK or
   16-bit JPEG, broken or oversized uploads) takes `imaging.preprocess`, the
   exact path, with its error messages. A JPEG the GPU decoder refuses falls
   back the same way.
2. One batched decode: torchvision's nvJPEG batch decode (`auto`), or
   nvImageCodec (hardware JPEG engines, then CUDA) when asked for. On a CPU
   device torchvision decodes with libjpeg-turbo, which is how the CPU tests
   run this same code.
3. Images of the same size are resized together with Pillow's own
   resampling weights, as two matrix products that compute only the pixels the
   center crop keeps (rounded to 8-bit values after each pass with Pillow's
   integer arithmetic; float16 tensor cores on a GPU), then scaled and
   normalized. On a GPU, small batches replay this as a CUDA graph
   (`gpu_transform.TransformGraphs`: one launch instead of ~23). What remains different from
   the exact path is the decoder's (nvJPEG's IDCT and chroma upsampling vs
   libjpeg-turbo).

The result is a float32 (B, 3, H, W) tensor on the device, rows of failed
items zero, plus one error message or None per item.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imaging.py")):
    import imaging  # served: the copies beside this file (its folder is on sys.path)
    from gpu_transform import (TransformGraphs, pillow_round, resample_weights, split_weights, supported,
                               tensor_core_dtype)
else:  # imported as part of the project
    from builder.core import imaging
    from builder.repository.triton_models.gpu_transform import (TransformGraphs, pillow_round, resample_weights,
                                                                split_weights, supported, tensor_core_dtype)

log = logging.getLogger(__name__)
def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Applies an EXIF orientation to a CHW tensor, as `PIL.ImageOps.exif_transpose` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


class Decoder:
    """Batched JPEG decoding to HWC/CHW uint8 tensors on a device; None for what it cannot decode."""

    def __init__(self, device: torch.device, backend: str = "auto"):
        self.device = device
        self.backend = "torchvision"
        self._nvimgcodec = None
        # `auto` is torchvision's batched nvJPEG decode: on an H100 it decoded 640x480 JPEGs faster than
        # nvImageCodec's hardware decoder (13,172 vs 10,912 img/s at batch 256, perf/results/h100-gpu-data-path).
        if device.type == "cuda" and backend == "nvimgcodec":
            try:
                from nvidia import nvimgcodec

                kinds = (nvimgcodec.BackendKind.HW_GPU_ONLY, nvimgcodec.BackendKind.GPU_ONLY)
                decoder = nvimgcodec.Decoder(device_id=device.index or 0,
                                             backends=[nvimgcodec.Backend(k) for k in kinds])
                params = nvimgcodec.DecodeParams(apply_exif_orientation=True, color_spec=nvimgcodec.ColorSpec.SRGB)
                self._nvimgcodec = (decoder, params)
                self.backend = "nvimgcodec"
            except Exception as exc:  # not installed, or no decoder on this GPU
                raise RuntimeError(f"nvImageCodec is not usable here: {exc}") from None

    def __call__(self, items: Sequence[bytes], orientations: Sequence[int]) -> List[Optional[torch.Tensor]]:
        """Decodes JPEGs to CHW uint8 RGB tensors on the device (EXIF orientation applied)."""
        if not items:
            return []
        if self._nvimgcodec is not None:
            decoder, params = self._nvimgcodec
            try:
                images = decoder.decode(list(items), params=params)
            except Exception:
                images = [None] * len(items)
            return [None if img is None else torch.as_tensor(img, device=self.device).permute(2, 0, 1)
                    for img in images]
        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec
            encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in items]
            try:
                decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad JPEG fails the batch call: decode one by one to find it
                decoded = []
                for tensor in encoded:
                    try:
                        decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        decoded.append(None)
        # The CUDA batch decoder ignores EXIF orientation: applied here, as Pillow's exif_transpose does.
        return [None if img is None else _orient(img, o) for img, o in zip(decoded, orientations)]


def load_gate(preprocessor: "GpuPreprocessor", photos: Sequence[bytes], max_mean_abs: float, min_cosine: float) -> Dict:
    """Checks the served decoder on photos against the exact path, where it serves; raises when it is off.

    The build's gate runs where the repository is built, which may have no GPU (then libjpeg-turbo stands
    in for nvJPEG). This runs the decoder that will really serve, on its own device, when the model loads.

    Args:
        preprocessor: The GPU preprocessing as the model will run it.
        photos: Encoded photos (JPEGs, so they take the GPU path).
        max_mean_abs: Largest mean absolute difference of one photo's tensor from the exact one.
        min_cosine: Smallest cosine of one photo's tensor with the exact one.

    Returns:
        The figures: photos, how many took the GPU path, worst mean abs, max abs and cosine.

    Raises:
        ValueError: A photo fails, or a figure is outside its threshold.
    """
    before = dict(preprocessor.counts)
    tensors, errors = preprocessor(list(photos))
    on_gpu = preprocessor.counts["gpu"] - before["gpu"]
    preprocessor.counts.update(before)  # the gate's photos are not traffic
    failed = [f"photo {i}: {e}" for i, e in enumerate(errors) if e]
    if failed:
        raise ValueError("the load-time parity gate failed on its photos: " + "; ".join(failed))
    got = tensors.float().cpu().numpy().reshape(len(photos), -1).astype(np.float64)
    exact = np.stack([imaging.preprocess(data, preprocessor.params) for data in photos]).reshape(len(photos), -1)
    diff = np.abs(got - exact)
    cosine = (got * exact).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(exact, axis=1), 1e-12)
    figures = {"photos": len(photos), "on_gpu_path": on_gpu, "worst_mean_abs": float(diff.mean(1).max()),
               "max_abs": float(diff.max()), "min_cosine": float(cosine.min()), "decoder": preprocessor.decoder.backend,
               "device": str(preprocessor.device)}
    if figures["worst_mean_abs"] > max_mean_abs or figures["min_cosine"] < min_cosine:
        raise ValueError(f"the {figures['decoder']} decoder on {figures['device']} is off the exact path on the "
                         f"load-time parity photos (worst mean abs {figures['worst_mean_abs']:.4f} > {max_mean_abs} "
                         f"or cosine {figures['min_cosine']:.6f} < {min_cosine}); serve --preprocess exact, or "
                         "report the GPU and driver")
    return figures


GATE_DIR = "gate"


def gate_model(preprocessor: "GpuPreprocessor", model_dir: str, parameters: Dict[str, str]) -> Tuple[Dict, List[bytes]]:
    """`load_gate` on the photos in `gate/` beside a served model.py, thresholds from its config parameters.

    Returns:
        The gate's figures, and the photos (a model may warm up on them).

    Raises:
        ValueError: No photos there, or the gate fails.
    """
    folder = os.path.join(model_dir, GATE_DIR)
    if not os.path.isdir(folder):
        raise ValueError(f"no {GATE_DIR}/ photos beside model.py for the load-time parity gate; rebuild the "
                         "repository")
    photos = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            photos.append(f.read())
    # The thresholds are the build's (`models.LOAD_GATE`), written into every config that runs this gate.
    figures = load_gate(preprocessor, photos, float(parameters["gate_max_mean_abs"]),
                        float(parameters["gate_min_cosine"]))
    return figures, photos


class GpuPreprocessor:
    """The eval transform for a batch of uploads on one device.

    Args:
        params: The transform's parameters (timm's data config).
        device: Where the work and the output live ("cuda:0", or "cpu" for tests).
        decoder: `auto` or `torchvision` (nvJPEG through torchvision), or `nvimgcodec`.
        map_fn: How the exact-path items run (e.g. a thread pool's `map`: Pillow releases the GIL).
        graphs: On a CUDA device, replay small batches' transforms as CUDA graphs (`TransformGraphs`).
        warn: Where a warning goes (a served model passes the server's log).
    """

    def __init__(self, params: "imaging.PreprocessParams", device="cuda", decoder: str = "auto", map_fn=map,
                 graphs: bool = True, warn=log.warning):
        problem = supported(params)
        if problem:
            raise ValueError(problem)
        self.params = params
        self.device = torch.device(device)
        self.decoder = Decoder(self.device, decoder)
        self.mean = torch.tensor(params.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(params.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self.counts = {"gpu": 0, "exact": 0}  # items per path, for logs and tests
        self._matrices: Dict[Tuple[int, int, int, int], torch.Tensor] = {}
        self._dtype = tensor_core_dtype(self.device)
        self.map = map_fn
        self.graphs = TransformGraphs(self._transform_batch, warn) if self.device.type == "cuda" and graphs else None

    @classmethod
    def from_config(cls, params: "imaging.PreprocessParams", parameters: Dict[str, str], device, map_fn=map,
                    warn=log.warning) -> "GpuPreprocessor":
        """As a served model's config asks: its `decoder` and `transform_graphs` ("0": eager) parameters."""
        return cls(params, device, parameters.get("decoder", "auto"), map_fn,
                   graphs=parameters.get("transform_graphs", "1") != "0", warn=warn)

    def _halves(self, in_size: int, out_size: int, start: int, length: int) -> torch.Tensor:
        """Rows `start..start+length` of Pillow's resampling matrix, split as `split_weights` does."""
        key = (in_size, out_size, start, length)
        if key not in self._matrices:
            weights = resample_weights(in_size, out_size, self.params.interpolation)[start:start + length]
            self._matrices[key] = torch.from_numpy(split_weights(weights)).to(self.device, self._dtype)
        return self._matrices[key]

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b with float32 sums: float16 inputs on tensor cores where torch can, float32 elsewhere."""
        if self._dtype == torch.float16:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b)

    def _transform_group(self, images: List[torch.Tensor]) -> torch.Tensor:
        """Resize, center crop and normalize images of one size: replayed as a CUDA graph when one is kept."""
        return self.graphs(images) if self.graphs is not None else self._transform_batch(torch.stack(images))

    def _transform_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Resize (shorter edge), center crop and normalize a uint8 (B, 3, H, W) batch of one size.

        The resize is Pillow's, as two matrix products: its separable filter
        weights (fixed point, as Pillow rounds them) for only the rows and
        columns the crop keeps, horizontal pass first, each pass rounded and
        clipped to 8-bit values with Pillow's integer arithmetic. The weights
        are split in two parts that float16 holds exactly (`split_weights`),
        so on a GPU both passes run on tensor cores with float32 sums.
        """
        crop_h, crop_w = self.params.image_size
        count, _, height, width = batch.shape
        new_w, new_h = imaging._resized_size(width, height, self.params)
        batch = batch.to(self._dtype)  # 8-bit values: exact in float16
        if new_h >= crop_h and new_w >= crop_w:
            top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
            rows, cols = (top, crop_h), (left, crop_w)
        else:
            rows, cols = (0, new_h), (0, new_w)
        if new_w != width:  # Pillow skips a pass whose size does not change
            sums = self._product(batch.reshape(-1, width), self._halves(width, new_w, *cols).T)
            batch = pillow_round(*sums.tensor_split(2, dim=1)).view(count, 3, height, cols[1])
        else:
            batch = batch[..., cols[0]:cols[0] + cols[1]]
        if new_h != height:
            # Rows become the matrices' inner dimension: (height, every image's and channel's columns).
            columns = batch.permute(2, 0, 1, 3).to(self._dtype, memory_format=torch.contiguous_format)
            sums = self._product(self._halves(height, new_h, *rows), columns.view(height, -1))
            batch = pillow_round(*sums.tensor_split(2, dim=0)).view(rows[1], count, 3, -1).permute(1, 2, 0, 3)
        else:
            batch = batch[..., rows[0]:rows[0] + rows[1], :]
        # A contiguous float32 copy: `.to` would keep the vertical pass's permuted strides.
        batch = torch.empty(batch.shape, dtype=torch.float32, device=self.device).copy_(batch)
        if tuple(batch.shape[-2:]) != (crop_h, crop_w):  # smaller than the crop: zero padding, as CenterCrop pads
            pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
            batch = F.pad(batch, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
            ph, pw = batch.shape[-2:]
            top, left = int(round((ph - crop_h) / 2.0)), int(round((pw - crop_w) / 2.0))
            batch = batch[:, :, top:top + crop_h, left:left + crop_w]
        return (batch - self.mean) / self.std

    def __call__(self, items: Sequence[bytes], phase=None) -> Tuple[torch.Tensor, List[Optional[str]]]:
        """The batch's tensor and one error or None per item.

        Args:
            items: Encoded uploads.
            phase: Called with a phase's name at its end ("walk", "decode", "transform", "exact"), for
                profiling; None when not profiling.
        """
        phase = phase or (lambda name: None)
        errors: List[Optional[str]] = [None] * len(items)
        gpu, orientations, exact = [], [], []
        for index, data in enumerate(items):
            orientation = imaging.gpu_candidate(data, self.params.max_pixels)
            if orientation is None:
                exact.append(index)
            else:
                gpu.append(index)
                orientations.append(orientation)
        phase("walk")
        decoded = self.decoder([items[i] for i in gpu], orientations)
        phase("decode")
        groups: Dict[Tuple[int, int], List[int]] = {}
        images: Dict[int, torch.Tensor] = {}
        for index, image in zip(gpu, decoded):
            if image is None:
                exact.append(index)  # the GPU decoder refused it: the exact path decides
            else:
                images[index] = image
                groups.setdefault(tuple(image.shape[-2:]), []).append(index)
        exact.sort()
        if not exact and len(groups) == 1:  # the usual batch: every item decoded, one size, in order
            out = self._transform_group(decoded)
        else:
            out = torch.zeros((len(items), 3, *self.params.image_size), dtype=torch.float32, device=self.device)
            for indices in groups.values():
                out[indices] = self._transform_group([images[i] for i in indices])
        phase("transform")
        exact_results = self.map(lambda data: imaging.try_preprocess(data, self.params), [items[i] for i in exact])
        for index, (pixels, error) in zip(exact, exact_results):
            if error is None:
                out[index] = torch.from_numpy(pixels).to(self.device)
            errors[index] = error
        self.counts["gpu"] += len(images)
        self.counts["exact"] += len(exact)
        phase("exact")
        return out, errors

