"""The handshake that opens every N-1 flow of a unicast layer (enrollment, management, data
transfer), sans-IO: hello, hello back, proof; with a layer key, an authenticated key exchange.

Initiator: Hello(nonce, ephemeral, key) ->; <- Hello(nonce, ephemeral, key, confirmation,
signature); Proof(confirmation, signature) ->. Each side's confirmation covers both hellos, so
names, addresses, layer and component are bound to the session; a non-member can neither confirm
nor forge. Each side also signs both hellos with its member key, the one its address is bound to
(auth.Bindings): a member, or anyone in an open layer, cannot take a live member's address. Without
a layer key the messages carry no secrets: the layer is open. After it, SDUs are sealed.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable

from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.fsm import Machine, TimedCore
from proto import messages as m
from proto.errors import InvalidArgument
from proto.names import check_name
from transports.wire import Message, WireError

TIMEOUT = 10.0  # seconds a handshake may take
FIRST_HELLO = 2.0  # seconds a responder waits for the first hello: a silent flow holds a slot no longer
COMPONENTS = (um.ENROLL, um.MGMT, um.DT)


class State(enum.Enum):
    IDLE = enum.auto()
    HELLO_SENT = enum.auto()  # initiator: waiting for the hello back
    CHALLENGED = enum.auto()  # responder: hello back sent, waiting for the proof
    UP = enum.auto()
    FAILED = enum.auto()


class Event(enum.Enum):
    START = enum.auto()
    HELLO = enum.auto()
    PROOF = enum.auto()
    FAIL = enum.auto()


TRANSITIONS = {
    (State.IDLE, Event.START): State.HELLO_SENT,  # initiator
    (State.HELLO_SENT, Event.HELLO): State.UP,
    (State.IDLE, Event.HELLO): State.CHALLENGED,  # responder
    (State.CHALLENGED, Event.PROOF): State.UP,
    **{(s, Event.FAIL): State.FAILED for s in (State.IDLE, State.HELLO_SENT, State.CHALLENGED)},
}


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is at the other end, once the handshake is done, and the flow's seals (None: open layer)."""

    component: str
    name: str
    layer: str
    addr: int
    sealer: auth.Sealer | None
    opener: auth.Opener | None
    pub: bytes = b""  # its member key, proved by its signature


class Refused(Exception):
    """The handshake failed: `code` is the errno to report, `text` why."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


def valid_name(name: str) -> bool:
    """Whether a peer's hello names it as any IPCP is named (1-255 printable characters, no spaces)."""
    try:
        check_name(name)
    except InvalidArgument:
        return False
    return True


def decode(sdu: bytes, opener: auth.Opener | None = None) -> Message:
    """One SDU of a handshaken flow: opened if the layer has a key, then decoded."""
    try:
        return um.CODEC.decode(bytes(opener.open(sdu)) if opener else sdu).msg
    except WireError as e:
        raise Refused(m.EPROTO, f"malformed message: {e}") from None


