"""Enrollment into a unicast layer, sans-IO: the enrollee asks a member for the layer's
configuration over an N-1 flow; the enroller, once the handshake proved the enrollee, answers.

The layer key never travels: the handshake proves it both ways (handshake.Handshake), and the
configuration comes back sealed under the session it made. An enroller refuses keyless
enrollees of a keyed layer; an enrollee given a key refuses a layer that has none.
"""

from __future__ import annotations

import dataclasses
import enum

from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.fsm import Machine, TimedCore
from ipcp.unicast.handshake import TIMEOUT, Handshake, Peer, Refused, decode
from proto import messages as m
from transports.wire import MAX_FRAME, WireError

MAX_MEMBERS = 65536  # addresses an enrollment answer may list
MAX_CONF = 64  # options it may carry


class EnrolleeState(enum.Enum):
    IDLE = enum.auto()
    HANDSHAKE = enum.auto()
    AWAIT_INFO = enum.auto()
    ENROLLED = enum.auto()
    FAILED = enum.auto()


class EnrolleeEvent(enum.Enum):
    START = enum.auto()
    PROVED = enum.auto()  # the handshake is done
    INFO = enum.auto()
    FAIL = enum.auto()


ENROLLEE = {
    (EnrolleeState.IDLE, EnrolleeEvent.START): EnrolleeState.HANDSHAKE,
    (EnrolleeState.HANDSHAKE, EnrolleeEvent.PROVED): EnrolleeState.AWAIT_INFO,
    (EnrolleeState.AWAIT_INFO, EnrolleeEvent.INFO): EnrolleeState.ENROLLED,
    **{
        (s, EnrolleeEvent.FAIL): EnrolleeState.FAILED
        for s in (EnrolleeState.IDLE, EnrolleeState.HANDSHAKE, EnrolleeState.AWAIT_INFO)
    },
}


class EnrollerState(enum.Enum):
    PROVED = enum.auto()  # the enrollee's handshake is done
    INFO_SENT = enum.auto()
    DONE = enum.auto()


class EnrollerEvent(enum.Enum):
    SEND = enum.auto()
    CLOSED = enum.auto()  # the enrollee closed its end, or took too long to


ENROLLER = {
    (EnrollerState.PROVED, EnrollerEvent.SEND): EnrollerState.INFO_SENT,
    (EnrollerState.INFO_SENT, EnrollerEvent.CLOSED): EnrollerState.DONE,
    (EnrollerState.PROVED, EnrollerEvent.CLOSED): EnrollerState.DONE,
}


