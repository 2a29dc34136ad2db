"""Is this file the TensorRT plan its `plan.json` describes? Answered with the standard library alone.

`python -m builder.engines.trt build` writes `plan.json` beside every plan, with the plan's sha256. A plan
without it, or whose bytes differ from it (another file copied over, a truncated copy), is not one this
tool built and validated: the builder refuses it and `builder check` flags it, before a server fails to
deserialize it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from builder.errors import BuilderError

SIDECAR = "plan.json"


class PlanError(BuilderError):
    """A plan that is missing its sidecar or does not match it."""


def sha256(path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_plan(plan) -> dict:
    """Checks `plan` against the `plan.json` beside it.

    Args:
        plan: Path of the serialized engine.

    Returns:
        The sidecar's contents.

    Raises:
        PlanError: The plan or its sidecar is missing or unreadable, or the plan's bytes are not the ones
            the sidecar records.
    """
    plan = Path(plan)
    sidecar = plan.with_name(SIDECAR)
    build = "build it with `python -m builder.engines.trt build` (or `make plan-docker`), which writes both"
    if not plan.is_file():
        raise PlanError(f"plan: {plan} does not exist; {build}")
    if not sidecar.is_file():
        raise PlanError(f"plan: {plan} has no {SIDECAR} beside it, so nothing says what it is or that it passed "
                        f"its parity gate; {build}")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError(f"plan: {sidecar} cannot be read ({exc}); {build}") from None
    if not isinstance(info, dict) or not info.get("plan_sha256"):
        raise PlanError(f"plan: {sidecar} records no plan_sha256; {build}")
    if sha256(plan) != info["plan_sha256"]:
        raise PlanError(f"plan: {plan} is not the serialized engine its {SIDECAR} describes (sha256 differs: "
                        f"another file, or a damaged copy); {build}")
    return info
