"""Versions: `--add-version` into an existing repository, refused when the contract would change."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional

from builder.core.contract import Contract, contract_tensors
from builder.core.manifest import MANIFEST, file_hashes
from builder.errors import BuilderError
from builder.repository.readme import README
from builder.settings import RepoSettings

log = logging.getLogger("builder")


def _existing_versions(model_dir: Path) -> list:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of either


def same_repository(settings: RepoSettings, previous: dict, output: Path) -> RepoSettings:
    """The settings of a version added to `output`: same ensemble and flavor, next version number."""
    if previous["contract"].get("ensemble") != settings.model_name:
        raise BuilderError(f"name: the repository serves {previous['contract'].get('ensemble')!r}, not "
                           f"{settings.model_name!r}; add versions of the same ensemble")
    if previous["flavor"] != settings.flavor:
        raise BuilderError(f"flavor: {output} is a {previous['flavor']} repository and the new version would be "
                           f"{settings.flavor}; one repository serves one flavor: pass --flavor "
                           f"{previous['flavor']} (or leave it out), or build a new repository")
    refuse_contract_changes(contract_changes(previous, settings))
    existing = _existing_versions(output / Contract.named(settings.model_name).classifier)
    log.info("adding version %d to %s", (max(existing) if existing else 0) + 1, output)
    return dataclasses.replace(settings, version=(max(existing) if existing else 0) + 1)


def contract_changes(previous: dict, settings: RepoSettings, contract: Optional[Contract] = None,
                      preprocess: Optional[Dict[str, str]] = None) -> list:
    """What a new version would change of what all versions share: (field, served, new) triples.

    Every version of a model is served under one config.pbtxt, so a new version must keep the tensors,
    batch size, top-k, preprocessing and classifier engine of the served ones; otherwise the server
    cannot load the old versions (or the new one) after the configs are replaced.
    """
    served = previous.get("settings") or {}
    changes = []
    pairs = [("max_batch_size", previous["contract"].get("max_batch_size"), settings.ensemble_max_batch),
             ("classifier max_batch_size", (served.get("classifier_batching") or {}).get("max_batch_size"),
              settings.classifier_batching.max_batch_size),
             ("top_k", served.get("top_k"), settings.top_k),
             ("preprocess", served.get("preprocess"), settings.preprocess)]
    if settings.engine != "auto":  # settled once the race ran: compared again then
        pairs.append(("engine", served.get("engine"), settings.engine))
    if contract is not None:
        pairs.append(("tensors", previous["contract"].get("tensors"), contract_tensors(contract)))
    if preprocess is not None:
        pairs.append(("preprocessing parameters", previous.get("preprocess"), preprocess))
    for name, was, now in pairs:
        if isinstance(was, dict) and isinstance(now, dict):  # name the entries that differ, not the whole dict
            changes += [(f"{name} {key}", was.get(key), now.get(key)) for key in sorted({*was, *now})
                        if was.get(key) != now.get(key)]
        elif was is not None and was != now:
            changes.append((name, was, now))
    return changes


def refuse_contract_changes(changes: list) -> None:
    if not changes:
        return
    said = "; ".join(f"{name} {was!r} -> {now!r}" for name, was, now in changes)
    raise BuilderError(f"add_version: the new version changes what every version shares ({said}); all versions "
                       "are served under one config, so the old ones would stop loading: build it as a new "
                       "repository (without --add-version), or keep the served values")


def _move_model_files(source: Path, target: Path) -> None:
    """Moves a model directory's unversioned files (labels, warm-up inputs) over the served ones, each atomically."""
    for path in source.rglob("*"):
        relative = path.relative_to(source)
        if relative.parts[0].isdigit() or path.name == "config.pbtxt" or not path.is_file():
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target / relative)


def move_version_in(staging: Path, output: Path, contract: Contract, version: int) -> None:
    """Moves the new version directories into the live repository, then configs and manifest."""
    names = (contract.preprocess, contract.classifier, contract.postprocess)
    taken = [output / name / str(version) for name in names if (output / name / str(version)).exists()]
    if taken:  # checked for all before moving any, so a refusal changes nothing
        raise BuilderError(f"{taken[0]} already exists; remove it or pick another version")
    for name in names:
        os.rename(staging / name / str(version), output / name / str(version))  # atomic for a poller
    for name in contract.model_names:
        _move_model_files(staging / name, output / name)
        _replace_text(output / name / "config.pbtxt", (staging / name / "config.pbtxt").read_text(encoding="utf-8"))
    os.replace(staging / README, output / README)
    manifest = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"] = file_hashes(output)
    _replace_text(output / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


