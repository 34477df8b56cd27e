"""Safe trimming: remove only entries that every consumer group has acknowledged.

For each group on the stream the oldest entry it still needs is the smaller of

* its oldest pending entry (delivered, not acknowledged: ``XPENDING`` summary), and
* the first entry after its ``last-delivered-id`` (never delivered yet);

``XTRIM MINID`` to the smallest of those over *all* groups removes only entries below
it. Groups only move forward, so a group advancing between our look and the trim makes
the trim more conservative, never less. With no group at all nothing is trimmed. What
this cannot protect: a group created later at an older id, or moved back with
``XGROUP SETID`` (README.rst, "Trimming").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from teltonika.processor.streams import GroupInfo, Streams, next_id, parse_id


def safe_min_id(
    groups: Sequence[GroupInfo], oldest_pending: Mapping[str, str | None]
) -> str | None:
    """The MINID that keeps every entry any group still needs (None: trim nothing)."""
    needed: list[str] = []
    for group in groups:
        needed.append(next_id(group.last_delivered_id))
        pending = oldest_pending.get(group.name)
        if pending is not None:
            needed.append(pending)
        elif group.pending:
            return None  # pending but unknown oldest: be safe
    if not needed:
        return None
    return min(needed, key=parse_id)


async def trim_stream(streams: Streams) -> tuple[str | None, int]:
    """Trim ``streams.stream`` safely; returns (MINID used or None, entries removed)."""
    groups = await streams.groups()
    oldest: dict[str, str | None] = {}
    for group in groups:
        oldest[group.name] = await streams.oldest_pending(group.name) if group.pending else None
    min_id = safe_min_id(groups, oldest)
    if min_id is None:
        return None, 0
    return min_id, await streams.trim_minid(min_id)
