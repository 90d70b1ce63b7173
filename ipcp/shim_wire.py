"""The shims' management messages on the wire, as Ouroboros 0.23 sends them (udp4, eth-dix, eth-llc),
plus our extension messages, which use codes 0.23 does not know and go only to peers known to be ours.

Each layer's fixed header is declared once, field by field in wire order (INTEROP-0.23.md §2);
`Mgmt` is that header decoded, whatever the layer, with the bytes after it as `body`.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import struct
from collections.abc import Mapping

from proto import messages as m
from proto.qos import QosSpec


class ShimWireError(ValueError):
    """A management message that does not parse, or a value that does not fit its field."""


class Kind(enum.Enum):
    """What a management message is for; each layer maps kinds to its own codes."""

    FLOW_REQ = "flow request"
    FLOW_REPLY = "flow reply"
    NAME_QUERY = "name query"
    NAME_REPLY = "name reply"
    # Ours only (never sent to a peer not known to be ours):
    HELLO = "hello"  # body: our cookie for the receiver, the echo of its cookie for us, padding
    MEMBERS = "members"  # body: member addresses; s_eid = offset of this page, d_eid = members in all
    NAME_GONE = "name gone"  # body: the hash
    DEALLOC = "dealloc"  # s_eid = the sender's eid, d_eid = the receiver's
    KEEPALIVE = "keepalive"  # response = KEEPALIVE_ASK when the sender wants one back


# Ours: codes Ouroboros 0.23 has no use for; a 0.23 IPCP logs and drops them.
EXTENSIONS = {Kind.HELLO: 0xB1, Kind.MEMBERS: 0xB2, Kind.NAME_GONE: 0xB5, Kind.DEALLOC: 0xB6, Kind.KEEPALIVE: 0xB7}
KEEPALIVE_ASK = 1
WANT_MEMBERS = 1  # HELLO response flag: send me a page of members from offset d_eid

# Offers in fields a 0.23 peer leaves zero and ignores (docs/interop.md): a FLOW_REQ's `response`
# carries EXT_MAGIC | cypher_s and, on udp, its `d_eid` the requester's own data port; a FLOW_REPLY
# to an offer carries EXT_MAGIC in `delay` and, on udp, the responder's data port in `loss`.
EXT_MAGIC = 0x4F370000  # "O7"
EXT_MASK = 0xFFFF0000
COOKIE = struct.Struct("!Q")
NO_COOKIE = 0

# Ouroboros errnos in FLOW_REPLY `response` (include/ouroboros/errno.h, Linux errno.h), ours by name.
ERRNO = {
    m.ENOENT: -1007,
    m.EPERM: -1,
    m.ETIMEDOUT: -110,
    m.EPROTO: -71,
    m.ENOTSUP: -95,
    "EAUTH": -1009,
    "ECRYPT": -1008,
    "EBUSY": -16,
}
ERRNAME = {v: k for k, v in ERRNO.items()} | {-2: m.ENOENT, -111: m.EPERM}


def response_code(response: int) -> str:
    """Our error name for a refusal's `response`."""
    return ERRNAME.get(response, m.EIPCP)


@dataclasses.dataclass(frozen=True)
class Mgmt:
    """A management message: Ouroboros's mgmt_msg fields (zero when unused) and what follows them."""

    code: int
    s_eid: int = 0
    d_eid: int = 0
    response: int = 0
    bandwidth: int = 0
    delay: int = 0
    loss: int = 0
    ber: int = 0
    max_gap: int = 0
    timeout: int = 0
    availability: int = 0
    in_order: int = 0
    body: bytes = b""

    def qos(self) -> QosSpec:
        """The QoS a FLOW_REQ asks for (cypher_s rides in our offer, see `offer_of`)."""
        return QosSpec(
            self.delay,
            self.bandwidth,
            self.availability,
            self.loss,
            self.ber,
            self.in_order,
            self.max_gap,
            self.timeout,
        )


def qos_fields(qos: QosSpec) -> dict[str, int]:
    """The QoS fields of a FLOW_REQ; values beyond a field's width are capped, as 'as much as can be'."""
    return {
        "delay": min(qos.delay, 0xFFFFFFFF),
        "bandwidth": qos.bandwidth,
        "availability": min(qos.availability, 255),
        "loss": min(qos.loss, 0xFFFFFFFF),
        "ber": min(qos.ber, 0xFFFFFFFF),
        "in_order": min(qos.in_order, 255),
        "max_gap": min(qos.max_gap, 0xFFFFFFFF),
        "timeout": min(qos.timeout, 0xFFFFFFFF),
    }


@dataclasses.dataclass(frozen=True)
class Offer:
    """What a node of ours offers in a FLOW_REQ (or accepts in a FLOW_REPLY)."""

    cypher_s: int = 0
    port: int = 0  # a data port of its own for this flow (udp), 0: none


def offer_fields(offer: Offer, reply: bool) -> dict[str, int]:
    if reply:
        return {"delay": EXT_MAGIC, "loss": offer.port}
    return {"response": EXT_MAGIC | min(offer.cypher_s, 0xFFFF), "d_eid": offer.port}


def offer_of(msg: Mgmt, reply: bool) -> Offer | None:
    """The offer a FLOW_REQ or FLOW_REPLY carries; None for a plain 0.23 message."""
    word = msg.delay if reply else msg.response
    if word & EXT_MASK != EXT_MAGIC:
        return None
    port = msg.loss if reply else msg.d_eid
    return Offer(0 if reply else word & 0xFFFF, port if 0 < port <= 0xFFFF else 0)


