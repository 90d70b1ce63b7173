"""Fuzzed IBP: request, reply, ST_CHANGE and ST_INQ lines and capabilities bent at the byte level,
then whole connections of bent requests (with real keys, and the bytes a STORE sends after its line)
against a depot. Parsers raise only BadRequest (BadCapability for capabilities); the depot answers
each request with a status line, never through its catch-all, and its books still balance.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from fuzzing import ROUNDS, cases, only_raises

from apps.ibp import wire as w
from apps.ibp.capability import BadCapability, Capability
from apps.ibp.depot import DepotCore, Limits
from apps.ibp.exnode import BadExnode, ExNode, Mapping, from_xml, to_xml
from apps.ibp.server import DepotServer
from apps.ibp.storage import DiskStore
from apps.ibp.stream import ByteStream

NOW = 1_000_000.0


class Feed(ByteStream):
    """A connection whose client sends `data`, then closes; the replies are collected."""

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data, self.sent = data, bytearray()

    def _recv(self, timeout: float | None) -> bytes:
        out, self.data = self.data[:4096], self.data[4096:]
        return out

    def _send(self, data: bytes | memoryview, timeout: float) -> None:
        self.sent += data

    def close(self) -> None:
        pass


def _lines(keys: list[str]) -> list[bytes]:
    k, r, wr, m = keys
    return [
        w.format_request(req)
        for req in (
            w.Allocate("0", w.IBP_SOFT, w.IBP_BYTEARRAY, 3600, 1000, 30),
            w.Store(k, wr, 10, 30),
            w.Write(k, wr, 0, 10, 30),
            w.Load(k, r, 0, 10, 30),
            w.Manage(k, m, w.IBP_PROBE, 0, 30),
            w.Manage(k, m, w.IBP_CHNG, 0, 30, 500, 60, w.IBP_SOFT),
            w.Manage(k, m, w.IBP_DECR, 0, 30),
            w.Send(k, r, f"ibp://d:6714/0#{k}/{wr}/WRITE", 0, 10, 30, 30, 30),
            w.Status("0", w.IBP_ST_INQ, "pw", 30),
            w.Status("0", w.IBP_ST_CHANGE, "pw", 30, 1000, 60),
        )
    ] + [b"1 4 0 9 30\n", b"2 2 0 30\n"]


def test_bent_lines_parse_or_raise_bad_request() -> None:
    keys = ["a" * 32, "b" * 32, "c" * 32, "d" * 32]
    corpus = [
        *_lines(keys),
        b"1 21\n",
        b"-3 no such allocation\n",
        b"1000 1000 60\n",
        b"VS:1.4:1.0 DT:1 RID:0 CT:100 RE x:1 \n",
    ]
    status = w.Status("0", w.IBP_ST_CHANGE, "pw", 30, follows=True)
    for data in cases(81, corpus, 4000):
        only_raises(w.parse_request, data, w.BadRequest)
        only_raises(w.parse_reply, data, w.BadRequest)
        only_raises(w.parse_change, data, w.BadRequest, status)
        only_raises(w.parse_inq, data, ())


def test_bent_capabilities_parse_or_raise_bad_capability() -> None:
    corpus = [
        str(Capability("depot.example:6714", "0", "k" * 32, "r" * 32, "READ")).encode(),
        b"ibp://[::1]:6714/0#k/r/WRITE",
        b"ibp://flow-name/0#k/r/MANAGE",
    ]
    for data in cases(82, corpus, 4000):
        text = data.decode("utf-8", "surrogateescape")
        only_raises(Capability.parse, text, BadCapability)


@pytest.fixture
def depot(tmp_path: Path) -> DepotServer:
    core = DepotCore(DiskStore(tmp_path), 1 << 20, 86400, NOW, Limits(client_share=1.0))
    return DepotServer(core, "d", clock=lambda: NOW)


def test_connections_of_bent_requests_are_answered_and_the_books_balance(
    depot: DepotServer, caplog: pytest.LogCaptureFixture
) -> None:
    grant = depot.core.allocate(w.Allocate("0", w.IBP_SOFT, w.IBP_BYTEARRAY, 3600, 1000, 30), NOW)
    keys = [grant.key, grant.read_key, grant.write_key, grant.manage_key]
    corpus = _lines(keys)
    rng = random.Random(83)
    with caplog.at_level(logging.ERROR, logger="apps.ibp"):
        for line in cases(84, corpus, 600):
            tail = rng.choice((b"", b"0123456789", rng.randbytes(rng.randint(0, 40)), b"1000 1000 60\n"))
            extra = b"".join(rng.choice(corpus) for _ in range(rng.randint(0, 3)))
            stream = Feed(line + tail + extra)
            depot.serve(stream, "d")
            assert stream.sent or b"\n" not in stream.data + line + tail + extra, line  # a whole line is answered
            if stream.sent:  # a status first (a LOAD's data and ST_INQ's tags follow it)
                w.parse_reply(bytes(stream.sent).split(b"\n", 1)[0])
        assert not [r for r in caplog.records if "internal error" in r.getMessage()], caplog.text
    c = depot.core
    assert c.reserved <= c.capacity
    assert c.reserved == sum(a.max_size for a in c.allocs.values())
    assert ROUNDS >= 1


def test_bent_exnodes_parse_or_raise_bad_exnode() -> None:
    cap = "ibp://d:6714/0#" + "k" * 32 + "/" + "r" * 32 + "/{}"
    ex = ExNode(
        "f.bin",
        200,
        "ab" * 32,
        [
            Mapping(0, 100, 0, 100, cap.format("READ"), cap.format("WRITE"), cap.format("MANAGE"), "cd" * 32, 5),
            Mapping(100, 100, 0, 100, cap.format("READ")),
        ],
    )
    corpus = [to_xml(ex), b'<?xml version="1.0" encoding="utf-32"?><exnode/>']
    for data in cases(85, corpus, 2000):
        got = only_raises(from_xml, data, BadExnode)
        if got is not None:  # what a download plans from it: a gap is a BadExnode too
            got.gaps()
            only_raises(ExNode.pieces, got, BadExnode)


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-32"])
def test_an_exnode_cannot_hide_its_dtd_in_another_encoding(codec: str) -> None:
    doc = (
        f'<?xml version="1.0" encoding="{codec}"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">]>'
        '<exnode><metadata name="filename">&a;</metadata></exnode>'
    )
    with pytest.raises(BadExnode):
        from_xml(doc.encode(codec))