class Enrollee:
    """Enrolls `name` through the member at the other end of an N-1 flow. receive() SDUs, send
    pop_out(); `info` is the answer once ENROLLED, `error` why not once FAILED."""

    def __init__(self, name: str, key: str, now: float) -> None:
        self.machine: Machine[EnrolleeState, EnrolleeEvent] = Machine("enrollee", ENROLLEE, EnrolleeState.IDLE)
        self._hs = Handshake(True, um.ENROLL, name, "", 0, auth.layer_psk(key) if key else None, now)
        self.info: um.EnrollInfo | None = None
        self.enroller: Peer | None = None
        self.error: Refused | None = None

    @property
    def done(self) -> bool:
        return self.machine.state in (EnrolleeState.ENROLLED, EnrolleeState.FAILED)

    def start(self) -> None:
        self.machine.fire(EnrolleeEvent.START)
        self._hs.start()

    def pop_out(self) -> list[bytes]:
        return self._hs.pop_out()

    def get_timer(self) -> float | None:
        return None if self.done else self._hs.deadline

    def handle_timer(self, now: float) -> None:
        if not self.done and now >= self._hs.deadline:
            self._fail(Refused(m.ETIMEDOUT, "the enroller did not answer in time"))

    def closed(self) -> None:
        """The flow ended before the answer."""
        if not self.done:
            self._fail(Refused(m.EIPCP, "the enroller closed the flow"))

    def receive(self, sdu: bytes, now: float) -> None:
        if self.machine.state is EnrolleeState.HANDSHAKE:
            self._hs.receive(sdu, now)
            if self._hs.error is not None:
                self._fail(self._hs.error)
            elif self._hs.peer is not None:
                self.enroller = self._hs.peer
                self.machine.fire(EnrolleeEvent.PROVED)
            return
        if self.machine.state is not EnrolleeState.AWAIT_INFO:
            raise Refused(m.EPROTO, f"enrollee: a message in state {self.machine.state.name}")
        assert self.enroller is not None
        try:
            msg = decode(sdu, self.enroller.opener)
        except auth.AuthError as e:
            self._fail(Refused(m.EPERM, f"the enrollment answer does not verify: {e}"))
            return
        except Refused as e:
            self._fail(e)
            return
        if isinstance(msg, um.Refuse):
            self._fail(Refused(m.EPERM if msg.result == um.E_AUTH else m.EIPCP, f"refused: {msg.error[:200]}"))
        elif not isinstance(msg, um.EnrollInfo):
            self._fail(Refused(m.EPROTO, f"the enroller answered {type(msg).__name__}"))
        elif msg.result != um.OK:
            self._fail(Refused(m.EIPCP, f"enrollment refused: {msg.error[:200]}"))
        elif len(msg.members) > MAX_MEMBERS or len(msg.conf) > MAX_CONF or msg.layer != self.enroller.layer:
            self._fail(Refused(m.EPROTO, "the enrollment answer is out of bounds or names another layer"))
        else:
            self.info = msg
            self.machine.fire(EnrolleeEvent.INFO)

    def _fail(self, error: Refused) -> None:
        self.error = error
        self.machine.fire(EnrolleeEvent.FAIL)


def _encoded(info: um.EnrollInfo, limit: int) -> bytes:
    """The answer in one SDU of at most `limit` bytes (and one frame): its member list cut to what
    fits. A layer of some hundreds of members (real, or made up by a member signing LSUs for them
    under fresh keys) lists more than an N-1 flow's MTU carries, a few thousand at 8-byte addresses
    more than a frame; the answer could then not be sent, and no one could enroll. The list only
    steers the enrollee's choice of a free address, which a rare collision past it does not break:
    bindings refuse a taken address's second key."""
    limit = min(limit, MAX_FRAME)
    base = len(um.CODEC.encode(dataclasses.replace(info, members=[])))
    size, keep = base - 1, 0  # the JSON list: each address and a comma, but for the last
    for addr in info.members:
        size += len(str(addr)) + 1
        if size > limit:
            break
        keep += 1
    members = info.members[:keep]
    while True:  # (the count above is exact for the JSON codec; this holds whatever the codec)
        try:
            sdu = um.CODEC.encode(dataclasses.replace(info, members=members))
        except WireError:
            sdu = b""
        if (sdu and len(sdu) <= limit) or not members:
            return sdu or um.CODEC.encode(dataclasses.replace(info, members=[]))
        members = members[: len(members) * 7 // 8]


class Enroller(TimedCore):
    """Answers an enrollee its handshake proved: the layer's configuration, sealed; then waits
    for the enrollee to close (or TIMEOUT)."""

    def __init__(self, enrollee: Peer, info: um.EnrollInfo, now: float, mtu: int = MAX_FRAME) -> None:
        """`mtu`: the largest SDU the N-1 flow to the enrollee carries."""
        super().__init__(now + TIMEOUT)
        self.machine: Machine[EnrollerState, EnrollerEvent] = Machine("enroller", ENROLLER, EnrollerState.PROVED)
        self.enrollee = enrollee
        sdu = _encoded(info, mtu - (auth.SEAL if enrollee.sealer else 0))
        self._out = [enrollee.sealer.seal_bytes(sdu) if enrollee.sealer else sdu]
        self.machine.fire(EnrollerEvent.SEND)

    @property
    def done(self) -> bool:
        return self.machine.state is EnrollerState.DONE

    def expire(self) -> None:
        self.machine.fire(EnrollerEvent.CLOSED)

    def closed(self) -> None:
        self.machine.fire(EnrollerEvent.CLOSED)
