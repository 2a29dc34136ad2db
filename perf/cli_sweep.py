"""Subcommands sweep, report, compare and tune (registered by perf.__main__)."""

from __future__ import annotations


def add_commands(sub, ints, words) -> None:
    """Registers the server-facing subcommands."""
    return None
