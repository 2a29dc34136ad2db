"""Photos to labels with no server: what one GPU does for the photo path at all (JSON).

The served photo path's own code, outside Triton: `gpu_imaging.GpuPreprocessor` (decode, resize, crop,
normalize), the classifier's inductor engine (`torch_runner.TorchEngine`, its CUDA graphs) and the head
(`torch_runner.class_outputs_packed`: softmax, one copy back), from JPEG bytes in host memory to class arrays
in host memory, on batches of B photos, in P processes at once (each its own CUDA context, as Triton's
Python-backend instances are; under a CUDA MPS daemon of its own with --mps, as `builder serve --mps`). No gRPC,
no queue, no hand-off: set beside the served rows on the same host, they say what the server costs and what the
photos' own work (decode, transform) takes from the bare engine.

    python perf/gpu/photo_ceiling.py --repository /tmp/swin-photo-repo --model swin_tiny_patch4_window7_224 \
        --batches 8,32,128 --processes 1,4,8 --seconds 6 --mps --output ceiling.json

`rows`: {processes, batch, images, seconds, img_per_s, batch_p50_ms} for every pair (batch_p50_ms: one
batch, bytes in to arrays out, the median over the processes' medians).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _load(version_dir: str, params: dict, max_batch: int):
    """The photo path's preprocessor, engine and head on params["device"]: a function of JPEG bytes -> arrays."""
    from builder.core import imaging
    from builder.engines import torch_runner
    from builder.repository.triton_models import gpu_imaging

    device = params["device"]
    pre = gpu_imaging.GpuPreprocessor.from_config(imaging.PreprocessParams.from_parameters(params), params, device,
                                                  map, print)
    engine = torch_runner.TorchEngine(os.path.join(version_dir, params["engine_dir"]), device, params, max_batch,
                                      log=lambda message: None)

    def labels(items):
        pixels, _ = pre(items)
        return torch_runner.class_outputs_packed(engine(pixels)).cpu().numpy()

    return labels


def _worker(index, version_dir, params, photos, batches, seconds, barrier, results):
    """One process: load, then each batch size in step with the others (the barrier), timed."""
    import torch

    from builder.timing import timed

    labels = _load(version_dir, params, max(batches))
    if index == 0:  # one process says where it ran
        on_gpu = params["device"].startswith("cuda")
        results.put({"gpu": torch.cuda.get_device_name(0) if on_gpu else "none", "torch": torch.__version__})
    for batch in batches:
        items = [photos[i % len(photos)] for i in range(batch)]
        for _ in range(5):
            labels(items)
        barrier.wait()
        started = time.perf_counter()
        # `.cpu()` in `labels` waits for the device: nothing more to synchronize.
        seconds_each = timed(lambda: labels(items), lambda: None, 0, sys.maxsize, budget_s=seconds, min_calls=20)
        results.put({"batch": batch, "images": batch * len(seconds_each), "wall": time.perf_counter() - started,
                     "p50": statistics.median(seconds_each) * 1e3})


def _collect(results, workers, count: int) -> list:
    """`count` results from the workers; exits with a message as soon as one of them has failed (not after a
    timeout: a worker that cannot load, e.g. on a host without the GPU it names, would otherwise be waited for)."""
    got = []
    while len(got) < count:
        try:
            got.append(results.get(timeout=2))
        except queue.Empty:
            failed = [p.exitcode for p in workers if p.exitcode not in (None, 0)]
            if failed:
                for p in workers:
                    p.kill()
                raise SystemExit(f"photo_ceiling: a measuring process failed (exit code {failed[0]}; its error is "
                                 "above)")
    return got


def run(repository: Path, model: str, batches, processes, seconds: float, photos, device: str = "cuda:0") -> dict:
    """The ceiling rows and the latency A/B (see the module's docstring)."""
    from builder.repository import configs

    model_dir = repository / model
    config = configs.read(model_dir / "config.pbtxt")
    params = {key: value.string_value for key, value in config.parameters.items()}
    if not params.get("engine_dir"):
        raise SystemExit(f"{model} runs no engine in its process (the BLS pipeline design); build the photo path "
                         "with --gpu-photo-path fused or hybrid")
    params.update(device=device)
    version_dir = str(max((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)))
    context = multiprocessing.get_context("spawn")  # each process its own CUDA context; the parent has none
    results = context.Queue()
    out = {"rows": []}
    for count in processes:
        barrier = context.Barrier(count)
        workers = [context.Process(target=_worker, args=(i, version_dir, params, photos, batches, seconds, barrier,
                                                         results)) for i in range(count)]
        for p in workers:
            p.start()
        got = _collect(results, workers, count * len(batches) + 1)
        for p in workers:
            p.join()
        out.update(next(g for g in got if "gpu" in g))
        for batch in batches:
            mine = [g for g in got if g.get("batch") == batch]
            wall = max(g["wall"] for g in mine)
            images = sum(g["images"] for g in mine)
            row = {"processes": count, "batch": batch, "images": images, "seconds": round(wall, 2),
                   "img_per_s": round(images / wall, 1),
                   "batch_p50_ms": round(statistics.median(g["p50"] for g in mine), 3)}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, type=Path)
    parser.add_argument("--model", required=True, help="the photo-path model (fused or hybrid)")
    parser.add_argument("--batches", default="8,32,128")
    parser.add_argument("--processes", default="1,4,8")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--images", type=Path, help="a folder of photos (default: the bundled 640x480 JPEGs)")
    parser.add_argument("--mps", action="store_true", help="under a CUDA MPS daemon of its own")
    parser.add_argument("--device", default="cuda:0", help="cpu: the same code on the CPU (a smoke test)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    from builder.core.photos import load_photo_files, photo_files

    files = photo_files(args.images) if args.images else load_photo_files()
    photos = [p.read_bytes() for p in files]
    try:
        batches = [int(b) for b in args.batches.split(",")]
        processes = [int(p) for p in args.processes.split(",")]
    except ValueError:
        parser.error("--batches and --processes are comma-separated whole numbers, e.g. 8,32,128")
    if min(batches + processes) < 1:
        parser.error("--batches and --processes must be 1 or more")
    daemon = None
    if args.mps:
        from builder.serving.mps import MpsDaemon

        daemon = MpsDaemon(Path(tempfile.mkdtemp(prefix="photo-ceiling-")))
        daemon.start()
        os.environ.update(daemon.env())  # the spawned processes are its clients
    try:
        out = run(args.repository, args.model, batches, processes, args.seconds, photos, args.device)
    finally:
        if daemon is not None:
            daemon.stop()
    out = {"kind": "photo_ceiling", "mps": args.mps, "device": args.device, "photos": [p.name for p in files],
           "seconds": args.seconds,
           "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])), **out}
    Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
