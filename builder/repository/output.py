"""Where a repository is written: never over someone's files, staged beside it, swapped in with no gap.

A build writes into a staging folder next to the output (same filesystem),
then exchanges the two folders with one `renameat2(RENAME_EXCHANGE)` call: a
polling server sees the old tree or the new one, never a missing path.
Staging and old folders carry the builder's pid in their names, so the next
build removes what a killed one left behind.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from builder.core.manifest import MANIFEST
from builder.errors import BuilderError

log = logging.getLogger("builder")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def is_our_repository(path: Path) -> bool:
    """True when `path` holds a manifest.json written by this tool."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"contract", "files", "flavor"} <= set(manifest)


def check_output(output: Path, replace: bool = True) -> Path:
    """Refuses an output path the build must not touch; returns it resolved.

    Args:
        output: The repository folder the user named.
        replace: The build replaces the folder (False: it adds a version to it).

    Raises:
        BuilderError: The path is a file, or a folder with contents this tool did not write.
    """
    path = Path(output).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise BuilderError(f"output: {output} is a file, not a folder; pass a new folder or an existing "
                           "model repository for --output")
    if replace and path.is_dir() and any(path.iterdir()) and not is_our_repository(path):
        raise BuilderError(f"output: {output} holds files that are not a model repository written by this tool "
                           f"(no {MANIFEST} of ours), and the build would replace them; pass a new or empty "
                           "folder for --output")
    return path


# Top-level files every repository of ours has beside its model folders.
OWN_FILES = (MANIFEST, "README.md")


def foreign_entries(output: Path) -> List[str]:
    """What the user put into our repository `output`: paths this tool did not write.

    A Triton repository often serves other models too, and people keep notes beside them. A path is ours
    when it is the manifest, the README, or a file the manifest lists under one of its model folders;
    a whole top-level entry outside our model folders is listed once, by its name.

    Returns:
        Relative paths (POSIX), sorted: top-level entries, and files inside our model folders.
    """
    output = Path(output)
    try:
        manifest = json.loads((output / MANIFEST).read_text(encoding="utf-8"))
        models = set(manifest["contract"]["models"])
        ours = set(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # nothing of ours to tell apart (check_output refuses such a folder before this)
    found = []
    for entry in sorted(output.iterdir()):
        if entry.name in OWN_FILES:
            continue
        if entry.name not in models or not entry.is_dir() or entry.is_symlink():
            found.append(entry.name)
            continue
        for folder, dirs, files in os.walk(entry):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                relative = (Path(folder) / name).relative_to(output).as_posix()
                if relative not in ours:
                    found.append(relative)
    return sorted(found)


def _link_or_copy(source: str, target: str) -> None:
    # A hard link costs nothing for a large model of the user's; the old tree is removed after the swap.
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def carry_over(output: Path, staging: Path) -> List[str]:
    """Copies every entry of `output` this tool did not write into `staging`, before the swap.

    Raises:
        BuilderError: An entry of the user's has the path of one the new build writes (nothing copied).

    Returns:
        The relative paths carried over.
    """
    entries = foreign_entries(output) if output.is_dir() else []
    clashes = [e for e in entries if os.path.lexists(staging / e)]
    if clashes:
        raise BuilderError(f"output: {output} holds {', '.join(clashes)}, which this tool did not write and the "
                           "new build would replace; move or rename them, then build again")
    for entry in entries:
        source, target = output / entry, staging / entry
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(source), str(target))
    if entries:
        log.info("kept %d entr%s of yours in %s: %s", len(entries), "y" if len(entries) == 1 else "ies",
                 output, ", ".join(entries))
    return entries


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(output: Path) -> List[Path]:
    """Removes staging and old folders beside `output` whose builder process is gone.

    Returns:
        The folders removed.
    """
    pattern = re.compile(rf"^\.{re.escape(output.name)}\.(staging|old)-(\d+)-")
    removed = []
    if not output.parent.is_dir():
        return removed
    for entry in output.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        log.info("removed %d folder(s) left by killed builds: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextmanager
def staging_dir(output: Path) -> Iterator[Path]:
    """A fresh folder beside `output`, with the mode `output` has (or would get); removed on failure.

    Raises:
        BuilderError: The folder cannot be created there (missing, read-only or special filesystem).
    """
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-{os.getpid()}-", dir=output.parent))
        # mkdtemp makes 0700 folders; the repository keeps the mode it had (a server may run as another user).
        os.chmod(staging, output.stat().st_mode & 0o7777 if output.is_dir() else _default_mode())
    except OSError as exc:
        raise BuilderError(f"output: cannot write beside {output} ({exc.strerror or exc}); pass an --output "
                           "in a folder you can write") from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(staging: Path, output: Path) -> None:
    """Puts `staging` at `output` with no moment where `output` is missing, then removes the old tree."""
    if not output.exists():
        os.rename(staging, output)
        return
    if _exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)  # it now holds the old tree
        return
    # No atomic exchange here: two renames, with a short gap.
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{os.getpid()}-", dir=output.parent))
    os.rename(output, old / "tree")
    os.rename(staging, output)
    shutil.rmtree(old, ignore_errors=True)
