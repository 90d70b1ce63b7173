"""Control messages between applications, irm, the IRMd and IPCPs, defined once.

Each message is a dataclass with a unique TYPE code; `CODEC` frames them
(see transports.wire). Replies to failed requests are `transports.wire.Error`.
"""

from __future__ import annotations

from dataclasses import field
from typing import ClassVar

from proto.errors import Code
from proto.qos import QosSpec
from transports.records import Record, record
from transports.wire import Message, PackedCodec

CODEC = PackedCodec()
reg = CODEC.register

# Error codes carried in Error replies: proto.errors.Code, one exception class each.
ENOENT: str = Code.ENOENT  # name, ipcp, layer or flow not found
EEXIST: str = Code.EEXIST
EINVAL: str = Code.EINVAL
EPERM: str = Code.EPERM
ETIMEDOUT: str = Code.ETIMEDOUT
ENOTCONN: str = Code.ENOTCONN  # layer or ipcp down
EIPCP: str = Code.EIPCP  # the IPCP failed the operation
EPROTO: str = Code.EPROTO
ENOTSUP: str = Code.ENOTSUP  # the layer cannot serve the QoS asked
EBUSY: str = Code.EBUSY
EDQUOT: str = Code.EDQUOT  # a limit of the IRMd is reached
EIO: str = Code.EIO
EAUTH: str = Code.EAUTH  # the flow allocation failed authentication (OAP header, timestamp, replay, identity)
ECRYPT: str = Code.ECRYPT  # the allocation's key exchange failed, or encryption was required and not offered


# -- generic replies ----------------------------------------------------------


@reg
@record
class Ok(Message):
    """The reply to a request that succeeded; `text`, what the IRMd or IPCP has to say of it."""

    TYPE: ClassVar[int] = 2
    text: str = ""


@reg
@record
class Table(Message):
    """Rows for the `irm ... list` commands; every value is text."""

    TYPE: ClassVar[int] = 3
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    next: int = 0  # more rows follow: ask again with start=next (a list never outgrows one frame)


# -- application <-> IRMd -------------------------------------------------------

GID_MAX = (1 << 32) - 2  # gid_t; (gid_t)-1 is no group
# Supplementary groups a FlowReply carries: 5 bytes each at most, 20 KB of MAX_BODY. The kernel
# allows NGROUPS_MAX (65536), more than a frame holds; a process with more has them not carried.
MAX_PEER_GROUPS = 4096
MAX_PEER_ADDR = 128  # characters of a remote peer's address as a layer names it (an IPv6 /64 takes 43)


@reg
@record
class ProcAnnounce(Message):
    """First message of an application process: who it is."""

    TYPE: ClassVar[int] = 10
    prog: str


@reg
@record
class FlowAlloc(Message):
    """Allocate a flow to `name` (or join the broadcast layer `name`); the reply is a FlowReply."""

    TYPE: ClassVar[int] = 11
    name: str
    qos: QosSpec
    timeout: float | None = None
    join: bool = False  # flow_join: `name` is a broadcast layer to join


@reg
@record
class FlowAccept(Message):
    """Wait for the next flow to one of this process's names; the reply is a FlowReply."""

    TYPE: ClassVar[int] = 12
    timeout: float | None = None
    cypher_s: int = 0  # > 0: take only encrypted flows (the IRMd refuses plain ones for this process)


