"""The generated repository's README.md: what is served, which engine and why, and the parity figures.

A person who finds the folder on a server (or in a container image) reads
there what `manifest.json` holds for machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from builder.core.contract import Contract
from builder.engines.choice import Candidate, markdown_table
from builder.settings import MANY_PHOTO_PATH_INSTANCES, RepoSettings

README = "README.md"


def render(settings: RepoSettings, contract: Contract, choice: Dict, gates: Dict,
           photo_setup: Optional[Dict] = None) -> str:
    """The README text."""
    lines = [f"# {contract.ensemble}: Triton model repository", "",
             f"Written by `python -m builder repo` ({settings.flavor} flavor, timm `{settings.source.model_name}`). "
             f"Clients call the ensemble `{contract.ensemble}`: encoded images in (`{contract.image.name}`, BYTES), "
             f"`{contract.probabilities.name}` and `{contract.logits.name}` out (one value per class, labelled: top-k "
             "with class names is Triton's `class_count`). `manifest.json` holds the same facts for machines.", "",
             "| model | role |", "| --- | --- |",
             f"| {contract.preprocess} | encoded image -> `{contract.pixels.name}` ({settings.preprocess} "
             "preprocessing) |",
             f"| {contract.classifier} | `{contract.pixels.name}` -> `{contract.logits.name}` "
             f"(engine: {choice['chosen']}) |",
             f"| {contract.postprocess} | logits -> probabilities (softmax) |",
             f"| {contract.ensemble} | {_photo_path_role(settings, contract)} |", "",
             *_serving_notes(settings), *_photo_setup_lines(photo_setup),
             "## Classifier engine", "",
             f"Asked for `{choice['requested']}`; serving `{choice['chosen']}`: {choice['reason']}.", ""]
    rows = [Candidate(**{k: v for k, v in c.items() if k in Candidate.__dataclass_fields__})
            for c in choice.get("candidates", [])]
    if rows:
        lines += [markdown_table(rows)]
    thresholds = choice.get("thresholds")
    if thresholds:  # what a candidate had to meet against PyTorch FP32 on the bundled photos
        lines += ["Gates against PyTorch FP32 on the bundled photos: " + "; ".join(
            f"{kind} precisions max abs <= {t['max_abs']:g}, cosine >= {t['min_cosine']:g}, top-1 >= {t['min_top1']:g}"
            for kind, t in thresholds.items()) + ". A candidate that misses them is never served.", ""]
    if choice.get("calibration"):
        lines += [f"Calibration of the served engine's quantization: {choice['calibration']}.", ""]
    lines += ["## Parity gates", "", "| gate | max abs | min cosine | top-1 agreement | inputs |",
              "| --- | --- | --- | --- | --- |"]
    for name, figures in gates.items():
        if isinstance(figures, dict) and "max_abs" in figures:
            lines.append(f"| {name} | {figures['max_abs']:.3g} | {figures.get('min_cosine', float('nan')):.6f} | "
                         f"{figures.get('top1_agreement', float('nan')):.3f} | {figures.get('inputs', '')} |")
    return "\n".join(lines) + "\n"


def _photo_setup_lines(record: Optional[Dict]) -> list:
    """What the build measured for the photo path's processes, batch limit and MPS, and how to pin each."""
    if not record:
        return []
    chosen = record["chosen"]
    written = (f"{chosen['processes']} photo-path processes, batches of up to {chosen['batch']}, "
               f"MPS {'on' if chosen['mps'] else 'off'}")
    pin = ("Pin any value by hand: `--preprocess-instances N`, `--preprocess-max-batch-size B` (make "
           "`PREPROCESS_INSTANCES`, `PREPROCESS_MAX_BATCH`), `builder serve --mps/--no-mps` (make serve `MPS=1/0`); "
           "`--photo-setup fixed` takes the hand-measured setup without measuring.")
    if not record.get("measured"):
        return ["## Photo path setup", "", f"Not measured ({record['reason']}): {written}. {pin}", ""]
    lines = ["## Photo path setup", "",
             f"Measured by the build on {record['gpu']} in {record['took_s']:g} s: the photo path's own code with "
             "no server (JPEG bytes to class arrays, every process at once), "
             f"{record['seconds_per_point']:g} s a candidate. Written: {written}, the most images a second "
             f"among candidates whose batch took at most {record['budget_ms']:g} ms at its median. {pin}", "",
             "| processes | batch limit | MPS | img/s | batch p50 ms |", "| --- | --- | --- | --- | --- |"]
    for row in record["rows"]:
        mark = "**" if all(row[k] == chosen[k] for k in ("processes", "batch", "mps")) else ""
        lines.append(f"| {mark}{row['processes']}{mark} | {row['batch']} | {'on' if row['mps'] else 'off'} | "
                     f"{row['img_per_s']:,.0f} | {row['batch_p50_ms']:.1f} |")
    return lines + [""]


