"""How much of the GPU's multiprocessors each decoder of the photo path takes per image (JSON).

With several photo-path instances the multiprocessors are the wall (nvidia-smi's `sm` near 90-99% on an H200,
perf/results/h200-photo-mps), and torchvision's batched nvJPEG decodes on them (`jpg` 0%). nvImageCodec can
decode on the hardware JPEG engines instead. This runs the served code (`gpu_imaging.GpuPreprocessor`: decode,
resize, crop, normalize) on the bundled 640x480 JPEGs for each decoder in turn, alone on the GPU, while
`nvidia-smi dmon` samples the multiprocessors' and the JPEG engines' busy share:

    python perf/gpu/decoder_load.py --output decoders.json [--batch 32] [--seconds 8] [--decoders torchvision,nvimgcodec]

Each row: images/s, mean `sm` and `jpg` %, and multiprocessor milliseconds per image (sm share x time / images).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from builder.core.contract import DEFAULT_MODEL  # noqa: E402


def measure(decoder: str, photos, params, batch: int, seconds: float) -> dict:
    import torch

    from builder.repository.triton_models import gpu_imaging

    try:
        preprocessor = gpu_imaging.GpuPreprocessor(params, "cuda", decoder)
    except (RuntimeError, ValueError) as exc:
        return {"decoder": decoder, "error": str(exc)}
    items = [photos[i % len(photos)] for i in range(batch)]
    for _ in range(5):  # warm: buffers, kernels
        preprocessor(items)
    torch.cuda.synchronize()
    dmon = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1"], stdout=subprocess.PIPE, text=True)
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        preprocessor(items)
        images += batch
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    dmon.terminate()
    out, _ = dmon.communicate(timeout=10)
    header, samples = [], []
    for line in out.splitlines():
        if line.startswith("# gpu"):
            header = line[1:].split()
        elif line.strip() and not line.startswith("#") and header:
            samples.append(dict(zip(header, line.split())))
    samples = samples[1:] or samples  # the first sample may predate the loop

    def mean(key):
        values = [float(s[key]) for s in samples if s.get(key, "-").replace(".", "", 1).isdigit()]
        return round(sum(values) / len(values), 1) if values else None

    sm, jpg = mean("sm"), mean("jpg")
    return {"decoder": preprocessor.decoder.backend, "batch": batch, "seconds": round(wall, 2), "images": images,
            "img_per_s": round(images / wall, 1), "sm_percent": sm, "jpg_percent": jpg, "samples": len(samples),
            "sm_ms_per_image": round(sm / 100 * wall * 1000 / images, 4) if sm is not None else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--decoders", default="torchvision,nvimgcodec")
    args = parser.parse_args(argv)
    import timm
    import torch

    from builder.core import imaging
    from builder.core.photos import load_photo_files

    photos = [p.read_bytes() for p in load_photo_files()]
    model = timm.create_model(DEFAULT_MODEL, pretrained=False)
    params = imaging.PreprocessParams.from_timm(timm.data.resolve_data_config({}, model=model))
    rows = [measure(d, photos, params, args.batch, args.seconds) for d in args.decoders.split(",")]
    result = {"kind": "decoder_load", "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "photos": len(photos), "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=1))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