@reg
@record
class FlowReply(Message):
    """A flow handed to an application; its fd rides along."""

    TYPE: ClassVar[int] = 13
    flow_id: int
    layer: str
    mtu: int
    qos: QosSpec
    name: str = ""
    # Who allocated it, as the kernel told the IRMd, when both ends are on this host; else -1 / 0.
    peer_uid: int = -1
    peer_pid: int = 0
    # What the allocation's OAP exchange established (irmd.oap): the cipher (OpenSSL NID, 0 = plain)
    # and its key, which the application's flowlib seals and opens packets with; the peer's
    # certificate (DER) if it signed its header, and whether it chains to the IRMd's CA store;
    # seq_iv: both ends number their IVs, so either may refuse replays.
    cipher: int = 0
    key: bytes = b""
    peer_crt: bytes = b""
    peer_ca: bool = False
    seq_iv: bool = False
    # The flow never leaves this host's kernel (a local layer): no bit errors for a CRC to find, so
    # ber 0 adds none (as Linux skips checksums on loopback); the application's QoS still says ber 0.
    no_wire: bool = False
    # The allocator's gid (SO_PEERCRED) and supplementary groups (SO_PEERGROUPS), carried as peer_uid
    # is; -1: the kernel's gid is not the uid's (a server acting as a user it authenticated: ActAs).
    # Groups None: not known (kernel before 4.13, more than MAX_PEER_GROUPS): grant none on them.
    peer_gid: int = -1
    peer_groups: list[int] | None = None

    def __post_init__(self) -> None:
        if not -1 <= self.peer_gid <= GID_MAX:
            raise ValueError(f"peer_gid {self.peer_gid} is no gid")
        if self.peer_groups is not None:
            if len(self.peer_groups) > MAX_PEER_GROUPS:
                raise ValueError(f"peer_groups: {len(self.peer_groups)} groups, at most {MAX_PEER_GROUPS}")
            # bounds of the whole list at once: msgspec took only ints (a bool is no int to it)
            if self.peer_groups and not (min(self.peer_groups) >= 0 and max(self.peer_groups) <= GID_MAX):
                raise ValueError("peer_groups: a gid out of range")


@reg
@record
class FlowDealloc(Message):
    """The application lets go of a flow."""

    TYPE: ClassVar[int] = 14
    flow_id: int


@reg
@record
class FlowInfo(Message):
    """Asks (and answers) how a flow ended: state is 'allocated', 'dealloc' or 'down'. Asked with
    `counters`, it also tells what the flow's IPCP counted of its SDUs (irmd.flows.Flows.counts)."""

    TYPE: ClassVar[int] = 15
    flow_id: int
    state: str = ""
    counters: bool = False
    ipcp: str = ""
    # How the flow's SDUs move: "ipcp" (its IPCP relays and counts them), "direct" (between the
    # applications' sockets: no IPCP sees them), "" (not known: the IPCP did not say)
    data: str = ""
    sent: int = -1  # -1: not counted
    received: int = -1
    dropped: int = -1
    drops: str = ""  # why the IPCP dropped them, as it says ("3 queue full: the application did not read")


@reg
@record
class FlowPeer(Message):
    """Asks (and answers) which remote host asked for a flow the caller accepted: the peer as its layer
    vouches for it (a unicast member's address, which it signed its request under; a udp peer's IP or
    IPv6 /64; an Ethernet MAC), the one the IRMd counts `flows_per_peer` against. "" for a flow from
    this host (its uid is `FlowReply.peer_uid`) or from a layer that names no peer. A server's limits
    per client can then be a remote host's, not the whole layer's. (Asked, not carried in FlowReply:
    applications that never ask decode nothing new.)"""

    TYPE: ClassVar[int] = 17
    flow_id: int
    addr: str = ""

    def __post_init__(self) -> None:
        if len(self.addr) > MAX_PEER_ADDR:
            raise ValueError(f"addr of {len(self.addr)} characters, at most {MAX_PEER_ADDR}")


@reg
@record
class FlowListen(Message):
    """Turns on or off the push of arriving flows as FlowReply notices."""

    TYPE: ClassVar[int] = 16
    enabled: bool
    cypher_s: int = 0  # as FlowAccept's


# -- irm (administration) -> IRMd ---------------------------------------------


@reg
@record
class IpcpCreate(Message):
    """irm ipcp create: start an IPCP of `type` named `name`."""

    TYPE: ClassVar[int] = 30
    name: str
    type: str


@reg
@record
class IpcpDestroy(Message):
    """irm ipcp destroy: stop the IPCP `name`."""

    TYPE: ClassVar[int] = 31
    name: str


@reg
@record
class IpcpBootstrap(Message):
    """irm ipcp bootstrap: make the layer `layer` with the IPCPs `name` names (one of `type`, started
    if none is there); `conf`, its options as proto.options checks them."""

    TYPE: ClassVar[int] = 32
    name: str
    layer: str
    type: str = ""
    autobind: bool = False
    conf: dict[str, str] = field(default_factory=dict)