def _photo_path_role(settings: RepoSettings, contract: Contract) -> str:
    """What the model under the ensemble's name is: Triton's ensemble of three, or one Python model (GPU path)."""
    design = settings.gpu_photo_path if settings.preprocess == "gpu" else "ensemble"
    if design == "fused":
        return ("the photo path in one Python model: the batch decoded and transformed on the GPU, classified by "
                "the classifier's engine in the same process, softmax on the GPU (`fused`)")
    if design == "bls":
        return (f"the photo path in one Python model: the batch decoded and transformed on the GPU, one request to "
                f"{contract.classifier} per batch (BLS), softmax on the GPU (`bls`)")
    if design == "hybrid":
        return (f"the photo path in one Python model: the batch decoded and transformed on the GPU, classified in "
                f"the same process up to {settings.hybrid_local_batch} images, larger batches by one request to "
                f"{contract.classifier} (BLS), softmax on the GPU (`hybrid`)")
    return "the three in one request (Triton ensemble)"


def _serving_notes(settings: RepoSettings) -> list:
    """How to serve what was built: MPS where several GPU Python instances share a GPU; the transform's graphs."""
    pre = settings.preprocess_instances
    if settings.preprocess != "gpu" or pre.kind != "KIND_GPU":
        return []
    # Measured: perf/results/h200-photo-graphs (the same server with and without them).
    notes = ["Batches of a few photos replay the transform (resize, crop, normalize) as a CUDA graph, one per "
             "image size and power-of-two batch, captured the second time a size comes: bitwise the eager "
             "values, and on an H200 one image at concurrency 1 took p50 2.95 ms instead of 4.33. The models' "
             "`transform_graphs` parameter set to \"0\" turns them off (a failed capture does so by itself, "
             "with a warning in the server log)."]
    if pre.count > 2:
        notes.insert(0, f"The photo path runs {pre.count} instances per GPU, each a process with its own CUDA "
                     "context: serve under CUDA MPS (`python -m builder serve --mps`, or the NVIDIA device plugin's "
                     "MPS sharing in Kubernetes), or the GPU runs one instance at a time (on an H200, 6 instances "
                     "served 5,490 one-image requests a second under MPS and 4,660 without).")
    if settings.gpu_photo_path in ("fused", "bls") and pre.count >= MANY_PHOTO_PATH_INSTANCES:
        # Measured: perf/results/h200-photo-buckets and h200-photo-hybrid (the classifier model batches several
        # instances' batches; hybrid keeps a lone photo in the photo path's process).
        notes.append("With this many instances the `hybrid` design (`--gpu-photo-path hybrid`, what `auto` picks "
                     "here) served more on an H200 under MPS: 7,493 one-image requests a second with 8 instances "
                     "(bls 6,924-7,367, fused 6,473), and one image at concurrency 1 in p50 3.7 ms (bls "
                     "5.4).")
    return ["## Serving", "", *(line for note in notes for line in (note, ""))]


def write_readme(root: Path, settings: RepoSettings, contract: Contract, choice: Dict, gates: Dict,
                 photo_setup: Optional[Dict] = None) -> Path:
    """Writes README.md into the repository folder `root`."""
    path = Path(root) / README
    path.write_text(render(settings, contract, choice, gates, photo_setup), encoding="utf-8")
    return path
