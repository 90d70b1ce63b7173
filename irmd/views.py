"""What lists and dumps show: rows paged so a reply never outgrows one control frame, long
cells cut short, texts cut in parts, and secrets (layer keys) never shown.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from proto import messages as m
from transports.wire import MAX_BODY

PAGE_BYTES = MAX_BODY * 3 // 4  # room left for the Table's own fields and JSON's escapes
TEXT_CHARS = MAX_BODY // 8  # a text part: even all-escaped characters (\\uXXXX: 6 bytes) fit a frame
CELL_CHARS = 2048  # a cell longer than this is cut short, saying how much is left out
SECRET_KEYS = frozenset({"key"})  # bootstrap options that are secrets: never listed or dumped
REDACTED = "(secret)"

Row = dict[str, str]


def _cut(cell: str) -> str:
    if len(cell) <= CELL_CHARS:
        return cell
    more = cell.count(",", CELL_CHARS)
    return cell[:CELL_CHARS].rsplit(",", 1)[0] + f",... ({more + 1} more)"


def _size(row: Row) -> int:
    return len(json.dumps(row)) + 1


def page(columns: list[str], rows: Iterable[tuple[int, Row]], start: int = 0, budget: int = PAGE_BYTES) -> m.Table:
    """The rows with key >= start (rows come in key order) that fit `budget` bytes, and the key to
    ask for next (0: that was all)."""
    out: list[Row] = []
    used = 0
    for key, row in rows:
        if key < start:
            continue
        row = {k: _cut(v) for k, v in row.items()}
        size = _size(row)
        if out and used + size > budget:
            return m.Table(columns, out, next=key)
        out.append(row)
        used += size
    return m.Table(columns, out)


def text_part(text: str, offset: int) -> m.Text:
    """The part of `text` from `offset` that fits a frame, and where the next part starts (0: done)."""
    end = offset + TEXT_CHARS
    return m.Text(text[offset:end], end if end < len(text) else 0)


def redact(conf: Mapping[str, str]) -> dict[str, str]:
    return {k: REDACTED if k in SECRET_KEYS else v for k, v in conf.items()}
