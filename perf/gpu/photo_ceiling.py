"""Photos to labels with no server: what one GPU does for the photo path at all (JSON).

The measurement the build runs to settle the photo path's setup (`builder.repository.photo_setup`), on any grid:
the served photo path's own code, outside Triton: `gpu_imaging.GpuPreprocessor` (decode, resize, crop,
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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


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
    from builder.errors import BuilderError
    from builder.repository.photo_setup import measure_with_mps

    try:
        out = measure_with_mps(args.repository / args.model, processes, batches, args.seconds, photos, args.device,
                               args.mps, on_row=lambda row: print(json.dumps(row), flush=True))
    except BuilderError as exc:
        raise SystemExit(f"photo_ceiling: {exc}") from None
    out = {"kind": "photo_ceiling", "mps": args.mps, "device": args.device, "photos": [p.name for p in files],
           "seconds": args.seconds,
           "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])), **out}
    Path(args.output).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
