"""Management messages of the unicast layer: enrollment, neighbour hellos, LSUs, flow
allocation and directory; dataclasses framed by the control-message codec.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from proto import messages as m
from proto.qos import QosSpec
from transports.wire import Codec, Message

CODEC = Codec()
reg = CODEC.register

ENROLL, MGMT, DT = "enroll", "mgmt", "dt"  # what an N-1 flow to a member is for
OK, E_NOENT, E_REFUSED, E_AUTH, E_CRYPT = 0, 1, 2, 3, 4
# A refusal's result and our error name for it, both ways (an OAP failure keeps its reason: EAUTH, ECRYPT).
RESULTS = {m.ENOENT: E_NOENT, m.EAUTH: E_AUTH, m.ECRYPT: E_CRYPT}
ERRORS = {result: code for code, result in RESULTS.items()}


ADDR_SPACE = 1 << 64  # the widest a layer's addresses are (8 bytes)


class Addressed(Message):
    """A message naming members by address (the fields in ADDRESSES): one that names a negative
    address or one wider than any layer's is refused at decoding, before any component hashes or
    packs it. The layer's own width is checked where its addresses are taken (Lsdb, Handshake)."""

    ADDRESSES: ClassVar[tuple[str, ...]] = ("src",)

    def __post_init__(self) -> None:
        for name in self.ADDRESSES:
            value = getattr(self, name)
            if not all(0 <= a < ADDR_SPACE for a in (value if isinstance(value, list) else (value,))):
                raise ValueError(f"{name}: not an address")


def signed_part(msg: Message) -> bytes:
    """What a member signs of a message it speaks for itself in: its encoding without the signature."""
    return CODEC.encode(dataclasses.replace(msg, sig=b""))  # type: ignore[type-var]


@reg
@dataclass
class Hello(Addressed):
    """First SDU on every N-1 flow: who is calling and for which component."""

    TYPE: ClassVar[int] = 100
    ADDRESSES: ClassVar[tuple[str, ...]] = ("addr",)
    component: str
    name: str
    layer: str = ""
    addr: int = 0
    nonce: bytes = b""  # this end's fresh nonce: what the other signs is of this handshake only
    eph: bytes = b""  # with a layer key: X25519 ephemeral for the key exchange (ipcp.unicast.auth)
    mac: bytes = b""  # the responder's confirmation of the exchange (its reply only)
    pub: bytes = b""  # the member key this end speaks with (the one its address is bound to)
    sig: bytes = b""  # the responder's signature of both hellos with it (its reply only)


@reg
@dataclass
class Proof(Message):
    """The initiator's confirmation of the key exchange (it knows the layer key) and of its member key."""

    TYPE: ClassVar[int] = 101
    mac: bytes
    sig: bytes = b""  # the initiator's signature of both hellos with its member key


@reg
@dataclass
class Refuse(Message):
    """Why the other end of a handshake will not go on (then it closes the flow)."""

    TYPE: ClassVar[int] = 104
    result: int
    error: str


@reg
@dataclass
class EnrollInfo(Addressed):
    """The enroller's answer: the layer's configuration (never its key) and who is in it."""

    TYPE: ClassVar[int] = 102
    ADDRESSES: ClassVar[tuple[str, ...]] = ("members",)
    layer: str
    conf: dict[str, str]
    members: list[int] = field(default_factory=list)
    result: int = OK
    error: str = ""
    name: str = ""  # the enroller's: whom the enrollee connects to first


@reg
@dataclass
class Lsu(Addressed):
    """A link-state update: `src` (IPCP `name`) has these neighbours (flooded over management flows)."""

    TYPE: ClassVar[int] = 103
    ADDRESSES: ClassVar[tuple[str, ...]] = ("src", "neighbours")
    src: int
    seqno: int
    neighbours: list[int]
    name: str = ""  # what the member is called in the layers below: automatic connects reach it by it
    since: float = 0.0  # when this incarnation started: of two addresses under one name, the later is the member
    key: bytes = b""  # the member's signing key (bound to its address and name on first sight) ...
    sig: bytes = b""  # ... and its signature of all the fields above


@reg
@dataclass
class FaReq(Addressed):
    TYPE: ClassVar[int] = 110
    ADDRESSES: ClassVar[tuple[str, ...]] = ("src", "dst")
    src: int
    s_eid: int
    hash: bytes
    qos: QosSpec
    data: bytes = b""  # the allocation's piggyback (the IRMd's OAP request), opaque
    dst: int = 0  # the member asked, signed with the rest: a copy taken to another member is refused there
    sig: bytes = b""  # the requester's (src's) signature: flow allocator messages are each member's own


@reg
@dataclass
class FaReply(Addressed):
    TYPE: ClassVar[int] = 111
    src: int
    s_eid: int  # the replier's eid
    d_eid: int  # the requester's eid
    result: int = OK
    data: bytes = b""  # the responder's piggyback
    sig: bytes = b""


@reg
@dataclass
class FaDealloc(Addressed):
    TYPE: ClassVar[int] = 112
    src: int
    s_eid: int
    d_eid: int
    sig: bytes = b""


@reg
@dataclass
class FlowUpdate(Addressed):
    """Congestion feedback from a flow's receiving end to its sender (`congestion mb-ecn`)."""

    TYPE: ClassVar[int] = 113
    src: int
    eid: int  # the sender's eid
    ece: int  # congestion level seen, 0 to 255 (0: none)
    rate: float  # bytes per second the receiver is getting
    sig: bytes = b""


@reg
@dataclass
class DhtStore(Addressed):
    """Keep (key -> addr) for ttl seconds; ttl 0 removes it. Signed by the member at `addr`, which
    must be `src`: a member speaks only for itself; holders replicate the signed store as it is."""

    TYPE: ClassVar[int] = 120
    ADDRESSES: ClassVar[tuple[str, ...]] = ("src", "addr")
    src: int
    key: bytes
    addr: int
    ttl: float
    seq: int = 0  # the registrant's counter: an older store (a replay) never undoes a newer one
    pub: bytes = b""
    sig: bytes = b""


@reg
@dataclass
class DhtFind(Addressed):
    TYPE: ClassVar[int] = 121
    ADDRESSES: ClassVar[tuple[str, ...]] = ("src", "dst")
    src: int
    key: bytes
    cookie: int
    dst: int = 0  # the member asked: a copy sent to others would have each answer src
    sig: bytes = b""  # the asker's: the answer goes to src, so no member may ask in another's name


@reg
@dataclass
class DhtFound(Addressed):
    """The answer to a DhtFind: the stores held for the key, each as its registrant signed it, so
    that the asker believes no holder, only the registrants (MAX_FOUND at most)."""

    TYPE: ClassVar[int] = 122
    src: int
    key: bytes
    cookie: int
    stores: list[DhtStore] = field(default_factory=list)


@reg
@dataclass
class Echo(Addressed):
    """Keeps a management adjacency alive."""

    TYPE: ClassVar[int] = 123
    src: int
