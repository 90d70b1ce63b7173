"""The IRMd's side of OAP: a fresh request for every allocation attempt, completed with the
peer's response; an arriving request checked (window, replay, identity) and answered.

The daemon calls `request`/`complete` around an IpcpFlowAlloc and `serve` once a process is
there to accept; every refusal is a HandlerError (EAUTH, ECRYPT) for that one flow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

from proto import messages as m
from proto import oap
from transports.channel import HandlerError

log = logging.getLogger("irmd.oap")


@dataclasses.dataclass
class Attempt:
    """One allocation attempt's request, kept until its response arrives."""

    name: str
    request: oap.Header

    @property
    def data(self) -> bytes:
        return self.request.raw


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What an allocation established, for the application that gets the flow."""

    def reply(self, reply: m.FlowReply) -> m.FlowReply:
        return reply


class Oap:
    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self.clock = clock  # CLOCK_REALTIME in ns, as the timestamps on the wire
        self.replay = oap.ReplayCache()

    # -- the allocating side ---------------------------------------------------------------------

    def request(self, name: str) -> Attempt:
        """A new request: a fresh id and timestamp, so a retry is never taken for a replay."""
        return Attempt(name, oap.decode(oap.plain_request(os.urandom(oap.ID_SIZE), self.clock())))

    def complete(self, attempt: Attempt, data: bytes) -> Outcome:
        try:
            oap.check_response(attempt.request, data)
        except oap.OapError as e:
            log.warning("flow to %s: %s", attempt.name, e.reason)
            raise HandlerError(e.code, f"flow to {attempt.name!r} refused: {e.reason}") from None
        return Outcome()

    # -- the accepting side ----------------------------------------------------------------------

    def serve(self, name: str, data: bytes) -> tuple[bytes, Outcome]:
        """Check a request for `name` and build the response, or refuse the flow."""
        try:
            hdr = oap.decode(data)
            self.replay.check(hdr, self.clock())  # remembered even if a later step fails, as 0.23
            if hdr.crt or hdr.kex:
                raise oap.OapError(oap.ECRYPT, "authenticated and encrypted allocation not supported yet")
            return oap.plain_response(hdr, self.clock()), Outcome()
        except oap.OapError as e:
            log.warning("flow for %s refused: %s", name, e.reason)
            raise HandlerError(e.code, f"flow for {name!r} refused: {e.reason}") from None
