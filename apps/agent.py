"""An agent: a process forked with a client's credentials that opens IRMd connections for a
server, so the IRMd sees and judges the client, not the server, in every request and flow.
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

from apps import agentd
from apps.accounts import Creds
from proto.errors import FlowError

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
            ok = (
                conn.family == socket.AF_UNIX
                and conn.type == socket.SOCK_SEQPACKET
                and (self.irmd_pid is None or peer_pid(conn) == self.irmd_pid)
            )
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
