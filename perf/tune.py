"""Config tuner: live reloads with config overrides, measured by perf_analyzer.

The server runs with `--model-control-mode=explicit`. Each candidate (instance
count x max queue delay x preferred batch sizes x max_batch_size) is applied
by loading the model again with a config override through Triton's model
repository API: no restart, the repository files untouched. The best
candidate by throughput whose p99 latency is within the budget wins and can be
written back to the repository's config.pbtxt.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from google.protobuf import json_format

from builder.repository import configs
from builder.errors import BuilderError
from perf.sweep import SweepSettings, run_sweep

log = logging.getLogger("perf")


@dataclass(frozen=True)
class Candidate:
    """One point of the search space."""

    instance_count: int
    max_queue_delay_us: int
    preferred_batch_sizes: Tuple[int, ...]
    max_batch_size: int

    def apply(self, config: configs.ModelConfig) -> configs.ModelConfig:
        """A copy of `config` with this candidate's settings."""
        tuned = configs.ModelConfig()
        tuned.CopyFrom(config)
        tuned.max_batch_size = self.max_batch_size
        for group in tuned.instance_group:
            group.count = self.instance_count
        tuned.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
        del tuned.dynamic_batching.preferred_batch_size[:]
        tuned.dynamic_batching.preferred_batch_size.extend(
            [b for b in self.preferred_batch_sizes if b <= self.max_batch_size])
        return tuned


def candidates(instance_counts, queue_delays_us, preferred_sets, max_batch_sizes) -> List[Candidate]:
    """The full grid of candidates."""
    return [Candidate(i, d, tuple(p), m) for i, d, p, m in
            itertools.product(instance_counts, queue_delays_us, preferred_sets, max_batch_sizes)]


def tune(repository: str, sweep: SweepSettings, model: str, grid: List[Candidate], p99_budget_ms: float,
         write: bool = False, admin_key: Optional[str] = None) -> Dict:
    """Measures each candidate for `model` (a model of the repository) and picks the best.

    Args:
        repository: The repository the server was started on (the base config is read from it).
        sweep: Where to send load and how to measure (one protocol/shm/batch/concurrency point is typical).
        model: The model to tune, usually `<name>_classifier`.
        grid: Candidates.
        p99_budget_ms: Latency budget; candidates above it cannot win.
        write: Write the winner into `<repository>/<model>/config.pbtxt`.
        admin_key: The server's admin key (model loads are restricted to it).

    Returns:
        {"best": {...} or None, "results": [...]}
    """
    import tritonclient.http as httpclient

    path, base = _base_config(repository, model, p99_budget_ms)
    ensemble_mbs = _ensemble_max_batch(Path(repository), model)
    from builder.serving.server import admin_headers

    client = httpclient.InferenceServerClient(sweep.http_url)
    headers = admin_headers(admin_key, "http")
    _require_same_model(client, model, base, sweep.http_url, repository, headers)
    _require_explicit_mode(client, model, sweep.http_url, headers)
    results = []
    final = base  # what the server serves when tuning ends: the repository's config, or the winner written
    best = None
    try:
        for index, candidate in enumerate(grid, 1):
            if candidate.max_batch_size < ensemble_mbs:
                log.info("[%d/%d] skipping %s: below the ensemble's max_batch_size %d", index, len(grid),
                         candidate, ensemble_mbs)
                continue
            results.append(_measure(client, model, candidate, base, sweep, p99_budget_ms, headers))
            entry = results[-1]
            log.info("[%d/%d] %s -> %s", index, len(grid), candidate,
                     f"{entry['throughput_img_per_s']:.1f} img/s, p99 {entry['latency_p99_ms']:.1f} ms"
                     if "error" not in entry else entry["error"])
    except KeyboardInterrupt as exc:  # the finally below puts the repository's config back first
        exc.partial = {"best": None, "p99_budget_ms": p99_budget_ms, "model": model, "results": results,
                       "interrupted": True}
        raise
    else:
        eligible = [r for r in results if r.get("within_budget")]
        best = max(eligible, key=lambda r: r["throughput_img_per_s"]) if eligible else None
        if best and write:
            final = Candidate(best["instance_count"], best["max_queue_delay_us"],
                              tuple(best["preferred_batch_sizes"]), best["max_batch_size"]).apply(base)
            _write_config(path, final)
            log.info("wrote the best candidate into %s", path)
    finally:
        # Loaded with the config itself, not a bare reload: after an override, a reload kept serving the last
        # (losing) candidate. Checked by reading back what the server serves. Through a new client: an
        # interrupt that came mid-request leaves the old one's connection taken, and gevent would wait forever.
        _serve(httpclient.InferenceServerClient(sweep.http_url), model, final, headers)
    return {"best": best, "p99_budget_ms": p99_budget_ms, "model": model, "results": results}


def _base_config(repository: str, model: str, p99_budget_ms: float):
    """The tuned model's config file and its config, once the budget is one a candidate can meet."""
    if not 0 < p99_budget_ms < float("inf"):  # nan fails both comparisons
        raise BuilderError(f"p99_budget_ms: {p99_budget_ms} is a budget no candidate can meet; give milliseconds "
                           "above 0, e.g. 50")
    path = Path(repository) / model / "config.pbtxt"
    if not path.is_file():
        raise BuilderError(f"{path} does not exist; tune a model of the repository the server runs on")
    return path, configs.read(path)


