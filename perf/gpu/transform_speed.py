"""GPU time per image of the photo path's resize/crop/normalize, against its float32 predecessor, and the decode.

    python perf/gpu/transform_speed.py --output build/transform.json [--batches 32,128] [--decoder auto]

The bundled 640x480 JPEGs (`builder/parity_images/*_640x480.jpg`), decoded once on the GPU and repeated to
each batch size; each phase timed with CUDA events over `--repeats` runs after a warm-up (`*_ms_per_image`:
wall time on the GPU's clock), and its CUDA kernels summed under torch.profiler (`kernel_ms_per_image`: what
the phase takes from the multiprocessors that other processes share; the JPEG engines' work is not a kernel).
`exact_vs_cpu` is the largest difference between the GPU's transform and the same code on the CPU (float32
sums): 0 when the float16 tensor-core products are exact, as `split_weights` intends. `graphed_*`: the same
as served, small batches replayed as CUDA graphs (`gpu_transform.TransformGraphs`; `graphed_vs_eager_max_abs` 0
when bitwise equal).
Needs a CUDA GPU, torch, torchvision, timm.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from builder.core.contract import DEFAULT_MODEL  # noqa: E402


def float32_transform(pipe, images):
    """The transform as it was before the split weights: float32 products, rounding by floor(x + 0.5)."""
    import torch

    from builder.core import imaging
    from builder.repository.triton_models.gpu_transform import resample_weights

    crop_h, crop_w = pipe.params.image_size
    _, height, width = images[0].shape
    new_w, new_h = imaging._resized_size(width, height, pipe.params)
    top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))

    def matrix(size, new, start, length):
        key = ("float32", size, new, start, length)  # cached, as the predecessor cached its matrices
        if key not in pipe._matrices:
            weights = resample_weights(size, new, pipe.params.interpolation)[start:start + length]
            pipe._matrices[key] = torch.from_numpy(weights).to(pipe.device)
        return pipe._matrices[key]

    batch = torch.stack(images).float()
    batch = torch.matmul(batch, matrix(width, new_w, left, crop_w).T).add_(0.5).floor_().clamp_(0, 255)
    batch = torch.matmul(matrix(height, new_h, top, crop_h), batch).add_(0.5).floor_().clamp_(0, 255)
    return (batch - pipe.mean) / pipe.std


def timed(fn, repeats):
    """Milliseconds per call on the GPU (CUDA events), after two warm-up calls."""
    import torch

    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def kernel_ms(fn, repeats):
    """Milliseconds of CUDA kernels per call (torch.profiler's device time), whatever overlaps on the host."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    return sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 1000.0 / repeats


def rounding_candidates(pipe, on_cpu, decoded, args):
    """Candidates for each pass's integer rounding (7 elementwise kernels in eager mode) as one kernel.

    `compiled rounding`: `torch.compile(..., dynamic=True)` of `gpu_imaging.pillow_round`; `triton rounding`:
    the hand-written kernel of `perf/gpu/round_kernel.py` (no guards, one launch). Each is swapped in for
    `_pillow_round` for its measurement and the eager one put back after; rows give the transform's wall and
    kernel time, the first call's time (compilation) and the difference from the CPU's values (0: still exact).
    """
    import torch

    from builder.repository.triton_models import gpu_imaging

    eager = gpu_imaging.pillow_round

    def triton_rounding():
        from perf.gpu.round_kernel import pillow_round

        return pillow_round

    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    # The CPU's values first, with the eager rounding: a candidate swapped in is for CUDA tensors only.
    cpu_values = {b: on_cpu._transform_group([decoded[i % len(decoded)].cpu() for i in range(b)]) for b in batches}
    for name, make in (("compiled rounding", lambda: torch.compile(eager, dynamic=True)),
                       ("triton rounding", triton_rounding)):
        try:
            gpu_imaging.pillow_round = make()
            for batch in batches:
                images = [decoded[i % len(decoded)] for i in range(batch)]
                started = time.perf_counter()
                out = pipe._transform_group(images)
                torch.cuda.synchronize()
                first_s = time.perf_counter() - started
                cpu = cpu_values[batch]

                def run():
                    return pipe._transform_group(images)

                rows.append({"candidate": name, "batch": batch, "first_call_s": round(first_s, 2),
                             "transform_ms_per_image": timed(run, args.repeats) / batch,
                             "kernel_ms_per_image": kernel_ms(run, args.repeats) / batch,
                             "exact_vs_cpu": float((out.cpu() - cpu).abs().max())})
                print(json.dumps(rows[-1]), flush=True)
        except Exception as exc:  # a candidate that fails is a row saying why; the others are still measured
            rows.append({"candidate": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            gpu_imaging.pillow_round = eager
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--decoder", default="auto")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--no-candidates", dest="candidates", action="store_false",
                        help="skip the candidate roundings (torch.compile'd, a hand-written Triton kernel)")
    args = parser.parse_args()

    import timm
    import torch
    import torchvision

    from builder.core import imaging
    from builder.core.photos import load_photo_files
    from builder.repository.triton_models.gpu_imaging import GpuPreprocessor

    config = timm.data.resolve_data_config({}, model=timm.create_model(args.model, pretrained=False))
    params = imaging.PreprocessParams.from_timm(config)
    photos = [p.read_bytes() for p in load_photo_files()]
    pipe = GpuPreprocessor(params, "cuda", args.decoder, graphs=False)  # eager: the rows' transform
    graphed = GpuPreprocessor(params, "cuda", args.decoder)  # as served: small batches replay CUDA graphs
    on_cpu = GpuPreprocessor(params, "cpu")
    decoded = pipe.decoder(photos, [1] * len(photos))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        images = [decoded[i % len(decoded)] for i in range(batch)]
        items = [photos[i % len(photos)] for i in range(batch)]
        new, old = pipe._transform_group(images), float32_transform(pipe, images)
        cpu = on_cpu._transform_group([image.cpu() for image in images])
        row = {
            "batch": batch,
            "decode_ms_per_image": timed(lambda: pipe.decoder(items, [1] * batch), args.repeats) / batch,
            "transform_ms_per_image": timed(lambda: pipe._transform_group(images), args.repeats) / batch,
            "float32_transform_ms_per_image": timed(lambda: float32_transform(pipe, images), args.repeats) / batch,
            "graphed_transform_ms_per_image": timed(lambda: graphed._transform_group(images), args.repeats) / batch,
            "whole_ms_per_image": timed(lambda: pipe(items), args.repeats) / batch,
            "graphed_whole_ms_per_image": timed(lambda: graphed(items), args.repeats) / batch,
            "kernel_ms_per_image": {
                "decode": kernel_ms(lambda: pipe.decoder(items, [1] * batch), args.repeats) / batch,
                "transform": kernel_ms(lambda: pipe._transform_group(images), args.repeats) / batch,
                "float32_transform": kernel_ms(lambda: float32_transform(pipe, images), args.repeats) / batch,
            },
            "exact_vs_cpu": float((new.cpu() - cpu).abs().max()),
            "graphed_vs_eager_max_abs": float((graphed._transform_group(images) - new).abs().max()),
            "graph_captured": graphed.graphs.key(images) in graphed.graphs.kept,
            "float32_vs_new_max_abs": float((new - old).abs().max()),
            "float32_vs_new_pixels_differing": float(((new - old).abs() > 1e-4).float().mean()),
        }
        if batch == 1 and pipe.decoder.backend == "torchvision":  # a lone photo: the one-image call vs a list of one
            from torchvision.io import ImageReadMode, decode_jpeg

            encoded = torch.frombuffer(bytearray(items[0]), dtype=torch.uint8)
            row["decode_one_image_call_ms"] = timed(
                lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=pipe.device), args.repeats)
            row["decode_list_of_one_ms"] = timed(
                lambda: decode_jpeg([encoded], mode=ImageReadMode.RGB, device=pipe.device), args.repeats)
        rows.append(row)
        print(json.dumps(row), flush=True)
    candidates = rounding_candidates(pipe, on_cpu, decoded, args) if args.candidates else []
    report = {"kind": "transform_speed", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "decoder": pipe.decoder.backend,
              "product_dtype": str(pipe._dtype), "photos": len(photos), "repeats": args.repeats, "rows": rows, "candidates": candidates}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
