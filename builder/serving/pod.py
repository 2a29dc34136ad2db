"""The Kubernetes pods `builder docker` renders: a small frozen dataclass validated like the build settings."""

from __future__ import annotations

from dataclasses import dataclass

from builder.errors import field_error


@dataclass(frozen=True)
class PodSettings:
    """The Kubernetes Deployment's pods (`builder docker`): GPUs per pod, and the autoscaler's range in GPUs.

    Attributes:
        gpus_per_pod: `nvidia.com/gpu` of each pod; tritonserver places every GPU model on all of them.
        min_gpus: GPUs the autoscaler keeps at least (rounded up to whole pods).
        max_gpus: GPUs it may grow to (rounded down to whole pods, at least the minimum).
        cpus_per_gpu: Cores requested per GPU (decode, gRPC and Python-backend stubs run on them).
        memory_gib_per_gpu: Memory requested per GPU (the limit is twice that).
        cuda_memory_pool_mb: Each GPU's CUDA memory pool for tensors between models (0: Triton's 64 MiB).
    """

    gpus_per_pod: int = 1
    min_gpus: int = 2
    max_gpus: int = 8
    cpus_per_gpu: int = 4
    memory_gib_per_gpu: int = 8
    cuda_memory_pool_mb: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.gpus_per_pod <= 16:
            raise field_error("gpus_per_pod", f"is {self.gpus_per_pod}", "use 1 to 16 (the GPUs of one node)")
        if self.min_gpus < 1 or self.max_gpus < self.min_gpus:
            raise field_error("min_gpus/max_gpus", f"are {self.min_gpus}/{self.max_gpus}",
                              "use 1 <= min <= max, e.g. 2 and 8")
        if self.max_gpus < self.gpus_per_pod:
            raise field_error("max_gpus", f"{self.max_gpus} is less than one pod's {self.gpus_per_pod} GPUs",
                              f"use at least {self.gpus_per_pod}")
        if self.cpus_per_gpu < 1 or self.memory_gib_per_gpu < 1 or self.cuda_memory_pool_mb < 0:
            raise field_error("pod resources", "cpus and memory per GPU must be >= 1, the memory pool >= 0",
                              "e.g. 4 cores, 8 GiB, pool 0")

    @property
    def min_replicas(self) -> int:
        return -(-self.min_gpus // self.gpus_per_pod)

    @property
    def max_replicas(self) -> int:
        return max(self.min_replicas, self.max_gpus // self.gpus_per_pod)

    @property
    def cpus(self) -> int:
        return self.cpus_per_gpu * self.gpus_per_pod

    @property
    def memory_gib(self) -> int:
        return self.memory_gib_per_gpu * self.gpus_per_pod
