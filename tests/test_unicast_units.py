"""The unicast IPCP's sans-IO parts: PDU header, management codec, link-state routing, directory.

Everything here is bytes, numbers and dataclasses in and out, with time passed
explicitly; no process, socket or sleep. Routing is exercised on hand-wired
sets of `Lsdb` instances that flood LSUs to each other as the IPCP would
(`receive` True means "news: flood it on"), the directory on hand-wired sets of
`Directory` instances whose messages are delivered by a tiny in-memory network.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib.qos import QosSpec, data
from ipcp.unicast import messages as um
from ipcp.unicast.dir import CACHE_TTL, LOOKUP_TIMEOUT, Directory, node_id
from ipcp.unicast.pci import MGMT_EID, Pci, PciError, PciFormat
from ipcp.unicast.routing import LSU_REFRESH, LSU_TIMEOUT, Lsdb
from transports.wire import HEADER, MAGIC, VERSION, Message, WireError

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES = [1, 2, 4, 8]

# -- PCI -------------------------------------------------------------------------


@pytest.mark.parametrize("addr_size", SIZES)
@pytest.mark.parametrize("eid_size", SIZES)
def test_pci_round_trips_extreme_values_for_every_field_size(addr_size: int, eid_size: int) -> None:
    fmt = PciFormat(addr_size, eid_size)
    assert fmt.size == addr_size + 3 + eid_size
    assert fmt.max_addr == 2 ** (8 * addr_size) - 1 and fmt.max_eid == 2 ** (8 * eid_size) - 1
    for pci in (Pci(0, 0, 0, 0, 0), Pci(fmt.max_addr, 255, 255, 255, fmt.max_eid), Pci(1, 2, 60, 1, MGMT_EID)):
        raw = fmt.pack(pci)
        assert len(raw) == fmt.size
        assert fmt.unpack(raw) == pci
        assert fmt.unpack(raw + b"payload") == pci  # the SDU follows the header
        assert fmt.unpack(memoryview(bytearray(raw))) == pci


def test_pci_default_layout_is_big_endian_dst_qos_ttl_ecn_eid() -> None:
    fmt = PciFormat()
    raw = fmt.pack(Pci(0x01020304, 5, 6, 7, 0x08090A0B0C0D0E0F))
    assert raw == bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])
    assert raw[fmt.ttl_offset] == 6 and raw[fmt.ecn_offset] == 7


@pytest.mark.parametrize("addr_size", SIZES)
@pytest.mark.parametrize("eid_size", SIZES)
def test_pci_truncated_pdus_raise_pci_error(addr_size: int, eid_size: int) -> None:
    fmt = PciFormat(addr_size, eid_size)
    raw = fmt.pack(Pci(1, 1, 1, 1, 1))
    for n in range(fmt.size):
        with pytest.raises(PciError, match="shorter than"):
            fmt.unpack(raw[:n])


@pytest.mark.parametrize("addr_size, eid_size", [(3, 8), (4, 0), (0, 4), (16, 8), (4, 5)])
def test_pci_rejects_unsupported_field_sizes(addr_size: int, eid_size: int) -> None:
    with pytest.raises(ValueError, match="sizes must be one of"):
        PciFormat(addr_size, eid_size)


@FUZZ
@given(st.sampled_from(SIZES), st.sampled_from(SIZES), st.binary(max_size=40))
def test_fuzz_pci_unpack_raises_only_pci_error(addr_size: int, eid_size: int, blob: bytes) -> None:
    fmt = PciFormat(addr_size, eid_size)
    try:
        pci = fmt.unpack(blob)
    except PciError:
        assert len(blob) < fmt.size
        return
    assert 0 <= pci.dst <= fmt.max_addr and 0 <= pci.eid <= fmt.max_eid
    assert fmt.pack(pci) == blob[: fmt.size]


@FUZZ
@given(st.sampled_from(SIZES), st.sampled_from(SIZES), st.data())
def test_fuzz_pci_pack_unpack_round_trip(addr_size: int, eid_size: int, d: st.DataObject) -> None:
    fmt = PciFormat(addr_size, eid_size)
    byte = st.integers(0, 255)
    pci = Pci(
        d.draw(st.integers(0, fmt.max_addr)),
        d.draw(byte),
        d.draw(byte),
        d.draw(byte),
        d.draw(st.integers(0, fmt.max_eid)),
    )
    assert fmt.unpack(fmt.pack(pci)) == pci


# -- management messages ------------------------------------------------------------

SAMPLES: list[Message] = [
    um.Hello(um.MGMT, "n1", "net", 7, b"\x01" * 16),
    um.Hello(um.ENROLL, "n2"),
    um.Proof(b"\xaa" * 32),
    um.EnrollInfo("net", {"addr": "4", "routing": "lfa"}, [1, 2, 3]),
    um.EnrollInfo("net", {}, [], um.E_AUTH, "prove the key", b"\x02" * 16),
    um.Lsu(5, 9, [1, 2, 3]),
    um.FaReq(1, 99, b"\x03" * 32, data),
    um.FaReply(2, 5, 99, um.OK),
    um.FaDealloc(2, 5, 99),
    um.FlowUpdate(2, 5, 40, 1.5e6),
    um.DhtStore(1, b"\x04" * 32, 1, 86400.0),
    um.DhtFind(1, b"\x04" * 32, 12345),
    um.DhtFound(2, b"\x04" * 32, 12345, [1, 3]),
    um.Echo(4),
]


def frame(code: int, body: bytes, version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, code, 0, len(body)) + body


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda msg: type(msg).__name__)
def test_every_management_message_round_trips(msg: Message) -> None:
    assert um.CODEC.decode(um.CODEC.encode(msg)).msg == msg


def test_every_registered_management_type_is_sampled() -> None:
    assert {type(msg) for msg in SAMPLES} >= set(um.CODEC.types.values()) - {um.CODEC.types[1]}


@pytest.mark.parametrize("body, match", [
    (b'{"src":1,"seqno":2}', "missing field 'neighbours'"),
    (b'{"src":1,"seqno":2,"neighbours":[],"x":1}', "unknown fields"),
    (b'{"src":"1","seqno":2,"neighbours":[]}', "expected int"),
    (b'{"src":true,"seqno":2,"neighbours":[]}', "expected int"),
    (b'{"src":1,"seqno":2,"neighbours":[1.5]}', "expected int"),
    (b'{"src":1,"seqno":2,"neighbours":{}}', "expected a list"),
    (b'[1,2]', "not an object"),
    (b'{"src":1,', "not JSON"),
    (b'\xff\xfe', "not JSON"),
])  # fmt: skip
def test_malformed_lsu_bodies_raise_wire_error_naming_the_problem(body: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        um.CODEC.decode(frame(um.Lsu.TYPE, body))


def test_bad_headers_raise_wire_error() -> None:
    good = um.CODEC.encode(um.Echo(1))
    for bad, match in [
        (good[:5], "truncated"),
        (b"XX" + good[2:], "magic"),
        (good + b" ", "body length"),
        (frame(um.Echo.TYPE, b'{"src":1}', version=9), "version"),
        (frame(9999, b"{}"), "unknown message type"),
    ]:
        with pytest.raises(WireError, match=match):
            um.CODEC.decode(bad)


def test_bad_hex_and_bad_qos_raise_wire_error() -> None:
    with pytest.raises(WireError, match="hex"):
        um.CODEC.decode(frame(um.Proof.TYPE, b'{"mac":"zz"}'))
    for qos in (b'{"delay":-1}', b'{"delay":1.5}', b'{"nope":1}', b"[]"):
        with pytest.raises(WireError):
            um.CODEC.decode(frame(um.FaReq.TYPE, b'{"src":1,"s_eid":1,"hash":"00","qos":' + qos + b"}"))


def test_integer_of_5000_digits_raises_wire_error() -> None:
    body = b'{"src":' + b"1" * 5000 + b',"seqno":1,"neighbours":[]}'
    with pytest.raises(WireError):
        um.CODEC.decode(frame(um.Lsu.TYPE, body))


def test_integer_beyond_float_range_in_a_float_field_raises_wire_error() -> None:
    body = b'{"src":1,"key":"00","addr":1,"ttl":' + b"9" * 400 + b"}"
    with pytest.raises(WireError):
        um.CODEC.decode(frame(um.DhtStore.TYPE, body))


# JSON values of every shape; integers bounded (the explicit tests above cover huge ones).
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def fields_of(cls: type) -> list[str]:
    return list(cls.__dataclass_fields__)  # type: ignore[attr-defined]


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """A valid header for a known type and a JSON object whose keys are mostly its fields."""
    cls = draw(st.sampled_from(list(um.CODEC.types.values())))
    names = [*fields_of(cls), "bogus"]
    body = draw(st.dictionaries(st.sampled_from(names), JSON | st.just("00ff"), max_size=len(names)))
    return frame(cls.TYPE, json.dumps(body).encode())


def decode_only_wire_error(blob: bytes) -> None:
    try:
        msg = um.CODEC.decode(blob).msg
    except WireError:
        return
    assert um.CODEC.decode(um.CODEC.encode(msg)).msg == msg  # what decodes, re-encodes to itself


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_codec_decode_arbitrary_bytes_raises_only_wire_error(blob: bytes) -> None:
    decode_only_wire_error(blob)


@FUZZ
@given(st.sampled_from(list(um.CODEC.types.values())).map(lambda cls: cls.TYPE), st.binary(max_size=200))
def test_fuzz_codec_decode_valid_header_arbitrary_body_raises_only_wire_error(code: int, body: bytes) -> None:
    decode_only_wire_error(frame(code, body))


@FUZZ
@given(plausible_frames())
def test_fuzz_codec_decode_plausible_json_raises_only_wire_error(blob: bytes) -> None:
    decode_only_wire_error(blob)


@FUZZ
@given(st.sampled_from(SAMPLES), st.data())
def test_fuzz_codec_decode_mutated_messages_raises_only_wire_error(msg: Message, d: st.DataObject) -> None:
    raw = bytearray(um.CODEC.encode(msg))
    for _ in range(d.draw(st.integers(1, 6))):
        op = d.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = d.draw(st.integers(0, len(raw)))
        if op == "flip" and at < len(raw):
            raw[at] ^= 1 << d.draw(st.integers(0, 7))
        elif op == "cut":
            del raw[at : at + d.draw(st.integers(1, 8))]
        else:
            raw[at:at] = d.draw(st.binary(min_size=1, max_size=8))
    decode_only_wire_error(bytes(raw))
    # and with the header's length fixed up, so the body parser sees the mutation
    if len(raw) >= HEADER.size:
        decode_only_wire_error(
            bytes(raw[: HEADER.size - 4]) + (len(raw) - HEADER.size).to_bytes(4, "big") + bytes(raw[HEADER.size :])
        )


# -- link-state routing -----------------------------------------------------------------


class Graph:
    """Lsdb instances wired by hand: set_neighbours floods, receive() == True floods on."""

    def __init__(self, nodes: Iterable[int], policy: str = "link_state") -> None:
        self.db = {n: Lsdb(n, policy) for n in nodes}
        self.links: dict[int, set[int]] = {n: set() for n in self.db}
        self.now = 0.0
        self.sent = 0

    def flood(self, origin: int, lsu: um.Lsu, exclude: int = 0) -> None:
        queue = deque((lsu, nb, origin) for nb in self.links[origin] if nb != exclude)
        while queue:
            msg, to, came_from = queue.popleft()
            self.sent += 1
            if self.db[to].receive(msg, self.now):
                queue.extend((msg, nb, to) for nb in self.links[to] if nb != came_from)

    def connect(self, edges: Iterable[tuple[int, int]]) -> None:
        for a, b in edges:
            self.links[a].add(b)
            self.links[b].add(a)
            for end in (a, b):
                # what _add_neighbour does on a new management flow: send the whole LSDB
                for lsu in self.db[end].all():
                    other = b if end == a else a
                    if self.db[other].receive(lsu, self.now):
                        self.flood(other, lsu, exclude=end)
            for end in (a, b):
                self.flood(end, self.db[end].set_neighbours(set(self.links[end]), self.now))

    def cut(self, node: int) -> None:
        """`node` dies: its neighbours see their flows go down."""
        neighbours = self.links.pop(node)
        del self.db[node]
        for nb in neighbours:
            self.links[nb].discard(node)
        for nb in neighbours:
            self.flood(nb, self.db[nb].set_neighbours(set(self.links[nb]), self.now))

    def run_until(self, t: float, step: float = 0.5) -> None:
        while self.now < t:
            self.now += step
            for n, db in self.db.items():
                due, _ = db.tick(self.now)
                if due is not None:
                    self.flood(n, due)


def line(n: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(1, n)]


def ring(n: int) -> list[tuple[int, int]]:
    return [*line(n), (n, 1)]


DIAMOND = [(1, 2), (1, 3), (2, 4), (3, 4)]


def test_lsdb_a_one_sided_claim_is_not_a_link() -> None:
    a = Lsdb(1)
    assert a.receive(um.Lsu(2, 1, [1, 3]), 0.0)
    assert a.graph() == {1: set(), 2: set()}  # 1 has not claimed 2; 3 is unknown
    assert a.table() == {}
    a.set_neighbours({2}, 0.0)
    assert a.graph() == {1: {2}, 2: {1}}
    assert a.table() == {2: [2]}
    assert a.receive(um.Lsu(3, 1, [4]), 0.0)  # 3 claims 4, 2 does not claim 3
    assert 3 not in a.table()


def test_lsdb_newer_seqno_wins_and_only_news_is_flooded() -> None:
    a = Lsdb(1)
    assert a.receive(um.Lsu(2, 5, [1]), 0.0) is True
    assert a.receive(um.Lsu(2, 5, [1]), 1.0) is False  # a duplicate: not flooded again
    assert a.receive(um.Lsu(2, 4, [1, 3]), 2.0) is False  # older: ignored
    assert a.db[2].neighbours == {1}
    assert a.receive(um.Lsu(2, 6, [1, 3]), 3.0) is True
    assert a.db[2].neighbours == {1, 3} and a.db[2].seqno == 6


def test_lsdb_our_own_lsu_is_never_news_and_an_older_incarnation_is_outnumbered() -> None:
    a = Lsdb(1)
    first = a.set_neighbours({2}, 0.0)
    assert first.src == 1 and first.neighbours == [2] and first.seqno == 1
    assert a.receive(um.Lsu(1, 40, [7, 8]), 1.0) is False  # from a previous life of address 1
    assert a.db[1].neighbours == {2}
    assert a.set_neighbours({2, 3}, 2.0).seqno > 40


def test_lsdb_entries_expire_unless_refreshed() -> None:
    a = Lsdb(1)
    a.set_neighbours({2}, 0.0)
    a.receive(um.Lsu(2, 1, [1]), 0.0)
    a.receive(um.Lsu(3, 1, [2]), 0.0)
    assert a.tick(LSU_TIMEOUT / 2)[1] is False
    a.receive(um.Lsu(2, 1, [1]), LSU_TIMEOUT / 2)  # a refresh of 2 (same seqno) keeps it
    _, expired = a.tick(LSU_TIMEOUT + 1)
    assert expired and a.members == {1, 2}
    assert a.tick(LSU_TIMEOUT + 1.5)[1] is False  # nothing more to expire
    assert a.tick(LSU_TIMEOUT * 3)[1] and a.members == {1}  # we never expire ourselves
    assert a.table() == {}


def test_lsdb_lsus_carry_member_names_for_automatic_connects() -> None:
    a = Lsdb(1, name="n1")
    assert a.set_neighbours({2}, 0.0).name == "n1" and a.own().name == "n1"
    a.receive(um.Lsu(2, 1, [1], "n2"), 0.0)
    assert a.names() == {1: "n1", 2: "n2"}
    assert {lsu.src: lsu.name for lsu in a.all()} == {1: "n1", 2: "n2"}


def test_lsdb_a_member_back_at_a_new_address_replaces_its_old_incarnation() -> None:
    a = Lsdb(1, name="n1")
    a.set_neighbours({2}, 0.0)
    a.receive(um.Lsu(2, 1, [1, 3], "n2"), 0.0)
    a.receive(um.Lsu(3, 1, [2], "n3"), 0.0)
    assert a.receive(um.Lsu(9, 1, [2], "n3"), 1.0)  # n3 rebooted and enrolled again as 9
    assert a.members == {1, 2, 9} and a.names()[9] == "n3"
    assert a.receive(um.Lsu(4, 1, [2]), 1.0) and 9 in a.members  # unnamed LSUs replace nothing


def test_lsdb_an_old_incarnations_lsu_still_going_round_does_not_undo_the_new_one() -> None:
    a = Lsdb(1, name="n1")
    a.receive(um.Lsu(3, 1, [2], "n3", since=100.0), 0.0)
    assert a.receive(um.Lsu(9, 1, [2], "n3", since=200.0), 1.0)  # rebooted at 200, now at address 9
    assert not a.receive(um.Lsu(3, 7, [2], "n3", since=100.0), 2.0)  # re-flooded by a slower member
    assert 9 in a.members and 3 not in a.members
    b = Lsdb(5, name="n5")  # heard of the new one first, then of the old: keeps the new one
    b.receive(um.Lsu(9, 1, [2], "n3", since=200.0), 0.0)
    assert not b.receive(um.Lsu(3, 1, [2], "n3", since=100.0), 1.0)
    assert b.names() == {5: "n5", 9: "n3"}
    assert not b.receive(um.Lsu(4, 1, [2], "n5", since=-1.0), 1.0)  # nor an old incarnation of itself


def test_lsdb_refresh_is_due_every_lsu_refresh_seconds() -> None:
    a = Lsdb(1)
    a.set_neighbours({2}, 0.0)
    assert a.tick(LSU_REFRESH - 1)[0] is None
    due, _ = a.tick(LSU_REFRESH)
    assert due is not None and due.src == 1 and due.neighbours == [2]
    assert a.tick(LSU_REFRESH + 1)[0] is None


def test_routing_line_single_next_hop_everywhere() -> None:
    g = Graph(range(1, 6))
    g.connect(line(5))
    assert g.db[1].table() == {2: [2], 3: [2], 4: [2], 5: [2]}
    assert g.db[3].table() == {1: [2], 2: [2], 4: [4], 5: [4]}
    assert g.db[5].table() == {1: [4], 2: [4], 3: [4], 4: [4]}
    for n, db in g.db.items():
        assert db.members == set(range(1, 6)), n


def test_routing_ring_link_state_takes_the_shorter_way_round() -> None:
    g = Graph(range(1, 7))
    g.connect(ring(6))
    t = g.db[1].table()
    assert t[2] == [2] and t[3] == [2] and t[5] == [6] and t[6] == [6]
    assert t[4] in ([2], [6])  # opposite: two equal ways, link_state keeps one
    assert all(len(hops) == 1 for hops in t.values())


def test_routing_diamond_link_state_keeps_one_of_two_equal_next_hops() -> None:
    g = Graph(range(1, 5))
    g.connect(DIAMOND)
    t = g.db[1].table()
    assert t == {2: [2], 3: [3], 4: [2]}  # sorted: the lowest address of the two


def test_routing_diamond_ecmp_keeps_both_equal_next_hops() -> None:
    g = Graph(range(1, 5), "ecmp")
    g.connect(DIAMOND)
    assert g.db[1].table() == {2: [2], 3: [3], 4: [2, 3]}
    assert g.db[4].table() == {1: [2, 3], 2: [2], 3: [3]}
    assert g.db[2].table() == {1: [1], 3: [1, 4], 4: [4]}


def test_routing_ring_ecmp_only_splits_over_equal_costs() -> None:
    g = Graph(range(1, 7), "ecmp")
    g.connect(ring(6))
    assert g.db[1].table() == {2: [2], 3: [2], 4: [2, 6], 5: [6], 6: [6]}


def test_routing_diamond_lfa_adds_the_loop_free_alternate() -> None:
    g = Graph(range(1, 5), "lfa")
    g.connect(DIAMOND)
    assert g.db[1].table() == {2: [2], 3: [3], 4: [2, 3]}


def test_routing_ring_lfa_adds_only_alternates_that_cannot_loop_back() -> None:
    g = Graph(range(1, 6), "lfa")
    g.connect(ring(5))  # 1-2-3-4-5-1
    t = g.db[1].table()
    # to 3: primary 2; 5 reaches 3 over 4 (2 hops) < 5->1->3 (3 hops): loop-free
    assert t[3] == [2, 5]
    # to 2: 5's shortest path to 2 runs back through 1: not an alternate
    assert t[2] == [2]
    assert t[4] == [5, 2] and t[5] == [5]


def test_routing_reroutes_around_a_dead_member() -> None:
    g = Graph(range(1, 5))
    g.connect(ring(4))
    via = g.db[1].table()[3][0]
    other = ({2, 4} - {via}).pop()
    g.cut(via)
    assert g.db[1].table() == {3: [other], other: [other]}
    assert g.db[3].table() == {1: [other], other: [other]}
    assert via in g.db[1].members  # its stale LSU lingers until it expires...
    g.run_until(LSU_TIMEOUT + 2)
    assert via not in g.db[1].members  # ...then it is forgotten


def test_routing_flooding_stops_once_everyone_knows() -> None:
    g = Graph(range(1, 11))
    g.connect([*ring(10), (1, 6), (3, 8)])
    before = g.sent
    g.flood(4, g.db[4].set_neighbours(g.links[4], g.now))
    # each of the 12 links carries the news at most once in each direction
    assert g.sent - before <= 2 * 12
    assert all(db.db[4].seqno == g.db[4].seqno for db in g.db.values())


def test_routing_stays_converged_over_many_refresh_periods() -> None:
    g = Graph(range(1, 6))
    g.connect(line(5))
    g.run_until(LSU_TIMEOUT * 3)
    assert g.db[1].table() == {2: [2], 3: [2], 4: [2], 5: [2]}
    assert g.db[1].members == set(range(1, 6))


def test_routing_refresh_outnumbers_an_older_incarnation() -> None:
    a = Lsdb(1)
    a.set_neighbours({2}, 0.0)
    a.receive(um.Lsu(1, 40, [7]), 1.0)
    due, _ = a.tick(LSU_REFRESH + 1)
    assert due is not None and due.seqno > 40


@FUZZ
@given(
    st.lists(
        st.builds(um.Lsu, st.integers(-3, 12), st.integers(-(2**64), 2**64), st.lists(st.integers(-3, 12), max_size=6)),
        max_size=30,
    ),
    st.sampled_from(["link_state", "lfa", "ecmp"]),
)
def test_fuzz_lsdb_takes_any_lsus_and_routes_only_over_known_two_way_links(lsus: list[um.Lsu], policy: str) -> None:
    a = Lsdb(1, policy)
    a.set_neighbours({2, 3}, 0.0)
    for t, lsu in enumerate(lsus):
        a.receive(lsu, float(t))
    graph = a.graph()
    for x, nbs in graph.items():
        for y in nbs:
            assert x in graph[y]
    for dst, hops in a.table().items():
        assert dst != 1 and hops and set(hops) <= graph[1] and dst in a.members


def test_lsdb_rejects_an_unknown_policy() -> None:
    with pytest.raises(ValueError, match="unknown routing policy 'ospf'"):
        Lsdb(1, "ospf")


# -- directory ---------------------------------------------------------------------------


class Dht:
    """Directory instances wired by hand; out-messages are delivered until quiet."""

    def __init__(self, addrs: Iterable[int], **kw: float) -> None:
        self.d = {a: Directory(a, **kw) for a in addrs}  # type: ignore[arg-type]
        self.now = 0.0
        self.log: list[tuple[int, int, Message]] = []  # (from, to, msg)
        self.down: set[int] = set()
        for a in self.d:
            self.d[a].set_members(self.d, self.now)

    def deliver(self, src: int, out: list[tuple[int, Message]]) -> None:
        queue = deque((src, dst, msg) for dst, msg in out)
        while queue:
            frm, to, msg = queue.popleft()
            self.log.append((frm, to, msg))
            if to in self.down or to not in self.d:
                continue
            # through the wire, as the IPCP does
            msg = um.CODEC.decode(um.CODEC.encode(msg)).msg
            queue.extend((to, dst, reply) for dst, reply in self.d[to].receive(msg, self.now))

    def register(self, addr: int, key: bytes, on: bool = True) -> None:
        self.deliver(addr, self.d[addr].register(key, on, self.now))

    def lookup(self, addr: int, key: bytes) -> list[int] | None:
        d = self.d[addr]
        found = d.local(key, self.now)
        if found is not None:
            return found
        d.resolved.clear()
        _, out = d.lookup(key, self.now)
        self.deliver(addr, out)
        results = [addrs for k, addrs in d.resolved if k == key]
        return results[0] if results else None

    def holders(self, key: bytes) -> set[int]:
        return {a for a, d in self.d.items() if key in d.store}

    def tick(self, t: float) -> None:
        self.now = t
        for a, d in self.d.items():
            if a not in self.down:
                self.deliver(a, d.tick(t))


ADDRS = [3, 17, 99, 1000, 4242, 65536, 70000, 123456, 0xDEADBEEF, 7, 8, 9]
KEY = hashlib.sha3_256(b"pong").digest()


def xor_closest(addrs: Iterable[int], key: bytes, k: int) -> list[int]:
    target = int.from_bytes(hashlib.sha3_256(key).digest(), "big")
    return sorted(addrs, key=lambda a: int.from_bytes(hashlib.sha3_256(a.to_bytes(8, "big")).digest(), "big") ^ target)[
        :k
    ]


def test_dir_node_ids_are_distinct_and_stable() -> None:
    ids = [node_id(a) for a in ADDRS]
    assert len(set(ids)) == len(ids) and ids == [node_id(a) for a in ADDRS]


def test_dir_register_publishes_to_the_k_xor_closest_members() -> None:
    dht = Dht(ADDRS)
    out = dht.d[3].register(KEY, True, 0.0)
    assert all(isinstance(msg, um.DhtStore) and msg.addr == 3 and msg.ttl > 0 for _, msg in out)
    expected = xor_closest(ADDRS, KEY, 8)
    assert [dst for dst, _ in out] == expected == dht.d[3].closest(KEY)
    dht.deliver(3, out)
    assert dht.holders(KEY) == set(expected)
    for a in expected:
        assert dht.d[a].local(KEY, 0.0) == [3]


def test_dir_fewer_members_than_k_all_hold_the_entry() -> None:
    dht = Dht(ADDRS[:4])
    dht.register(99, KEY)
    assert dht.holders(KEY) == set(ADDRS[:4])


def test_dir_lookup_from_a_non_holder_goes_through_find_and_found() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.d[asker].local(KEY, 0.0) is None
    assert dht.lookup(asker, KEY) == [3]
    kinds = [type(msg).__name__ for frm, _, msg in dht.log if frm == asker or _ == asker]
    assert "DhtFind" in kinds and "DhtFound" in kinds
    assert dht.d[asker].local(KEY, 0.0) == [3]  # cached now
    assert dht.d[asker].local(KEY, CACHE_TTL + 1) is None  # for a while


def test_dir_two_registrants_are_both_found() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    dht.register(17, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY) and a not in (3, 17))
    assert sorted(dht.lookup(asker, KEY) or []) == [3, 17]


def test_dir_lookup_of_an_unknown_key_resolves_empty() -> None:
    dht = Dht(ADDRS)
    assert dht.lookup(3, b"nobody") == []


def test_dir_lookup_asks_the_next_closest_when_the_first_ones_are_gone() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    holders = xor_closest(ADDRS, KEY, 8)
    asker = next(a for a in ADDRS if a not in holders)
    dht.down = set(holders[:2])  # two holders do not answer
    dht.d[asker].resolved.clear()
    _, out = dht.d[asker].lookup(KEY, 0.0)
    dht.deliver(asker, out)
    assert (KEY, [3]) in dht.d[asker].resolved


def test_dir_lookup_skips_members_without_a_route() -> None:
    dht = Dht(ADDRS)
    registrant = next(a for a in ADDRS if a not in xor_closest(ADDRS, KEY, 8))
    dht.register(registrant, KEY)
    holders = xor_closest(ADDRS, KEY, 8)
    asker = next(a for a in ADDRS if a not in holders and a != registrant)
    unroutable = set(holders[:3])
    dht.d[asker].reachable = lambda addr: addr not in unroutable
    _, out = dht.d[asker].lookup(KEY, 0.0)
    assert out and not {dst for dst, _ in out} & unroutable
    dht.deliver(asker, out)
    assert (KEY, [registrant]) in dht.d[asker].resolved
    nobody = Directory(asker)
    nobody.set_members(ADDRS, 0.0)
    nobody.reachable = lambda addr: False
    _, out = nobody.lookup(KEY, 0.0)
    assert out == [] and nobody.resolved == [(KEY, [])]  # resolved at once, not after a timeout


def test_dir_lookup_times_out_empty_when_nobody_answers() -> None:
    dht = Dht(ADDRS[:3])
    dht.register(3, KEY)
    dht.down = {17, 99}
    d = dht.d[3]
    d.mine.clear()  # so 3 must ask
    d.store.clear()
    _, out = d.lookup(KEY, 0.0)
    dht.deliver(3, out)
    assert d.resolved == []
    dht.tick(LOOKUP_TIMEOUT + 0.1)
    assert d.resolved == [(KEY, [])]


def test_dir_found_with_an_unknown_cookie_is_ignored() -> None:
    d = Directory(1)
    d.set_members([1, 2], 0.0)
    assert d.receive(um.DhtFound(2, KEY, 42, [2]), 0.0) == []
    assert d.resolved == [] and d.local(KEY, 0.0) is None


def test_dir_unregister_withdraws_the_entry_everywhere() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    dht.register(17, KEY)
    dht.register(3, KEY, on=False)
    stores = [msg for frm, _, msg in dht.log if frm == 3 and isinstance(msg, um.DhtStore) and msg.ttl == 0]
    assert len(stores) == 8
    asker = next(a for a in ADDRS if a not in dht.holders(KEY) and a not in (3, 17))
    assert dht.lookup(asker, KEY) == [17]
    dht.register(17, KEY, on=False)
    assert dht.holders(KEY) == set()
    dht.now = CACHE_TTL + 1  # the asker cached [17] a moment ago
    assert dht.lookup(asker, KEY) == []
    assert KEY not in dht.d[3].mine


def test_dir_entries_expire_by_tick_unless_refreshed() -> None:
    dht = Dht(ADDRS, expire=100.0, refresh=1e9)
    dht.tick(0.0)  # the first tick publishes (nothing registered yet)
    registrant = next(a for a in ADDRS if a not in xor_closest(ADDRS, KEY, 8))  # so it is never asked
    dht.register(registrant, KEY)
    holders = dht.holders(KEY)
    assert len(holders) == 8
    dht.tick(99.0)
    assert dht.holders(KEY) == holders
    dht.tick(100.5)
    assert dht.holders(KEY) == set()
    assert all(not d._schedule for d in dht.d.values())  # the schedule is drained too
    asker = next(a for a in ADDRS if a != registrant)
    assert dht.lookup(asker, KEY) == []


def test_dir_registrations_are_refreshed_before_they_expire() -> None:
    dht = Dht(ADDRS, expire=100.0, refresh=40.0)
    dht.register(3, KEY)
    for t in range(0, 400, 10):
        dht.tick(float(t))
    assert len(dht.holders(KEY)) == 8
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.lookup(asker, KEY) == [3]


def test_dir_results_are_filtered_to_current_members() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    dht.register(17, KEY)
    gone = [a for a in ADDRS if a != 3]
    for a in gone:  # 3 left the layer: every member's LSDB lost it
        dht.d[a].set_members(gone, 0.0)
    for a in gone:
        assert dht.d[a].local(KEY, 0.0) in (None, [17]), a
    asker = next(a for a in gone if a not in dht.holders(KEY) and a != 17)
    assert dht.lookup(asker, KEY) == [17]


def test_dir_found_addresses_of_non_members_are_dropped_by_the_asker() -> None:
    d = Directory(1)
    d.set_members([1, 2, 3], 0.0)
    cookie, out = d.lookup(KEY, 0.0)
    assert {dst for dst, _ in out} == {2, 3}
    assert d.receive(um.DhtFound(2, KEY, cookie, [77]), 0.0) == []  # 77 is no member: keep asking
    assert d.resolved == []
    d.receive(um.DhtFound(3, KEY, cookie, [3, 88]), 0.0)
    assert d.resolved == [(KEY, [3])]


def test_dir_cached_results_are_filtered_to_current_members() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.lookup(asker, KEY) == [3]  # cached at the asker
    dht.d[asker].set_members([a for a in ADDRS if a != 3], 0.0)
    assert dht.d[asker].local(KEY, 1.0) in (None, [])


def test_dir_membership_change_republishes_to_the_new_closest() -> None:
    members = ADDRS[:9]
    dht = Dht(members)
    dht.register(3, KEY)
    before = dht.holders(KEY)
    newcomer = next(a for a in range(10_000, 20_000) if a in xor_closest([*members, a], KEY, 8))
    dht.d[newcomer] = Directory(newcomer)
    everyone = [*members, newcomer]
    for a in everyone:
        dht.deliver(a, dht.d[a].set_members(everyone, 0.0))
    assert newcomer in dht.holders(KEY)
    assert dht.holders(KEY) >= set(xor_closest(everyone, KEY, 8))
    assert before - dht.holders(KEY) <= set(before)  # old holders may keep a copy until it expires


def test_dir_a_nan_ttl_does_not_stop_other_entries_from_expiring() -> None:
    with pytest.raises(WireError, match="NaN"):  # the codec refuses it on the wire
        um.CODEC.decode(frame(um.DhtStore.TYPE, b'{"src":2,"key":"aa","addr":2,"ttl":NaN}'))
    d = Directory(1, expire=100.0)
    d.set_members([1, 2, 3], 0.0)
    nan_store = um.DhtStore(2, b"\xaa", 2, math.nan)  # and the directory, were one to get through
    d.receive(um.DhtStore(3, b"\xbb", 3, 5.0), 0.0)
    d.receive(nan_store, 0.0)
    d.receive(um.DhtStore(3, b"\xcc", 3, 1.0), 0.0)
    d.tick(10.0)
    assert b"\xbb" not in d.store and b"\xcc" not in d.store


DHT_MSGS = st.one_of(
    st.builds(um.DhtStore, st.integers(0, 20), st.binary(max_size=4), st.integers(-5, 20), st.floats(allow_nan=False)),
    st.builds(um.DhtFind, st.integers(0, 20), st.binary(max_size=4), st.integers(-5, 2**64)),
    st.builds(
        um.DhtFound,
        st.integers(0, 20),
        st.binary(max_size=4),
        st.integers(-5, 2**64),
        st.lists(st.integers(-5, 20), max_size=5),
    ),
    st.builds(um.Lsu, st.integers(0, 5), st.integers(0, 5), st.lists(st.integers(0, 5), max_size=3)),
)


@FUZZ
@given(st.lists(DHT_MSGS, max_size=25))
def test_fuzz_directory_takes_any_message_without_raising(msgs: list[Message]) -> None:
    d = Directory(1, expire=50.0, refresh=20.0)
    d.set_members(range(1, 12), 0.0)
    d.register(b"mine", True, 0.0)
    cookie, _ = d.lookup(KEY, 0.0)
    for t, msg in enumerate(msgs):
        if isinstance(msg, um.DhtFound) and t % 2:
            msg = um.DhtFound(msg.src, KEY, cookie, msg.addrs)
        for dst, reply in d.receive(msg, float(t)):
            assert isinstance(dst, int) and isinstance(reply, um.DhtStore | um.DhtFind | um.DhtFound)
        d.tick(float(t))
    d.tick(1e6)
    assert all(exp > 1e6 for entries in d.store.values() for exp in entries.values())
    for _, addrs in d.resolved:
        assert set(addrs) <= d.members


def test_qos_spec_survives_the_fa_req_codec() -> None:
    req = um.FaReq(1, 2, b"\x01" * 32, QosSpec(delay=5, loss=0, in_order=1))
    got = um.CODEC.decode(um.CODEC.encode(req)).msg
    assert isinstance(got, um.FaReq) and got.qos == req.qos and got.qos.reliable
