"""First-request latency after a model load, with and without the repository's warm-up.

Starts the local tritonserver on a copy of the repository (one copy with its
`model_warmup` entries removed), and times: the load (start to ready), the
first ensemble request, and the median of the next ten.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, Sequence


def _strip_warmup(repository: Path) -> None:
    from builder.repository import configs

    for path in repository.glob("*/config.pbtxt"):
        config = configs.read(path)
        del config.model_warmup[:]
        configs.write(config, path.parent)


def measure(repository: str, images: Sequence[bytes], model: str, warmup: bool) -> Dict:
    """Times one server start on a copy of `repository` (warm-up kept or removed)."""
    from builder.serving.server import LocalServer, ServerSettings, free_ports
    from clients import Classifier, ClientSettings

    with tempfile.TemporaryDirectory(prefix="first-request-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(repository, copy)
        if not warmup:
            _strip_warmup(copy)
        http, grpc, metrics = free_ports(3)
        started = time.perf_counter()
        with LocalServer(ServerSettings(str(copy), http, grpc, metrics, workdir=str(Path(tmp) / "srv"))) as server:
            load_s = time.perf_counter() - started
            settings = ClientSettings(url=server.grpc_url, model=model, max_batch=1, concurrency=1)
            with Classifier(settings) as client:
                client.wait_until_ready(60)
                samples = []
                for index in range(11):
                    start = time.perf_counter()
                    result = client.classify([images[index % len(images)]])[0]
                    samples.append((time.perf_counter() - start) * 1000.0)
                    assert result.ok, result.error
    return {"warmup": warmup, "load_s": round(load_s, 2), "first_request_ms": round(samples[0], 2),
            "next_10_median_ms": round(statistics.median(samples[1:]), 2)}
