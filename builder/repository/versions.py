"""Versions: `--add-version` into an existing repository, refused when the contract would change."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional

from builder.core.contract import LABELS_FILE, Contract, contract_tensors
from builder.core.manifest import MANIFEST, file_hashes
from builder.errors import BuilderError
from builder.repository import configs
from builder.repository.readme import README
from builder.settings import RepoSettings

log = logging.getLogger("builder")


def existing_versions(model_dir: Path) -> list:
    """The version numbers of a model folder's version subfolders, lowest first (none: [])."""
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
    classifier = output / Contract.named(settings.model_name).classifier
    labels = ((previous.get("model") or {}).get("labels") or {}).get("source", "")
    if settings.source.labels is None and labels.startswith("file:") and (classifier / LABELS_FILE).is_file():
        log.info("keeping the served class names (%s; pass --labels to change them)", classifier / LABELS_FILE)
        settings = dataclasses.replace(settings, source=dataclasses.replace(
            settings.source, labels=str(classifier / LABELS_FILE)))
    existing = existing_versions(classifier)
    log.info("adding version %d to %s", (max(existing) if existing else 0) + 1, output)
    return dataclasses.replace(settings, version=(max(existing) if existing else 0) + 1)


def contract_changes(previous: dict, settings: RepoSettings, contract: Optional[Contract] = None,
                      preprocess: Optional[Dict[str, str]] = None, labels: Optional[Dict] = None) -> list:
    """What a new version would change of what all versions share: (field, served, new) triples.

    Every version of a model is served under one config.pbtxt, so a new version must keep the tensors,
    batch size, preprocessing and classifier engine of the served ones; otherwise the server
    cannot load the old versions (or the new one) after the configs are replaced.
    """
    served = previous.get("settings") or {}
    changes = []
    pairs = [("max_batch_size", previous["contract"].get("max_batch_size"), settings.ensemble_max_batch),
             ("classifier max_batch_size", (served.get("classifier_batching") or {}).get("max_batch_size"),
              settings.classifier_batching.max_batch_size),
             ("preprocess", served.get("preprocess"), settings.preprocess)]
    if settings.engine != "auto":  # settled once the race ran: compared again then
        pairs.append(("engine", served.get("engine"), settings.engine))
    if contract is not None:
        pairs.append(("tensors", previous["contract"].get("tensors"), contract_tensors(contract)))
    if preprocess is not None:
        pairs.append(("preprocessing parameters", previous.get("preprocess"), preprocess))
    if labels is not None:  # one labels.txt per model serves every version's outputs
        served = (previous.get("model") or {}).get("labels") or {}
        if served.get("sha256") not in (None, labels["sha256"]):
            pairs.append(("class names", f"{served.get('source')} (sha256 {served['sha256'][:12]})",
                          f"{labels['source']} (sha256 {labels['sha256'][:12]})"))
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


# What a served config is tuned in (`perf tune --write`, a hand edit) and a new version keeps, by model role,
# with the `builder repo` options that set each: one of them given, and the new build's value wins.
_BATCHING_OPTIONS = ("preferred_batch_sizes", "max_queue_delay_us", "max_queue_size", "queue_timeout_us",
                     "priority_levels")
_PHOTO_INSTANCES = ("preprocess_instances", "preprocess_instance_kind", "gpus")
KEPT_FIELDS = {
    "classifier": {"instance_group": ("instance_count", "instance_kind", "gpus")},
    "preprocess": {"instance_group": _PHOTO_INSTANCES},
    "ensemble": {"instance_group": _PHOTO_INSTANCES, "response_cache": ("response_cache",)},
    "postprocess": {"instance_group": ()},
}


def keep_served_config(served, built, role: str, overrides=()) -> tuple:
    """A new version's config: the built one, with what the served one was tuned in kept.

    Args:
        served: The served `ModelConfig`.
        built: The config the new build wrote.
        role: "classifier", "preprocess", "postprocess" or "ensemble" (which fields are kept: `KEPT_FIELDS`,
            plus the dynamic batcher and the version policy of every model).
        overrides: `builder repo` options given on the command line; a field they set comes from `built`.

    Returns:
        (the config, one line per field where the two differ: which value is served and why).
    """
    merged = configs.ModelConfig()
    merged.CopyFrom(built)
    fields = {**KEPT_FIELDS[role], "dynamic_batching": _BATCHING_OPTIONS, "version_policy": ("version_policy",)}
    notes = []
    for field, options in fields.items():
        was, now = _field_text(served, field), _field_text(built, field)
        if was == now:
            continue
        given = sorted(set(options) & set(overrides))
        if given:
            notes.append(f"{built.name}: {field} {was or '(unset)'} -> {now or '(unset)'} "
                         f"(--{given[0].replace('_', '-')} given)")
            continue
        notes.append(f"{built.name}: keeping the served {field} {was or '(unset)'} (the build would write "
                     f"{now or '(unset)'}; pass {' or '.join('--' + o.replace('_', '-') for o in options)} "
                     "to change it)" if options else f"{built.name}: keeping the served {field} {was or '(unset)'}")
        merged.ClearField(field)
        if field == "instance_group":
            merged.instance_group.extend(served.instance_group)
        elif served.HasField(field):
            getattr(merged, field).CopyFrom(getattr(served, field))
    return merged, notes


def _field_text(config, field: str) -> str:
    """One field of a config as one line of config text ("" when unset)."""
    if field == "instance_group":
        return " ".join(f"{{{configs.one_line(group)}}}" for group in config.instance_group)
    return f"{{{configs.one_line(getattr(config, field))}}}" if config.HasField(field) else ""


def move_version_in(staging: Path, output: Path, contract: Contract, version: int, overrides=()) -> None:
    """Moves the new version directories into the live repository, then configs and manifest.

    Each config keeps what the served one was tuned in (`keep_served_config`), unless `overrides` names an
    option that sets it; every difference is logged.
    """
    names = [name for name in contract.model_names if (staging / name / str(version)).is_dir()]
    taken = [output / name / str(version) for name in names if (output / name / str(version)).exists()]
    if taken:  # checked for all before moving any, so a refusal changes nothing
        raise BuilderError(f"{taken[0]} already exists; remove it or pick another version")
    roles = dict(zip(contract.model_names, ("preprocess", "classifier", "postprocess", "ensemble")))
    configs_text = {}
    for name in contract.model_names:  # every config parsed before anything moves
        built = configs.read(staging / name / "config.pbtxt")
        served_path = output / name / "config.pbtxt"
        if served_path.is_file():
            built, notes = keep_served_config(configs.read(served_path), built, roles[name], overrides)
            for note in notes:
                log.info("%s", note)
            pinned = built.version_policy.specific.versions
            if built.version_policy.HasField("specific") and version not in pinned:
                log.warning("%s: version %d is written but not served: the served version policy pins %s; pass "
                            "--version-policy to serve it", name, version, list(pinned))
        configs_text[name] = configs.to_text(built)
    for name in names:
        os.rename(staging / name / str(version), output / name / str(version))  # atomic for a poller
    for name in contract.model_names:
        _move_model_files(staging / name, output / name)
        _replace_text(output / name / "config.pbtxt", configs_text[name])
    os.replace(staging / README, output / README)
    manifest = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"] = file_hashes(output)
    _replace_text(output / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")


