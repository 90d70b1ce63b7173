"""A peer's words made safe to show or log: control characters (terminal escapes, line breaks) as
escapes, as OpenSSH shows a server's messages and writes its logs (strnvis)."""

from __future__ import annotations

import logging


def visible(text: str) -> str:
    """`text` with every character that is not printable (ESC, BEL, CR, LF, C1 controls, bidi
    overrides, bytes that were not UTF-8) written as a Python escape: one line that moves no cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


C_STYLE = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(c: str) -> str:
    if c in C_STYLE:
        return C_STYLE[c]
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        o -= 0xDC00
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


class VisibleFilter(logging.Filter):
    """On a handler: each record's message made visible, so that what a peer put in it (an ERROR's
    message, a command line) can neither start a log line of its own nor reach a terminal as escapes.
    A traceback, added by the formatter, keeps its lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        shown = visible(message)
        if shown is not message:
            record.msg, record.args = shown, None
        return True


def show_visible(logger: logging.Logger | None = None) -> None:
    """Have every handler of `logger` (the root's by default) write visible messages only."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(VisibleFilter())
