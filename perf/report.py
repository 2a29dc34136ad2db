"""Markdown tables and PNG plots of sweep results, and comparisons between runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from builder.errors import BuilderError

BREAKDOWN = [("client_send_us", "client send"), ("network_server_us", "network + server I/O"),
             ("server_queue_us", "queue"), ("server_compute_input_us", "compute input"),
             ("server_compute_infer_us", "compute infer"), ("server_compute_output_us", "compute output"),
             ("client_recv_us", "client recv")]


def load(path: str, kinds: Tuple[str, ...] = ()) -> Dict:
    """Reads a results JSON written by `perf sweep` or `perf bare`.

    Args:
        path: The JSON file.
        kinds: The `kind`s the caller can use (empty: any).

    Raises:
        BuilderError: Unreadable, not results of this tool, or another kind of results.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BuilderError(f"{path}: cannot read results ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list) or "kind" not in doc:
        raise BuilderError(f"{path}: not a results file of `python -m perf` (no kind and results); pass the JSON "
                           "that `perf sweep` or `perf bare` wrote")
    if kinds and doc["kind"] not in kinds:
        raise BuilderError(f"{path}: holds {doc['kind']} results, this needs {' or '.join(kinds)} results; pass "
                           f"the JSON that `perf {kinds[0]}` wrote")
    return doc


def config_key(row: Dict) -> Tuple[str, str, str, int]:
    return (row["model"], row["protocol"], row["shared_memory"], row["batch_size"])


def _label(key) -> str:
    model, protocol, shm, batch = key
    return f"{model} {protocol} shm={shm} b={batch}"


def bare_reference(bare: Dict, server_batch: Optional[int]) -> Dict:
    """The bare row to compare with: at the batch the server forms (nearest bare batch not above it).

    Under load the dynamic batcher fills batches up to max_batch_size, whatever
    the client batch, so the fair reference is the bare engine at that batch.
    """
    rows = bare["results"]
    if server_batch:
        rows = [r for r in rows if r["batch_size"] <= server_batch] or rows
    return max(rows, key=lambda r: r["batch_size"])


def efficiency(row: Dict, reference: Optional[Dict]) -> Optional[float]:
    """Served throughput / bare throughput of the reference row."""
    if not reference or "throughput_img_per_s" not in row:
        return None
    return row["throughput_img_per_s"] / reference["throughput_img_per_s"]


def markdown(results: Dict, bare: Optional[Dict] = None, server_batch: Optional[int] = None) -> str:
    """A markdown table of every row, with the environment on top.

    With `bare`, a column gives serving efficiency: served img/s over the bare
    engine's img/s at the server's batch (`server_batch`, default the largest
    bare batch).
    """
    env = results.get("environment", {})
    reference = bare_reference(bare, server_batch) if bare else None
    lines = [f"# Sweep: {env.get('time_utc', '')}", "",
             f"- CPU: {env.get('cpu', '?')} ({env.get('cpu_count', '?')} cores); GPU: {env.get('gpu', 'none')}",
             f"- versions: {json.dumps(env.get('versions', {}))}",
             f"- command: `{env.get('command', '')}`", ""]
    header = "| model | protocol | shm | batch | concurrency | img/s | p50 ms | p99 ms | queue ms | infer ms |"
    if reference:
        header += f" efficiency vs bare b={reference['batch_size']} |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    failures = []
    for row in results["results"]:
        config = [row["model"], row["protocol"], row["shared_memory"], row["batch_size"], row["concurrency"]]
        if "error" in row:  # the table's own columns, the cause in a note below (its text may hold `|`)
            failures.append(row["error"])
            cells = config + [f"failed [{len(failures)}]"] + ["-"] * (header.count("|") - 7)
        else:
            cells = config + [f"{row['throughput_img_per_s']:.1f}", f"{row['latency_p50_us'] / 1000:.2f}",
                              f"{row['latency_p99_us'] / 1000:.2f}", f"{row.get('server_queue_us', 0) / 1000:.2f}",
                              f"{row.get('server_compute_infer_us', 0) / 1000:.2f}"]
            if reference:
                eff = efficiency(row, reference)
                cells.append(f"{eff:.1%}" if eff is not None else "")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if failures:
        lines += ["", f"{len(failures)} of {len(results['results'])} configuration(s) failed:"]
        lines += [f"{index}. {error}" for index, error in enumerate(failures, 1)]
    return "\n".join(lines) + "\n"


def plot(results: Dict, out_dir: Path) -> List[Path]:
    """Writes throughput-vs-latency and latency-breakdown PNGs; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["results"] if "error" not in r]
    if not rows:  # the table says why each failed
        return []
    groups: Dict[Tuple, List[Dict]] = {}
    for row in rows:
        groups.setdefault(config_key(row), []).append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for key, group in sorted(groups.items()):
        group = sorted(group, key=lambda r: r["concurrency"])
        for ax, metric in zip(axes, ("latency_p50_us", "latency_p99_us")):
            ax.plot([r[metric] / 1000 for r in group], [r["throughput_img_per_s"] for r in group], marker="o",
                    label=_label(key))
            for r in group:
                ax.annotate(str(r["concurrency"]), (r[metric] / 1000, r["throughput_img_per_s"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax, name in zip(axes, ("p50", "p99")):
        ax.set_xlabel(f"{name} latency (ms)")
        ax.set_ylabel("throughput (img/s)")
        ax.set_title(f"throughput vs {name} latency (labels: concurrency)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out_dir / "throughput_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # Latency breakdown at each configuration's highest concurrency.
    top = [max(group, key=lambda r: r["concurrency"]) for _, group in sorted(groups.items())]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(top) + 3), 5))
    bottoms = [0.0] * len(top)
    names = [f"{_label(config_key(r))}\nc={r['concurrency']}" for r in top]
    for key, label in BREAKDOWN:
        values = [r.get(key, 0.0) / 1000 for r in top]
        ax.bar(names, values, bottom=bottoms, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_ylabel("average latency (ms)")
    ax.set_title("latency breakdown (perf_analyzer) at the highest concurrency")
    ax.legend(fontsize=8)
    plt.setp(ax.get_xticklabels(), fontsize=7, rotation=20, ha="right")
    fig.tight_layout()
    paths.append(out_dir / "latency_breakdown.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _tail_points(quantiles: Dict[str, float], requests: int):
    """(shares of slower requests in %, latencies) of a row's quantiles; the maximum at one request's share."""
    points = sorted((100.0 - float(q), v) for q, v in quantiles.items())
    points = [(max(share, 100.0 / max(requests, 1)), v) for share, v in points]
    return [s for s, _ in points], [v for _, v in points]


def plot_tails(docs: List[Dict], path: Path) -> Path:
    """One PNG of the latency tails of sweeps run with `--request-count`: latency against the share of slower requests.

    Each row with `latency_quantiles_ms` is a line, labelled with its sweep's label and concurrency, so
    a stall that hits one request in a thousand shows as a jump at 0.1%. Rows that have them add a dashed
    line of the same colour: the steady load, without the start-up wave (`steady_latency_quantiles_ms`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    lines = 0
    for doc in docs:
        for row in doc["results"]:
            quantiles = row.get("latency_quantiles_ms")
            if not quantiles:
                continue
            name = doc.get("environment", {}).get("label") or row["model"]
            line, = ax.plot(*_tail_points(quantiles, row["requests"]), marker="o", markersize=3,
                            label=f"{name}, concurrency {row['concurrency']}")
            steady = row.get("steady_latency_quantiles_ms")
            if steady:
                ax.plot(*_tail_points(steady, row["requests"] - row.get("startup_requests", 0)), linestyle="--",
                        color=line.get_color(), label=f"{name}, after the first {row.get('startup_requests')}")
            lines += 1
    if not lines:
        raise BuilderError("no row has latency quantiles: run `perf sweep --request-count N`")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("requests slower than this (%)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency tail (every request, perf_analyzer profile export)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(baseline: Dict, candidate: Dict) -> str:
    """Markdown table of candidate/baseline ratios for configurations present in both."""
    def index(doc):
        return {(*config_key(r), r["concurrency"]): r for r in doc["results"] if "error" not in r}

    base, cand = index(baseline), index(candidate)
    common = sorted(set(base) & set(cand))
    if not common:
        raise BuilderError("the two runs share no configuration (model, protocol, shm, batch, concurrency)")
    lines = ["| model | protocol | shm | batch | concurrency | img/s base | img/s new | ratio | p99 ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in common:
        b, c = base[key], cand[key]
        lines.append(f"| {' | '.join(str(k) for k in key)} | {b['throughput_img_per_s']:.1f} | "
                     f"{c['throughput_img_per_s']:.1f} | {c['throughput_img_per_s'] / b['throughput_img_per_s']:.2f}x | "
                     f"{c['latency_p99_us'] / b['latency_p99_us']:.2f}x |")
    return "\n".join(lines) + "\n"
