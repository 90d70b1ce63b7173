"""Work done for a 9P client with the client's rights: Peer ties a connection's user to its
agent (apps.agent), whose IRMd connections make every ctl write, allocation and announcement the user's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from apps.agent import AGENT_PROG, Agent
from apps.styx.identity import NONE, Policy, Rights, User
from apps.styx.tree import StyxError
from flowlib.irm import IrmClient
from transports.ratelog import RateLog
from transports.unix import irmd_sock_path

log = logging.getLogger(__name__)
# Agents started: one per session that asks the IRMd anything, which a user can open in a loop (a line
# each, ~50 a second); the rest are counted in the next line that passes.
AGENTS = RateLog(rate=2.0, burst=10, logger=log)
T = TypeVar("T")


class Peer:
    """One connection's client: its user, the server's rights for it, and, made on first use,
    its agent and an IRMd client working through the agent."""

    def __init__(self, user: User, policy: Policy, irmd_sock: Path | None = None, irmd_pid: int | None = None) -> None:
        self.user = user
        self.policy = policy
        self.rights: Rights = policy.rights(user)
        self.irmd_sock = irmd_sock
        self.irmd_pid = irmd_pid
        self._lock = threading.Lock()
        self._agent: Agent | None = None
        self._irm: IrmClient | None = None
        self._kept: dict[Any, Any] = {}

    @property
    def acts(self) -> bool:
        """May drive the IRMd and use flows: the IRMd would see this very user."""
        return self.rights.as_user

    def require_acts(self, what: str) -> None:
        """StyxError unless the IRMd would see this very user doing `what`."""
        if self.acts:
            return
        if self.user.anonymous:
            raise StyxError(
                f"permission denied: {what} needs an identity from the stack; this connection has none (user none)"
            )
        if self.user.uid == self.policy.euid:
            raise StyxError(
                f"permission denied: {what}: this server's groups are not all this connection's, "
                f"and it cannot act as user {self.user.name} with fewer"
            )
        raise StyxError(
            f"permission denied: {what}: this server runs as uid {self.policy.euid} "
            f"and cannot act as user {self.user.name}"
        )

    def kept(self, key: type[T], make: Callable[[], T]) -> T:
        """What a tree keeps for this connection (one of type `key`, made by `make` the first time),
        shared by all its attaches and let go when the connection ends."""
        with self._lock:
            if key not in self._kept:
                self._kept[key] = make()
            return self._kept[key]  # type: ignore[no-any-return]

    def as_none(self) -> Peer:
        """The same connection as the anonymous user (anyone may become none)."""
        return Peer(NONE, self.policy, self.irmd_sock, self.irmd_pid)

    def irm(self) -> IrmClient:
        """An IRMd client whose connection the agent made: requests on it are the user's (or,
        for one who may not act, those of the user the server runs it as)."""
        with self._lock:
            if self._irm is None or self._irm.channel.closed:
                if self._agent is None:
                    self._agent = Agent(self.rights.creds, self.irmd_sock or irmd_sock_path(), self.irmd_pid)
                    AGENTS.log("agent %d for %s (%s)", self._agent.pid, self.user.name, self.rights.creds or "as us")
                self._irm = IrmClient(sock=self._agent.connect(), prog=AGENT_PROG)
            return self._irm

    @property
    def agent_pid(self) -> int:
        self.irm()
        assert self._agent is not None
        return self._agent.pid

    def close(self) -> None:
        with self._lock:
            irm, agent, self._irm, self._agent = self._irm, self._agent, None, None
            self._kept.clear()
        if irm is not None:
            with contextlib.suppress(OSError):
                irm.close()
        if agent is not None:
            agent.close()