@reg
@record
class IpcpEnroll(Message):
    """irm ipcp enroll: join the IPCPs `name` names to a layer through `dst` (else a member of
    `layer`), with the layer's key if it has one."""

    TYPE: ClassVar[int] = 33
    name: str
    layer: str = ""
    dst: str = ""
    type: str = ""
    autobind: bool = False
    key: str = ""  # the layer's key, if it was bootstrapped with one


@reg
@record
class IpcpConnect(Message):
    """irm ipcp connect: connect (or disconnect) an IPCP's components to its neighbour `dst`."""

    TYPE: ClassVar[int] = 34
    name: str
    dst: str
    component: str = ""  # "" = both dt and mgmt
    qos: str = "raw"
    connect: bool = True  # False disconnects


@reg
@record
class IpcpList(Message):
    """irm ipcp list, filtered by name, layer and type; the reply is a Table."""

    TYPE: ClassVar[int] = 35
    name: str = ""
    layer: str = ""
    type: str = ""
    start: int = 0  # the page from this key on (Table.next of the page before)


@reg
@record
class Bind(Message):
    """bind program|process|ipcp TARGET name N; unbind when bind is False."""

    TYPE: ClassVar[int] = 36
    kind: str
    target: str
    name: str = ""
    auto: bool = False
    args: list[str] = field(default_factory=list)
    bind: bool = True


@reg
@record
class NameCreate(Message):
    """irm name create: a name, its load-balancing policy and its security files."""

    TYPE: ClassVar[int] = 37
    name: str
    lb: str = "round-robin"
    sec: dict[str, str] = field(default_factory=dict)  # irmd.secfiles.SEC_KEYS -> path: security files


@reg
@record
class NameDestroy(Message):
    """irm name destroy."""

    TYPE: ClassVar[int] = 38
    name: str


@reg
@record
class NameRegister(Message):
    """Register (or unregister) a name with every IPCP in the layers, and with the IPCPs, named:
    patterns where * stands for any run of characters."""

    TYPE: ClassVar[int] = 39
    name: str
    layers: list[str]
    register: bool = True  # False unregisters
    ipcps: list[str] = field(default_factory=list)


@reg
@record
class NameList(Message):
    """irm name list; the reply is a Table."""

    TYPE: ClassVar[int] = 40
    start: int = 0
    prefix: str = ""  # only the names that begin with it (ouroboros(8): irm name list NAME)


@reg
@record
class FlowList(Message):
    """irm flow list; the reply is a Table."""

    TYPE: ClassVar[int] = 41
    start: int = 0


@reg
@record
class Dump(Message):
    """The running state as text: a config file ("config"), or the layer graph ("text", "dot", "json")."""

    TYPE: ClassVar[int] = 42
    what: str = "config"
    offset: int = 0  # the text from this offset on (Text.next of the part before)


@reg
@record
class ActAs(Message):
    """From now on, treat this connection as user `uid`'s: a server that serves a user it has
    authenticated works with that user's rights (root may name any uid; others only their own;
    there is no way back)."""

    TYPE: ClassVar[int] = 111
    uid: int


@reg
@record
class Text(Message):
    """A part of a long text (a dump): ask again with offset=next while next is not 0."""

    TYPE: ClassVar[int] = 110
    text: str
    next: int = 0


# -- IRMd <-> IPCP --------------------------------------------------------------


@reg
@record
class IpcpAnnounce(Message):
    """First message of a freshly spawned IPCP process."""

    TYPE: ClassVar[int] = 60
    name: str
    type: str


@reg
@record
class LayerInfo(Message):
    """An IPCP's reply to bootstrap/enroll: what the IRMd needs to know of its layer."""

    TYPE: ClassVar[int] = 61
    layer: str
    hash: str = "SHA3_256"
    mtu: int = 65535
    flows: int = 0  # the most flows the IPCP holds at once (a shim's endpoints); 0: no bound of its own


@reg
@record
class IpcpBootstrapReq(Message):
    """IRMd -> IPCP: make the layer `layer` with these options; the reply is a LayerInfo."""

    TYPE: ClassVar[int] = 62
    layer: str
    conf: dict[str, str] = field(default_factory=dict)


@reg
@record
class IpcpEnrollReq(Message):
    """IRMd -> IPCP: join the layer through `dst`; the reply is a LayerInfo."""

    TYPE: ClassVar[int] = 63
    dst: str
    key: str = ""


