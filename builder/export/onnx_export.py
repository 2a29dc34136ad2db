"""ONNX export of the classifier and its validation against PyTorch."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Dict
import json

import numpy as np

from builder.compare import gate
from builder.core.contract import Contract
from builder.errors import BuilderError
from builder.export.model import LoadedModel
from builder.settings import Parity

log = logging.getLogger("builder")


def export_onnx(model: LoadedModel, contract: Contract, path: Path, opset: int = 17) -> Path:
    """Exports the classifier to ONNX with a dynamic batch axis.

    The input and output are named from the contract; the spatial size is
    fixed (Swin's window partitioning needs it). The TorchScript-based
    exporter is used on purpose: it handles timm's Swin with a symbolic
    batch dimension and emits native LayerNormalization from opset 17.

    Args:
        model: The loaded model.
        contract: Tensor names and shapes.
        path: Where to write model.onnx.
        opset: ONNX opset (>= 17).

    Returns:
        The written path.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.zeros(2, *contract.pixels.dims)
    start = time.perf_counter()
    log.info("exporting %s to ONNX (opset %d) ...", contract.name, opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            model.module, (sample,), str(path),
            input_names=[contract.pixels.name], output_names=[contract.logits.name],
            dynamic_axes={contract.pixels.name: {0: "batch"}, contract.logits.name: {0: "batch"}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
    log.info("exported %s (%.1f MB) in %.1f s", path.name, path.stat().st_size / 1e6,
             time.perf_counter() - start)
    return path


def validate_onnx(path: Path, model: LoadedModel, contract: Contract, parity: Parity) -> Dict[str, float]:
    """Checks the ONNX file and compares ONNX Runtime with PyTorch.

    Args:
        path: The exported model.
        model: The PyTorch reference.
        contract: Tensor names and shapes.
        parity: Thresholds and batch size.

    Returns:
        Figures (max_abs, mean_abs, min_cosine, top1_agreement, rows).

    Raises:
        BuilderError: The checker rejects the file or a threshold is missed.
    """
    import onnx
    import onnxruntime as ort
    import torch

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BuilderError(f"ONNX checker rejected {path}: {str(exc).splitlines()[0]}") from None
    graph = onnx.load(str(path), load_external_data=False).graph
    names = ([i.name for i in graph.input], [o.name for o in graph.output])
    if names != ([contract.pixels.name], [contract.logits.name]):
        raise BuilderError(f"exported tensors are {names}, the contract wants "
                           f"([{contract.pixels.name!r}], [{contract.logits.name!r}])")
    # Inputs in the range real preprocessed images have, fixed for reproducibility.
    batch = np.random.default_rng(0).standard_normal((parity.batch, *contract.pixels.dims), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    candidate = session.run([contract.logits.name], {contract.pixels.name: batch})[0]
    with torch.no_grad():
        reference = model.module(torch.from_numpy(batch)).numpy()
    figures = gate("ONNX export", "PyTorch", reference, candidate, parity,
                   inputs=f"{parity.batch} seeded Gaussian tensors", fix="the previous repository is left in place")
    log.info("ONNX Runtime vs PyTorch on batch %d: max abs %.3g, min cosine %.7f, top-1 %.3f",
             parity.batch, figures["max_abs"], figures["min_cosine"], figures["top1_agreement"])
    return figures


def reference_data(model: LoadedModel, contract: Contract, images_dir, count: int,
                   reference_path=None, calibration_path=None) -> str:
    """Writes reference inputs/logits (.npz) and calibration images (.npy) for plan builds.

    Inputs are real images from `images_dir` through the serving preprocessing
    (cycled with horizontal flips to reach `count`). Seeded Gaussian noise is
    used only when `images_dir` is None, which callers pass only when the user
    asked for noise; either way the source is recorded: as `source` in the
    .npz and in `<calibration>.json`, from where plan sidecars and the
    manifest take it.

    Returns:
        What the inputs are: `images:<folder> (<n> files)` or `noise:seed=0`.

    Raises:
        BuilderError: `images_dir` does not exist or holds no decodable image.
    """
    import torch

    from builder.core.imaging import ImageError, PreprocessParams, preprocess

    params = PreprocessParams.from_timm(model.data_config)
    if images_dir is None:
        source = "noise:seed=0"
        inputs = np.random.default_rng(0).standard_normal((count, *contract.pixels.dims), dtype=np.float32)
        log.warning("reference/calibration data is Gaussian NOISE (asked for with --noise); plan parity and INT8 "
                    "calibration on noise say little about real photos")
    else:
        folder = Path(images_dir)
        if not folder.exists():
            raise BuilderError(f"images: {images_dir} does not exist; pass a folder of photos "
                               "(or --noise to use random data on purpose)")
        files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
        tensors = []
        for path in files:
            try:
                tensors.append(preprocess(path.read_bytes(), params))
            except ImageError:
                log.warning("skipping %s: not an image", path)
        if not tensors:
            raise BuilderError(f"images: {images_dir} holds no decodable image ({len(files)} files); pass a folder "
                               "of JPEG/PNG photos (or --noise to use random data on purpose)")
        source = f"images:{folder.resolve()} ({len(tensors)} files)"
        base = np.stack(tensors)
        pool = np.concatenate([base, base[..., ::-1]])  # horizontal flips double the distinct inputs
        inputs = np.ascontiguousarray(np.resize(pool, (count, *pool.shape[1:])).astype(np.float32))
    if calibration_path:
        np.save(calibration_path, inputs)
        Path(str(calibration_path) + ".json").write_text(json.dumps({"source": source}) + "\n", encoding="utf-8")
    if reference_path:
        with torch.no_grad():
            logits = np.concatenate([model.module(torch.from_numpy(inputs[i:i + 32])).numpy()
                                     for i in range(0, len(inputs), 32)])
        np.savez(reference_path, inputs=inputs, logits=logits, source=np.array(source))
    log.info("wrote reference data for %d inputs from %s", len(inputs), source)
    return source
