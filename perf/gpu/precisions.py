"""Each inductor precision built, gated and timed as `--engine auto` does (compiled side by side, timed in turn).

    python perf/gpu/precisions.py --output build/precisions.json [--precisions fp16,int8,fp8,fp8-static]
        [--timeout-s 300]
        [--window-attention auto|timm|fused|both]

Every precision listed is tried with each window attention in question: `--window-attention` `auto` (both),
`timm` or `fused`, or `both`: every precision with timm's attention, then every one with the fused kernel, timed in
one run.

Swin-T (timm `swin_tiny_patch4_window7_224`, random weights seed 0 unless --checkpoint), the bundled photos
through the exact preprocessing as the parity set, PyTorch FP32 as the reference. Needs a CUDA GPU, torch,
timm and, for int8/fp8, torchao.
"""

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from builder.core.contract import DEFAULT_MODEL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--checkpoint")
    parser.add_argument("--precisions", default="fp16,int8,fp8,fp8-tensor")
    parser.add_argument("--batches", default="1,32,64,128")
    parser.add_argument("--timeout-s", type=float, default=300)
    parser.add_argument("--window-attention", choices=("auto", "timm", "fused", "both"), default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)

    import torch

    from builder.core.contract import Contract
    from builder.core.imaging import PreprocessParams
    from builder.engines.race import inductor_candidates
    from builder.export.model import load_model
    from builder.settings import Batching, ModelSource, RepoSettings

    settings = RepoSettings(source=ModelSource(args.model, checkpoint=args.checkpoint), engine="inductor",
                            flavor="local", preprocess="gpu", compile_timeout_s=args.timeout_s,
                            classifier_batching=Batching(128, (32, 64, 128), 500))
    model = load_model(settings.source)
    height, width = model.data_config["input_size"][1:]
    contract = Contract(settings.model_name, (int(height), int(width)), model.num_classes)
    params = PreprocessParams.from_timm(model.data_config, settings.max_image_pixels)
    batches = [int(b) for b in args.batches.split(",")]
    report = {"model": args.model, "weights": model.weights, "gpu": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "command": " ".join(sys.argv)}
    rows, gates = [], {}
    for attention in ("timm", "fused") if args.window_attention == "both" else (args.window_attention,):
        with tempfile.TemporaryDirectory() as tmp:
            found, figures = inductor_candidates(dataclasses.replace(settings, window_attention=attention), model,
                                                 contract, params, Path(tmp), report["gpu"], batches, strict=False,
                                                 precisions=args.precisions.split(","))
        rows += found
        gates.update(figures)
    report["program_parity"] = gates["inductor_vs_pytorch"]
    report["fused_program_parity"] = gates.get("inductor_fused_vs_pytorch")
    report["candidates"] = [row.to_dict() for row in rows]
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        best = row.best or {}
        logging.info("%s: %s, b1 %s ms, best %s img/s, parity %s, %s", row.label, row.status, row.latency_b1_ms,
                     best.get("throughput_img_per_s"), row.parity, row.reason[:300])


if __name__ == "__main__":
    main()
