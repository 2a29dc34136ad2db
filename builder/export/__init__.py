"""Stage 1, export: the timm model loaded (weights, data config) and exported to ONNX, gated against PyTorch."""
