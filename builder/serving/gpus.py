"""The repository's GPU placement against the host's GPUs (`builder.core.mps.host_gpus`), checked before
tritonserver starts.

Triton places a KIND_GPU instance group on the ids it lists, or on every GPU it sees when it lists none; an id
the host lacks fails that model's load deep in the server log. `builder serve` says it in one line first, and
gives every GPU its own CUDA memory pool (Triton's flag is per device; without it only the 64 MiB default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence


def placements(repository: str) -> Dict[str, List[int]]:
    """Each model with a KIND_GPU instance group -> the GPU ids it lists (empty: every GPU)."""
    from builder.repository import configs

    found: Dict[str, List[int]] = {}
    for config_path in sorted(Path(repository).glob("*/config.pbtxt")):
        try:
            config = configs.read(config_path)
        except Exception:  # an unreadable config is `builder check`'s to report; the server logs it too
            continue
        for group in config.instance_group:
            if group.kind == group.KIND_GPU:
                found.setdefault(config.name or config_path.parent.name, []).extend(group.gpus)
    return found


def placement_problem(repository: str, host: Sequence[int]) -> Optional[str]:
    """Why tritonserver could not place the repository's GPU models on this host (None: it can)."""
    models = placements(repository)
    if models and not host:
        return (f"{', '.join(sorted(models))} run{'s' if len(models) == 1 else ''} on GPUs (KIND_GPU) and this host "
                "has no GPU tritonserver can see (nvidia-smi, CUDA_VISIBLE_DEVICES); serve it on a GPU host, or "
                "rebuild with --instance-kind KIND_CPU (and --preprocess-instance-kind KIND_CPU for the gpu preprocessing)")
    for model, ids in sorted(models.items()):
        missing = sorted(set(ids) - set(host))
        if missing:
            return (f"{model} is placed on GPU {', '.join(map(str, missing))}, which this host lacks (it has GPU "
                    f"{', '.join(map(str, host))}); rebuild with --gpus naming these, or without --gpus for all")
    return None


def memory_pool_args(pool_mb: int, gpus: Sequence[int]) -> List[str]:
    """One `--cuda-memory-pool-byte-size` per GPU (Triton's default is 64 MiB on each)."""
    return [f"--cuda-memory-pool-byte-size={gpu}:{pool_mb << 20}" for gpu in gpus] if pool_mb > 0 else []