def _measure(client, model: str, candidate: Candidate, base, sweep: SweepSettings, p99_budget_ms: float,
             headers) -> Dict:
    """Loads one candidate live and sweeps it; its result row."""
    client.load_model(model, config=json_format.MessageToJson(candidate.apply(base)), headers=headers)
    rows = run_sweep(sweep, progress=False)
    ok = [r for r in rows if "error" not in r]
    best_row = max(ok, key=lambda r: r["throughput_img_per_s"]) if ok else None
    entry = {**candidate.__dict__, "preferred_batch_sizes": list(candidate.preferred_batch_sizes)}
    if best_row:
        entry.update(throughput_img_per_s=best_row["throughput_img_per_s"],
                     latency_p99_ms=best_row["latency_p99_us"] / 1000,
                     within_budget=best_row["latency_p99_us"] / 1000 <= p99_budget_ms)
    else:
        entry.update(error=rows[0].get("error", "no result") if rows else "no result", within_budget=False)
    return entry


def served_settings(config) -> Dict:
    """The tuned fields of a config (a ModelConfig, or the JSON dict Triton's HTTP API returns)."""
    if not isinstance(config, dict):
        config = json_format.MessageToDict(config, preserving_proto_field_name=True)
    batching = config.get("dynamic_batching", {})
    largest = int(config.get("max_batch_size", 0))
    # A loaded config without preferred sizes reads back with [max_batch_size] (Triton fills it in): the same.
    preferred = [int(b) for b in batching.get("preferred_batch_size", [])]
    return {"max_batch_size": largest,
            "instance_count": [int(g.get("count", 1)) for g in config.get("instance_group", [])],
            "max_queue_delay_us": int(batching.get("max_queue_delay_microseconds", 0)),
            "preferred_batch_sizes": [] if preferred in ([], [largest]) else preferred}


def _serve(client, model: str, config, headers) -> None:
    """Loads `config` live and confirms the server serves it.

    Raises:
        BuilderError: The server serves something else afterwards.
    """
    client.load_model(model, config=json_format.MessageToJson(config), headers=headers)
    want, got = served_settings(config), served_settings(client.get_model_config(model, headers=headers))
    if want != got:
        raise BuilderError(f"after tuning, the server serves {model} with {got}, not {want}; reload it with "
                           f"`curl -X POST .../v2/repository/models/{model}/load` or restart the server")
    log.info("the server now serves %s with %s", model, want)


# What makes a served model the repository's (tensors, batch limit, backend, parameters); tuned fields aside.
_IDENTITY = ("input", "output", "max_batch_size", "backend", "platform", "parameters")


def _require_same_model(client, model: str, base, url: str, repository: str, headers) -> None:
    """The server must serve `repository`'s `model` before tuning pushes that repository's config into it."""
    try:
        served = client.get_model_config(model, headers=headers)
    except Exception as exc:  # not served there, or no server: one line either way
        text = exc.message() if callable(getattr(exc, "message", None)) else type(exc).__name__
        raise BuilderError(f"the server at {url} does not serve {model} ({text}); point --http-url at the server "
                           f"that runs {repository}, or start it with `make serve MODEL_CONTROL=explicit`") from None
    mine = json_format.MessageToDict(base, preserving_proto_field_name=True)
    parsed = configs.ModelConfig()
    json_format.ParseDict(served, parsed, ignore_unknown_fields=True)
    theirs = json_format.MessageToDict(parsed, preserving_proto_field_name=True)
    differ = [field for field in _IDENTITY if mine.get(field) != theirs.get(field)
              and not (field in ("backend", "platform") and not mine.get(field))]  # the server fills them in
    if differ:
        raise BuilderError(f"the server at {url} serves another {model} than {repository} holds ({', '.join(differ)} "
                           f"differ); tuning would load {repository}'s config into it: pass the --repository the "
                           "server runs, or point --http-url at the server of this one")


def _require_explicit_mode(client, model: str, url: str, headers: Optional[Dict[str, str]]) -> None:
    """Tuning reloads the model with config overrides: only a server in explicit mode allows it."""
    from tritonclient.utils import InferenceServerException

    try:
        client.load_model(model, headers=headers)  # a reload of the repository's own config
    except InferenceServerException as exc:
        text = exc.message() or str(exc)
        if "restricted" in text.lower() or "admin" in text.lower():
            raise BuilderError(f"the server at {url} restricts model loads to its admin key ({text.strip()}); "
                               "set TRITON_ADMIN_KEY or pass --admin-key (make serve keeps it in "
                               ".server/admin-key)") from None
        if "explicit model load / unload is not allowed" in text or "not allowed" in text:
            raise BuilderError(f"the server at {url} does not allow model loads ({text.strip()}); start it in "
                               "explicit model-control mode: `make serve MODEL_CONTROL=explicit`") from None
        raise BuilderError(f"the server at {url} refused to load {model}: {text.strip()}") from None
    except Exception as exc:  # connection refused and friends
        raise BuilderError(f"no server answers at {url} ({type(exc).__name__}); start one with "
                           "`make serve MODEL_CONTROL=explicit`") from None


def _ensemble_max_batch(repository: Path, model: str) -> int:
    largest = 0
    for config_path in repository.glob("*/config.pbtxt"):
        config = configs.read(config_path)
        if config.platform == "ensemble" and any(s.model_name == model for s in config.ensemble_scheduling.step):
            largest = max(largest, config.max_batch_size)
    return largest


def _write_config(path: Path, config: configs.ModelConfig) -> None:
    tmp = path.with_suffix(".pbtxt.tmp")
    tmp.write_text(configs.to_text(config), encoding="utf-8")
    os.replace(tmp, path)  # a polling server never reads a half-written config
