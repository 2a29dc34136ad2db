"""Stage 4, serving: the local tritonserver (pip) and the rendered Docker / Kubernetes files for NVIDIA's."""
