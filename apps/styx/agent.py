"""Work done for a client with the client's rights: its agent process (agentd, switched to its
credentials) opens its IRMd connections; Peer ties a connection's user to its agent.

The IRMd thus sees and judges the real user of every ctl write, flow allocation and
announcement; the server only carries the bytes.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import signal
import socket
import struct
import threading
import time
import warnings
from pathlib import Path

from apps.styx import agentd
from apps.styx.identity import NONE, Creds, Policy, Rights, User
from apps.styx.tree import StyxError
from flowlib.irm import IrmClient
from proto.errors import FlowError
from transports.unix import irmd_sock_path

log = logging.getLogger(__name__)

AGENT_PROG = "styx-agent"  # how agent connections announce themselves: no program binding matches it
CONNECT_TIMEOUT = 10.0
STOP_GRACE = 2.0

# The forked agent runs only system calls (agentd) before it is a process of its own.
warnings.filterwarnings("ignore", message=r".*use of fork\(\) may lead to deadlocks", category=DeprecationWarning)


class AgentError(FlowError):
    """The agent could not be started, or did not hand back an IRMd connection."""


def peer_pid(sock: socket.socket) -> int:
    pid, _, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid)


class Agent:
    """One agent process with `creds` (None: the server's own), and the socket to talk to it.

    Forked without exec, as sshd forks its session children: the client needs no right to
    run our Python, and the child makes only system calls before it has shed the server.
    """

    def __init__(self, creds: Creds | None, irmd_sock: Path, irmd_pid: int | None) -> None:
        self.creds = creds
        self.irmd_pid = irmd_pid
        self._lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.pid = os.fork()
        except OSError as e:
            ours.close()
            theirs.close()
            raise AgentError(f"cannot start an agent as {creds or 'the server'}: {e.strerror}") from None
        if self.pid == 0:
            agentd.child(theirs.fileno(), os.path.abspath(irmd_sock), creds)  # never returns
        theirs.close()
        self.sock = ours
        self.sock.settimeout(CONNECT_TIMEOUT)

    def connect(self) -> socket.socket:
        """A new connection to the IRMd made by the agent, so carrying its credentials."""
        with self._lock:
            try:
                self.sock.send(agentd.REQUEST)
                data, anc, _, _ = self.sock.recvmsg(512, socket.CMSG_SPACE(4 * 4))
            except OSError as e:
                raise AgentError(f"the agent (pid {self.pid}) did not answer: {e}") from None
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if data != b"ok" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise AgentError(data.decode(errors="replace") or f"the agent (pid {self.pid}) is gone")
        conn = socket.socket(fileno=fds[0])
        self._check(conn)
        return conn

    def _check(self, conn: socket.socket) -> None:
        """The agent runs as the client, who could make it pass anything: take only a
        connection to our own IRMd."""
        try:
            ok = (conn.family == socket.AF_UNIX and conn.type == socket.SOCK_SEQPACKET
                  and (self.irmd_pid is None or peer_pid(conn) == self.irmd_pid))
        except OSError:
            ok = False
        if not ok:
            conn.close()
            raise AgentError(f"the agent (pid {self.pid}) passed something that is not a connection to the IRMd")

    def close(self) -> None:
        self.sock.close()  # end of file: the agent exits
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0] == self.pid:
                    return
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


class Peer:
    """One connection's client: its user, the server's rights for it, and, made on first use,
    its agent and an IRMd client working through the agent."""

    def __init__(self, user: User, policy: Policy, irmd_sock: Path | None = None,
                 irmd_pid: int | None = None) -> None:
        self.user = user
        self.policy = policy
        self.rights: Rights = policy.rights(user)
        self.irmd_sock = irmd_sock
        self.irmd_pid = irmd_pid
        self._lock = threading.Lock()
        self._agent: Agent | None = None
        self._irm: IrmClient | None = None

    @property
    def acts(self) -> bool:
        """May drive the IRMd and use flows: the IRMd would see this very user."""
        return self.rights.as_user

    def require_acts(self, what: str) -> None:
        """StyxError unless the IRMd would see this very user doing `what`."""
        if self.acts:
            return
        if self.user.anonymous:
            raise StyxError(f"permission denied: {what} needs an identity from the stack; "
                            "this connection has none (user none)")
        raise StyxError(f"permission denied: {what}: this server runs as uid {self.policy.euid} "
                        f"and cannot act as user {self.user.name}")

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
                    log.info("agent %d for %s (%s)", self._agent.pid, self.user.name, self.rights.creds or "as us")
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
        if irm is not None:
            with contextlib.suppress(OSError):
                irm.close()
        if agent is not None:
            agent.close()
