"""Stage 2, engines: TensorRT plans, ModelOpt quantization, the TorchInductor program, and `--engine auto`.

Kept free of imports: `engines.trt` runs where only Python, numpy and TensorRT are installed (NVIDIA's
TensorRT container, a TensorRT-only Python), copied there with `builder/__init__.py`, `errors.py` and
`compare.py`.
"""