class Handshake(TimedCore):
    """One end of a handshake. Feed it SDUs with receive(); send what pop_out() returns."""

    def __init__(
        self,
        initiator: bool,
        component: str,
        name: str,
        layer: str,
        addr: int,
        psk: bytes | None,
        now: float,
        max_addr: int = um.ADDR_SPACE - 1,
        identity: auth.Identity | None = None,
        owner_of: Callable[[int], bytes | None] | None = None,
    ) -> None:
        """`identity`: the member key this end signs with (a fresh one for a would-be member);
        `owner_of(addr)`: the member key an address is bound to, if any (a peer claiming it with
        another key is refused)."""
        super().__init__(now + (TIMEOUT if initiator else min(FIRST_HELLO, TIMEOUT)))
        self._began = now
        self.initiator = initiator
        self.component, self.name, self.layer, self.addr = component, name, layer, addr
        self.max_addr = max_addr  # the layer's widest address: a peer claiming a wider one is refused
        self.psk = psk
        self.machine: Machine[State, Event] = Machine("handshake", TRANSITIONS, State.IDLE)
        self.peer: Peer | None = None
        self.error: Refused | None = None
        self._kex = auth.KeyExchange(psk) if psk is not None else None
        self.identity = identity or auth.Identity.generate()
        self._owner_of = owner_of or (lambda addr: None)
        self._nonce = self._kex.nonce if self._kex else os.urandom(auth.NONCE)
        self._hello: um.Hello | None = None  # ours, as sent (the initiator's, at the responder)
        self._transcript = b""
        self._session: auth.Session | None = None

    @property
    def done(self) -> bool:
        return self.machine.state in (State.UP, State.FAILED)

    @property
    def silent(self) -> bool:
        """A responder that has heard nothing yet."""
        return not self.initiator and self.machine.state is State.IDLE

    def expire(self) -> None:
        self._fail(Refused(m.ETIMEDOUT, "the peer did not finish the handshake in time"), tell=False)

    def _own_hello(self) -> um.Hello:
        kex = self._kex
        return um.Hello(
            self.component,
            self.name,
            self.layer,
            self.addr,
            self._nonce,
            kex.eph if kex else b"",
            pub=self.identity.pub,
        )

    def start(self) -> None:
        self.machine.fire(Event.START)
        self._hello = self._own_hello()
        self._out.append(um.CODEC.encode(self._hello))

    def receive(self, sdu: bytes, now: float) -> None:
        if self.done:
            raise Refused(m.EPROTO, "a message after the handshake ended")
        try:
            msg = decode(sdu)
            if isinstance(msg, um.Refuse):
                self._fail(
                    Refused(m.EPERM if msg.result == um.E_AUTH else m.EIPCP, f"refused: {msg.error[:200]}"), tell=False
                )
            elif isinstance(msg, um.Hello) and self.machine.can(Event.HELLO):
                self._on_hello(msg)
            elif isinstance(msg, um.Proof) and self.machine.can(Event.PROOF):
                self._on_proof(msg)
            else:
                raise Refused(m.EPROTO, f"unexpected {type(msg).__name__} in state {self.machine.state.name}")
        except Refused as e:
            self._fail(e, tell=True)

    def _fail(self, error: Refused, tell: bool) -> None:
        self.error = error
        if tell and error.code != m.EPROTO:
            result = um.E_AUTH if error.code == m.EPERM else um.E_REFUSED
            self._out.append(um.CODEC.encode(um.Refuse(result, error.text)))
        self.machine.fire(Event.FAIL)

    def _check(self, hello: um.Hello) -> None:
        if hello.component != self.component and not (not self.initiator and self.component == ""):
            raise Refused(m.EINVAL, f"a hello for {hello.component[:40]!r}, expected {self.component!r}")
        if hello.component not in COMPONENTS:
            raise Refused(m.EINVAL, f"unknown component {hello.component[:40]!r}")
        if not valid_name(hello.name):  # it is logged, shown in IpcpInfo and connected to by name
            raise Refused(m.EINVAL, f"no IPCP name: {hello.name[:40]!r}")
        if hello.addr and hello.addr == self.addr:
            raise Refused(m.EINVAL, "a connection from this IPCP to itself")
        if hello.addr > self.max_addr or (hello.component in (um.DT, um.MGMT) and not hello.addr):
            raise Refused(m.EINVAL, f"no address of this layer (1 to {self.max_addr})")
        if self.layer and hello.layer and hello.layer != self.layer:
            raise Refused(m.EINVAL, f"the peer is in layer {hello.layer[:80]!r}, not {self.layer!r}")
        keyed = bool(hello.eph)
        if keyed != (self.psk is not None):
            why = "the layer needs a key" if self.psk is not None else "the layer is open: it has no key"
            raise Refused(m.EPERM, why)
        if len(hello.nonce) != auth.NONCE or (keyed and len(hello.eph) != auth.EPH):
            raise Refused(m.EPROTO, "malformed key exchange")
        if len(hello.pub) != auth.PUB:
            raise Refused(m.EPERM, "no member key")

    def _on_hello(self, hello: um.Hello) -> None:
        self._check(hello)
        if self.initiator:
            assert self._hello is not None
            self._complete(self._hello, hello)
            if self._session is not None:
                try:
                    self._session.check(b"responder", hello.mac)
                except auth.Forged as e:
                    raise Refused(m.EPERM, f"refused: the layer key does not match the peer's ({e})") from None
            elif hello.mac:
                raise Refused(m.EPROTO, "a confirmation in an open layer")
            self._prove_member(hello, b"responder", hello.sig)
            confirmation = self._session.confirmation(b"initiator") if self._session else b""
            sig = self.identity.sign(b"initiator" + self._transcript)
            self._out.append(um.CODEC.encode(um.Proof(confirmation, sig)))
            self.machine.fire(Event.HELLO)
            self._up(hello)
            return
        self.deadline = self._began + TIMEOUT  # it spoke: the whole handshake's time
        self.component = self.component or hello.component
        reply = self._own_hello()
        self._complete(hello, reply)
        reply = dataclasses.replace(
            reply,
            mac=self._session.confirmation(b"responder") if self._session else b"",
            sig=self.identity.sign(b"responder" + self._transcript),
        )
        self._hello = hello  # the initiator's: whom we are talking to
        self._out.append(um.CODEC.encode(reply))
        self.machine.fire(Event.HELLO)

    def _complete(self, init: um.Hello, resp: um.Hello) -> None:
        """Both hellos known: the transcript both ends confirm and sign, and with a layer key the session."""
        self._transcript = um.CODEC.encode(dataclasses.replace(init, mac=b"", sig=b"")) + um.CODEC.encode(
            dataclasses.replace(resp, mac=b"", sig=b"")
        )
        if self._kex is None:
            return
        try:
            self._session = self._kex.complete(
                resp.eph if self.initiator else init.eph, self._transcript, self.initiator
            )
        except auth.Forged as e:
            raise Refused(m.EPERM, str(e)) from None

    def _prove_member(self, hello: um.Hello, role: bytes, sig: bytes) -> None:
        """The peer signed this handshake with the key in its hello, and that key may speak for the
        address it claims (the one bound to it, if any)."""
        try:
            auth.verify(hello.pub, role + self._transcript, sig)
        except auth.Forged as e:
            raise Refused(m.EPERM, f"the peer does not prove its member key ({e})") from None
        held = self._owner_of(hello.addr) if hello.addr else None
        if held is not None and held != hello.pub:
            raise Refused(m.EPERM, f"address {hello.addr} belongs to another member key")

    def _on_proof(self, proof: um.Proof) -> None:
        if self._session is not None:
            try:
                self._session.check(b"initiator", proof.mac)
            except auth.Forged as e:
                raise Refused(m.EPERM, f"the peer does not prove the layer key ({e})") from None
        assert self._hello is not None
        self._prove_member(self._hello, b"initiator", proof.sig)
        self.machine.fire(Event.PROOF)
        self._up(self._hello)

    def _up(self, hello: um.Hello) -> None:
        s = self._session
        self.peer = Peer(
            self.component,
            hello.name,
            hello.layer,
            hello.addr,
            auth.Sealer(s.tx) if s else None,
            auth.Opener(s.rx) if s else None,
            hello.pub,
        )
