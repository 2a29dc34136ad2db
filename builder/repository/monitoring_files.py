"""Writes a repository's `monitoring/` folder: the Prometheus config and rules, and the Grafana dashboard with its
provisioning, as one staged folder swapped in whole (a folder of the user's is never replaced)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

from builder.core import contract as C
from builder.errors import BuilderError
from builder.repository.dashboard import dashboard
from builder.repository.monitoring import (GENERATED, MARKER, MONITORING_DIR, PROMETHEUS_PORT,
                                           MonitoringSettings, prometheus_config, rules_file)
from builder.repository.output import staging_dir, swap_into_place


def _yaml(doc: Dict) -> str:
    import yaml

    return GENERATED + "\n" + yaml.safe_dump(doc, sort_keys=False, width=120)


def render(contract: Dict, settings: MonitoringSettings = MonitoringSettings()) -> Dict[str, str]:
    """File name (relative to the monitoring folder) -> text, for a repository's manifest contract."""
    names = C.Contract.named(contract["ensemble"])
    models = list(contract.get("models") or names.model_names)
    ensemble, classifier = names.ensemble, names.classifier
    return {
        "prometheus.yml": _yaml(prometheus_config(settings)),
        "rules.yml": _yaml(rules_file(models, settings)),
        "grafana/dashboards/swin-triton.json": dashboard(models, ensemble, classifier),
        "grafana/provisioning/datasources/prometheus.yml": _yaml(
            {"apiVersion": 1, "datasources": [{"name": "Prometheus", "type": "prometheus", "uid": "prometheus",
                                               "access": "proxy", "url": f"http://127.0.0.1:{PROMETHEUS_PORT}",
                                               "isDefault": True}]}),
        "grafana/provisioning/dashboards/swin-triton.yml": _yaml(
            {"apiVersion": 1, "providers": [{"name": "swin-triton", "type": "file",
                                             "options": {"path": "/var/lib/grafana/dashboards"}}]}),
    }


def monitoring_dir(repository: Path) -> Path:
    """Where a repository's monitoring files go: `monitoring/` beside it."""
    return Path(repository).resolve().parent / MONITORING_DIR


def check_monitoring_output(folder: Path) -> None:
    """Refuses a folder that this tool did not write (no marker), before any work.

    Raises:
        BuilderError: `folder` is a file, or a folder of the user's.
    """
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise BuilderError(f"monitoring: {folder} is not a folder; move it away (the Prometheus and Grafana "
                           "files are written there)")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise BuilderError(f"monitoring: {folder} holds files this tool did not write; move them away, or pass "
                           "another --output to `builder monitoring`")


def write_monitoring(folder: Path, files: Dict[str, str], settings: MonitoringSettings = MonitoringSettings()) -> Path:
    """Writes the monitoring files (`render`'s, for `settings`) into `folder` whole: a staged copy swapped in, so a
    failure leaves the old one.

    Raises:
        BuilderError: the folder is the user's, or cannot be written.
    """
    folder = Path(folder)
    check_monitoring_output(folder)
    with staging_dir(folder) as staging:  # the repository's own staging and swap: removed on any failure
        try:
            for name, text in files.items():
                path = staging / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
            (staging / MARKER).write_text(json.dumps({"settings": settings.__dict__}, indent=2) + "\n")
            swap_into_place(staging, folder)
        except OSError as exc:
            raise BuilderError(f"monitoring: cannot write {folder} ({exc.strerror or exc}); pass a folder you "
                               "can write") from None
    return folder
