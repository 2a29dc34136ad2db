"""Subcommands sweep, report, compare, tails, tune and scaling (registered by perf.__main__)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from builder.core import contract as C
from perf.environment import bundled_photos

RESULTS = Path("perf/results")


def _sweep_settings(args):
    from perf.sweep import SweepSettings

    from perf.environment import image_paths

    # No --images: the sweep measures the classifier alone (the ensemble's rows need images and say so).
    images = [str(p) for p in image_paths(args.images)] if args.images else []
    return SweepSettings(
        name=args.name, http_url=args.http_url, grpc_url=args.grpc_url, models=tuple(args.models),
        concurrency=tuple(args.concurrency), batch_sizes=tuple(args.batch_sizes), protocols=tuple(args.protocols),
        shared_memory=tuple(args.shared_memory), images=tuple(images),
        measurement_interval_ms=args.measurement_interval_ms, stability_percent=args.stability_percent,
        max_trials=args.max_trials, request_count=args.request_count,
        client_threads=args.client_threads)


def _cmd_sweep(args) -> int:
    from perf.environment import write_json
    from perf.sweep import run_sweep, sweep_payload

    from perf.sweep import Interrupted

    settings = _sweep_settings(args)
    output = args.output or str(RESULTS / f"local-sweep-{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        rows = run_sweep(settings)
    except Interrupted as stop:  # the finished rows are kept, marked as an interrupted run
        payload = sweep_payload(settings, stop.rows, {"label": args.label})
        payload["interrupted"] = True
        print(write_json(output, payload))
        raise
    print(write_json(output, sweep_payload(settings, rows, {"label": args.label})))
    failed = [r for r in rows if "error" in r]
    if failed:  # every row is in the file; the exit status says the sweep is not whole
        print(f"error: {len(failed)} of {len(rows)} configuration(s) failed; the first: {failed[0]['error']}",
              file=sys.stderr)
    return 1 if failed else 0


def _cmd_report(args) -> int:
    from perf import report

    results = report.load(args.results, ("sweep",))
    bare = report.load(args.bare, ("bare",)) if args.bare else None
    out_dir = Path(args.output or Path(args.results).with_suffix(""))
    out_dir.mkdir(parents=True, exist_ok=True)
    text = report.markdown(results, bare, args.server_batch)
    paths = report.plot(results, out_dir)
    if paths:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in paths) + "\n"
    (out_dir / "report.md").write_text(text)
    print(text)
    print(f"wrote {out_dir / 'report.md'}" + "".join(f", {p}" for p in paths)
          + ("" if paths else " (no plots: no configuration succeeded)"))
    return 0


def _cmd_compare(args) -> int:
    from perf import report

    print(report.compare(report.load(args.baseline, ("sweep",)), report.load(args.candidate, ("sweep",))))
    return 0


def _cmd_tails(args) -> int:
    from perf import report

    print(report.plot_tails([report.load(path, ("sweep",)) for path in args.results], Path(args.output)))
    return 0


def _cmd_tune(args) -> int:
    from perf.environment import describe, write_json
    from perf.tune import candidates, tune

    settings = _sweep_settings(args)
    grid = candidates(args.instance_counts, args.queue_delays_us,
                      [tuple(int(b) for b in s.split("/") if b) for s in args.preferred], args.max_batch_sizes)
    model = args.model or f"{args.name}_classifier"
    from builder.serving.server import admin_key

    key = args.admin_key or admin_key(args.server_workdir)
    output = args.output or str(RESULTS / f"local-tune-{time.strftime('%Y%m%d-%H%M%S')}.json")
    try:
        result = tune(args.repository, settings, model, grid, args.p99_budget_ms, write=args.write, admin_key=key)
    except KeyboardInterrupt as exc:  # the candidates measured so far are kept, as perf's message says
        if getattr(exc, "partial", None) is not None:
            write_json(output, {"kind": "tune", "environment": describe(), **exc.partial})
        raise
    write_json(output, {"kind": "tune", "environment": describe(), **result})
    print(json.dumps(result["best"]))
    print(output)
    return 0 if result["best"] else 1


def _cmd_scaling(args) -> int:
    from builder.core.mps import host_gpus
    from perf import scaling
    from perf.environment import describe, image_paths, write_json

    settings = scaling.ScalingSettings(
        repository=args.repository, name=args.name, gpu_counts=tuple(args.gpu_counts), batch_size=args.batch_size,
        concurrency_per_gpu=args.concurrency_per_gpu, images=tuple(str(p) for p in image_paths(args.images)),
        measurement_interval_ms=args.measurement_interval_ms, stability_percent=args.stability_percent,
        max_trials=args.max_trials, cuda_memory_pool_mb=args.cuda_memory_pool_mb, workdir=args.workdir)
    result = scaling.run_scaling(settings, host_gpus())
    result["environment"] = describe()
    output = Path(args.output)
    write_json(str(output), result)
    table = scaling.markdown(result)
    picture = scaling.plot(result, output.with_suffix(".png"))
    print(table)
    print(f"wrote {output}" + (f" and {picture}" if picture else ""))
    return 0 if all("error" not in r for r in result["rows"]) else 1


def _windows(p, settings) -> None:
    """perf_analyzer's measurement windows (sweep and scaling), defaults from the command's settings class."""
    from builder.cli.args import field_default

    for option, field, what in (("--measurement-interval-ms", "measurement_interval_ms", "each window's length"),
                                ("--stability-percent", "stability_percent",
                                 "allowed variation between windows (loosen it on a busy or small host)"),
                                ("--max-trials", "max_trials", "windows tried before giving up on stability")):
        p.add_argument(option, type=int, default=field_default(settings, field), help=what)


def _common(p, ints, words) -> None:
    from perf.sweep import SweepSettings

    p.add_argument("--name", default=C.DEFAULT_MODEL, help="ensemble name")
    p.add_argument("--http-url", default=SweepSettings.http_url)
    p.add_argument("--grpc-url", default=SweepSettings.grpc_url)
    p.add_argument("--models", type=words, default=["ensemble"], help="ensemble,classifier,preprocess")
    p.add_argument("--concurrency", type=ints, default=[1, 4, 16])
    p.add_argument("--batch-sizes", type=ints, default=[1])
    p.add_argument("--protocols", type=words, default=["grpc"], help="grpc,http")
    p.add_argument("--shared-memory", type=words, default=["none"], help="none,system,cuda")
    p.add_argument("--images", type=words, default=[], help="image files or folders (ensemble input data)")
    _windows(p, SweepSettings)
    p.add_argument("--request-count", type=int, default=0,
                   help="measure over this many requests instead of time windows, and report each row's tail "
                        "(p99.9, max, requests slower than 10x the median) from perf_analyzer's profile export")
    p.add_argument("--client-threads", type=int, default=0,
                   help="0: perf_analyzer's synchronous client, a thread per request in flight; N: its asynchronous "
                        "client on N threads (fewer client cores at high concurrency)")
    p.add_argument("--output", default=None)


def add_commands(sub, ints, words, naturals) -> None:
    """Registers the subcommands; `ints` parses counts (>= 1), `naturals` values that may be 0."""
    s = sub.add_parser("sweep", help="perf_analyzer over a grid")
    _common(s, ints, words)
    s.add_argument("--label", default="", help="free text stored with the results")
    s.set_defaults(func=_cmd_sweep, output_kind="file")
    r = sub.add_parser("report", help="markdown table + PNG plots of a sweep")
    r.add_argument("results")
    r.add_argument("--bare", default=None, help="bare-engine results for serving efficiency")
    r.add_argument("--server-batch", type=int, default=None,
                   help="batch the server forms (max_batch_size); the bare reference for efficiency")
    r.add_argument("--output", default=None, help="folder for report.md and the PNGs")
    r.set_defaults(func=_cmd_report, output_kind="folder")
    c = sub.add_parser("compare", help="ratios between two sweeps")
    c.add_argument("baseline")
    c.add_argument("candidate")
    c.set_defaults(func=_cmd_compare)
    t = sub.add_parser("tails", help="PNG of the latency tails of sweeps run with --request-count")
    t.add_argument("results", nargs="+", help="sweep JSON files (each line labelled with its --label)")
    t.add_argument("--output", default="tails.png")
    t.set_defaults(func=_cmd_tails, output_kind="file")
    t = sub.add_parser("tune", help="search batching/instances by live reloads (server in explicit mode)")
    _common(t, ints, words)
    t.add_argument("--repository", default="model_repository")
    t.add_argument("--model", default=None, help="model to tune (default <name>_classifier)")
    t.add_argument("--instance-counts", type=ints, default=[1, 2])
    t.add_argument("--queue-delays-us", type=naturals, default=[100, 1000])
    t.add_argument("--preferred", type=words, default=[""], help="preferred batch sets, e.g. 4/8,8/16")
    t.add_argument("--max-batch-sizes", type=ints, default=[32])
    t.add_argument("--p99-budget-ms", type=float, default=100.0)
    t.add_argument("--write", action="store_true", help="write the winner into the repository config")
    t.add_argument("--admin-key", default=None,
                   help="the server's admin key (default: $TRITON_ADMIN_KEY, else <server-workdir>/admin-key)")
    t.add_argument("--server-workdir", default=".server", help="where `make serve` keeps its admin key")
    # The tuned model is the classifier: measure it directly (tensor input, no photos needed).
    t.set_defaults(func=_cmd_tune, models=["classifier"], output_kind="file")
    g = sub.add_parser("scaling", help="the repository served on 1, 2, 4, ... GPUs: img/s, ratio to N x one GPU, "
                                       "host CPU load (JSON, table, PNG)")
    g.add_argument("--repository", default="model_repository", help="built without --gpus (every GPU)")
    g.add_argument("--name", default=C.DEFAULT_MODEL, help="ensemble name")
    g.add_argument("--gpu-counts", type=naturals, default=[1, 2, 4, 8],
                   help="GPUs visible to each server (the first N); 0: none, CPU instances")
    g.add_argument("--batch-size", type=int, default=1, help="images per request, the same at every count")
    g.add_argument("--concurrency-per-gpu", type=int, default=64)
    g.add_argument("--images", type=words, default=[bundled_photos()], help="image files or folders")
    from perf.scaling import ScalingSettings

    _windows(g, ScalingSettings)
    g.add_argument("--cuda-memory-pool-mb", type=int, default=256, help="each visible GPU's CUDA memory pool")
    g.add_argument("--workdir", default=".scaling", help="each server's copy and log (gpus-<N>/)")
    g.add_argument("--output", default="perf/results/local-scaling.json", help="JSON; the PNG goes beside it")
    g.set_defaults(func=_cmd_scaling, output_kind="file")