class Layout:
    """One layer's management header, declared once as (field, struct code) in wire order."""

    def __init__(
        self,
        name: str,
        fields: tuple[tuple[str, str], ...],
        codes: Mapping[Kind, int],
        reply_swapped: bool,
        eids: tuple[int, int],
        max_size: int,
    ) -> None:
        self.name = name
        self.fields = tuple(f for f, _ in fields)
        self.struct = struct.Struct("!" + "".join(c for _, c in fields))
        self.size = self.struct.size
        self.codes = {**codes, **EXTENSIONS}
        self.kinds = {c: k for k, c in self.codes.items()}
        self.reply_swapped = reply_swapped  # eth: a FLOW_REPLY's s_eid is the responder's, udp: the requester's
        self.eids = eids  # the endpoint ids this layer hands out, both ends included
        self.max_size = max_size  # the longest management message a 0.23 peer takes

    def limited(self, max_size: int) -> Layout:
        """This layout, for a link that carries management messages of at most `max_size` bytes."""
        out = copy.copy(self)
        out.max_size = min(self.max_size, max_size)
        return out

    def encode(self, kind: Kind, body: bytes = b"", /, **fields: int) -> bytes:
        values = {"code": self.codes[kind], **fields}
        if unknown := set(values) - set(self.fields):
            raise ShimWireError(f"{self.name} management headers have no {sorted(unknown)}")
        if self.size + len(body) > self.max_size:
            raise ShimWireError(
                f"{kind.value} of {self.size + len(body)} bytes: {self.name} management"
                f" messages take at most {self.max_size}"
            )
        try:
            return self.struct.pack(*(values.get(f, 0) for f in self.fields)) + body
        except struct.error as e:
            raise ShimWireError(f"{kind.value}: a value does not fit the {self.name} header: {e}") from None

    def decode(self, data: bytes) -> tuple[Kind, Mgmt]:
        if len(data) < self.size:
            raise ShimWireError(f"management message of {len(data)} bytes: a {self.name} header is {self.size}")
        values = dict(zip(self.fields, self.struct.unpack_from(data), strict=True))
        kind = self.kinds.get(values["code"])
        if kind is None:
            raise ShimWireError(f"unknown management code {values['code']}")
        return kind, Mgmt(**values, body=bytes(data[self.size :]))

    def reply_eids(self, msg: Mgmt) -> tuple[int, int]:
        """(requester's eid, responder's eid) of a FLOW_REPLY."""
        return (msg.d_eid, msg.s_eid) if self.reply_swapped else (msg.s_eid, msg.d_eid)

    def reply_fields(self, req_eid: int, resp_eid: int) -> dict[str, int]:
        if self.reply_swapped:
            return {"s_eid": resp_eid, "d_eid": req_eid}
        return {"s_eid": req_eid, "d_eid": resp_eid}


_QOS_UDP = (("bandwidth", "Q"), ("delay", "I"), ("loss", "I"), ("ber", "I"), ("max_gap", "I"), ("timeout", "I"))
_QOS_ETH = (("loss", "I"), ("bandwidth", "Q"), ("ber", "I"), ("max_gap", "I"), ("delay", "I"), ("timeout", "I"))

# udp4/udp6 (src/ipcpd/udp/udp.c): 47 bytes with the eid, which the data path takes off first.
# 0.23 resolves udp names through DNS or /etc/hosts; the name query and reply are ours.
UDP = Layout(
    "udp",
    (
        ("s_eid", "I"),
        ("d_eid", "I"),
        ("response", "i"),
        *_QOS_UDP,
        ("code", "B"),
        ("availability", "B"),
        ("in_order", "B"),
    ),
    {Kind.FLOW_REQ: 1, Kind.FLOW_REPLY: 2, Kind.NAME_QUERY: 0xB3, Kind.NAME_REPLY: 0xB4},
    reply_swapped=False,
    eids=(1, 0xFFFFFFFF),
    max_size=2048 - 4,
)  # MGMT_FRAME_BUF_SIZE, eid included
ETH_CODES = {Kind.FLOW_REQ: 0, Kind.FLOW_REPLY: 1, Kind.NAME_QUERY: 2, Kind.NAME_REPLY: 3}
# eth-dix (src/ipcpd/eth/eth.c, BUILD_ETH_DIX): 39 bytes.
ETH_DIX = Layout(
    "eth-dix",
    (
        ("s_eid", "H"),
        ("d_eid", "H"),
        *_QOS_ETH,
        ("response", "i"),
        ("in_order", "B"),
        ("code", "B"),
        ("availability", "B"),
    ),
    ETH_CODES,
    reply_swapped=True,
    eids=(1, 0xFFFF),
    max_size=9000,
)  # IPCP_ETH_MGMT_FRAME_SIZE
# eth-llc (BUILD_ETH_LLC): 37 bytes; the eids are the LLC SAPs, 2 to 63 (SAP 1 is management).
ETH_LLC = Layout(
    "eth-llc",
    (
        ("s_eid", "B"),
        ("d_eid", "B"),
        ("code", "B"),
        ("availability", "B"),
        *_QOS_ETH,
        ("response", "i"),
        ("in_order", "B"),
    ),
    ETH_CODES,
    reply_swapped=True,
    eids=(2, 63),
    max_size=9000,
)
