"""Stage 3, the Triton repository: the tensor contract, model configs, the Python-backend models, the
preprocessing gate, the writer (staging, atomic swap, manifest, README) and the checker."""
