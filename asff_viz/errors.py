"""Errors for input the library cannot use. Each message is one line that names the file and the problem, so that
the commands print it as it is, without a traceback."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, the problem and what to do."""


def summarize_keys(keys: list[str], limit: int = 6) -> str:
    """A short list of keys, grouped by their first three components: `head.levels.2.* (4)`; a group of one
    key shows the whole key."""
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(".".join(key.split(".")[:3]), []).append(key)
    parts = [f"{prefix}.* ({len(members)})" if len(members) > 1 else members[0]
             for prefix, members in list(groups.items())[:limit]]
    more = len(groups) - limit
    return ", ".join(parts) + (f", and {more} more groups" if more > 0 else "")