@reg
@record
class IpcpConnectReq(Message):
    """IRMd -> IPCP: connect (or disconnect) a component to the neighbour `dst`."""

    TYPE: ClassVar[int] = 64
    dst: str
    component: str = ""
    qos: str = "raw"
    connect: bool = True


@reg
@record
class IpcpReg(Message):
    """Register (or unregister) a name hash in the IPCP's layer."""

    TYPE: ClassVar[int] = 65
    hash: bytes
    register: bool = True


@reg
@record
class IpcpQuery(Message):
    """Is this name hash reachable through the IPCP's layer? Ok or ENOENT."""

    TYPE: ClassVar[int] = 66
    hash: bytes


@reg
@record
class IpcpFlowAlloc(Message):
    """Allocate a flow to a name hash; the reply is an IpcpFlow with the app's fd."""

    TYPE: ClassVar[int] = 67
    flow_id: int
    hash: bytes
    qos: QosSpec
    timeout: float | None = None
    data: bytes = b""  # the allocation's piggyback (the IRMd's OAP request): opaque to the IPCP, carried whole


@reg
@record
class IpcpFlow(Message):
    """The allocation's answer, with the allocating application's fd; a flow that stays on this host
    (the local layer) carries the accepting application's fd as a second one, for the IRMd to hand on."""

    TYPE: ClassVar[int] = 68
    mtu: int
    data: bytes = b""  # the responder's piggyback (its IRMd's OAP response), as it arrived


@reg
@record
class IpcpFlowDealloc(Message):
    """IRMd -> IPCP: the application let go of the flow; a notice."""

    TYPE: ClassVar[int] = 69
    flow_id: int


@reg
@record
class FlowReqArrived(Message):
    """IPCP -> IRMd: a peer asks for a flow to a name hash; the app's fd rides along.

    The reply is an IpcpFlowAccepted naming the new flow's id.
    """

    TYPE: ClassVar[int] = 70
    hash: bytes
    qos: QosSpec
    mtu: int
    src_flow: int = 0  # the local IPCP: the allocating end's flow id at this IRMd, so it can name the peer
    data: bytes = b""  # the requester's piggyback, as it arrived
    peer: str = ""  # who asks, as the layer knows it (an address): in-flight allocations are limited per peer

    def __post_init__(self) -> None:
        if len(self.peer) > MAX_PEER_ADDR:
            raise ValueError(f"peer of {len(self.peer)} characters, at most {MAX_PEER_ADDR}")


@reg
@record
class IpcpFlowAccepted(Message):
    """IRMd -> IPCP: the answer to a FlowReqArrived, naming the new flow."""

    TYPE: ClassVar[int] = 71
    flow_id: int
    data: bytes = b""  # the piggyback to send back to the requester


@reg
@record
class FlowPeerDealloc(Message):
    """IPCP -> IRMd: the remote end deallocated (or, if down, lost) the flow; a notice."""

    TYPE: ClassVar[int] = 72
    flow_id: int
    down: bool = False


# -- state an IPCP can be asked for (irm ipcp show) ------------------------------------------


@record
class InfoSection(Record):
    """One named table of an IpcpInfo: rows of text columns."""

    name: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


@reg
@record
class IpcpInfoReq(Message):
    """What an IPCP knows of itself. irm -> IRMd naming the IPCP (admin); IRMd -> IPCP with no name."""

    TYPE: ClassVar[int] = 140
    name: str = ""


@reg
@record
class IpcpInfo(Message):
    """The answer: sections such as "ipcp" (name, type, layer), and per type e.g. "neighbours",
    "forwarding", "counters"; a section holds at most INFO_ROWS rows."""

    TYPE: ClassVar[int] = 141
    sections: list[InfoSection] = field(default_factory=list)


INFO_ROWS = 512
# An IPCP's "flows" section whose columns start with these gives each of its N+1 flows' counters (by
# IRMd flow id), which `irm flow list` shows beside the flow: SDUs sent, received and dropped, or
# DIRECT in all three for a flow whose SDUs the IPCP never sees; `drops` says why it dropped them.
FLOW_COUNTERS = ("flow", "dst", "sent", "received", "dropped", "drops")
DIRECT = "direct"
