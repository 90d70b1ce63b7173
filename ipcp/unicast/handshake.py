"""The handshake that opens every N-1 flow of a unicast layer (enrollment, management, data
transfer), sans-IO: hello, hello back, proof; with a layer key, an authenticated key exchange.

Initiator: Hello(nonce, ephemeral) ->; <- Hello(nonce, ephemeral, confirmation); Proof ->.
Each side's confirmation covers both hellos, so names, addresses, layer and component are bound
to the session; a non-member can neither confirm nor forge. Without a key the same three
messages carry no secrets: the layer is open. After it, SDUs are sealed (auth.Sealer/Opener).
"""

from __future__ import annotations

import dataclasses
import enum

from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.fsm import Machine, TimedCore
from proto import messages as m
from transports.wire import Message, WireError

TIMEOUT = 10.0  # seconds a handshake may take
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


class Refused(Exception):
    """The handshake failed: `code` is the errno to report, `text` why."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code, self.text = code, text


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
    ) -> None:
        super().__init__(now + TIMEOUT)
        self.initiator = initiator
        self.component, self.name, self.layer, self.addr = component, name, layer, addr
        self.max_addr = max_addr  # the layer's widest address: a peer claiming a wider one is refused
        self.psk = psk
        self.machine: Machine[State, Event] = Machine("handshake", TRANSITIONS, State.IDLE)
        self.peer: Peer | None = None
        self.error: Refused | None = None
        self._kex = auth.KeyExchange(psk) if psk is not None else None
        self._hello: um.Hello | None = None  # ours, as sent
        self._session: auth.Session | None = None

    @property
    def done(self) -> bool:
        return self.machine.state in (State.UP, State.FAILED)

    def expire(self) -> None:
        self._fail(Refused(m.ETIMEDOUT, "the peer did not finish the handshake in time"), tell=False)

    def start(self) -> None:
        self.machine.fire(Event.START)
        kex = self._kex
        self._hello = um.Hello(
            self.component, self.name, self.layer, self.addr, kex.nonce if kex else b"", kex.eph if kex else b""
        )
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
        if hello.addr and hello.addr == self.addr:
            raise Refused(m.EINVAL, "a connection from this IPCP to itself")
        if hello.addr > self.max_addr or (hello.component in (um.DT, um.MGMT) and not hello.addr):
            raise Refused(m.EINVAL, f"no address of this layer (1 to {self.max_addr})")
        if self.layer and hello.layer and hello.layer != self.layer:
            raise Refused(m.EINVAL, f"the peer is in layer {hello.layer[:80]!r}, not {self.layer!r}")
        keyed = bool(hello.eph or hello.nonce)
        if keyed != (self.psk is not None):
            why = "the layer needs a key" if self.psk is not None else "the layer is open: it has no key"
            raise Refused(m.EPERM, why)
        if keyed and (len(hello.nonce) != auth.NONCE or len(hello.eph) != auth.EPH):
            raise Refused(m.EPROTO, "malformed key exchange")

    def _on_hello(self, hello: um.Hello) -> None:
        self._check(dataclasses.replace(hello, mac=b""))
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
            self._out.append(
                um.CODEC.encode(um.Proof(self._session.confirmation(b"initiator") if self._session else b""))
            )
            self.machine.fire(Event.HELLO)
            self._up(hello)
            return
        kex = self._kex
        self.component = self.component or hello.component
        reply = um.Hello(
            self.component, self.name, self.layer, self.addr, kex.nonce if kex else b"", kex.eph if kex else b""
        )
        self._complete(hello, reply)
        if self._session is not None:
            reply = dataclasses.replace(reply, mac=self._session.confirmation(b"responder"))
        self._hello = hello  # the initiator's: whom we are talking to
        self._out.append(um.CODEC.encode(reply))
        self.machine.fire(Event.HELLO)

    def _complete(self, init: um.Hello, resp: um.Hello) -> None:
        if self._kex is None:
            return
        transcript = um.CODEC.encode(init) + um.CODEC.encode(dataclasses.replace(resp, mac=b""))
        try:
            self._session = self._kex.complete(resp.eph if self.initiator else init.eph, transcript, self.initiator)
        except auth.Forged as e:
            raise Refused(m.EPERM, str(e)) from None

    def _on_proof(self, proof: um.Proof) -> None:
        if self._session is not None:
            try:
                self._session.check(b"initiator", proof.mac)
            except auth.Forged as e:
                raise Refused(m.EPERM, f"the peer does not prove the layer key ({e})") from None
        self.machine.fire(Event.PROOF)
        assert self._hello is not None
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
        )
