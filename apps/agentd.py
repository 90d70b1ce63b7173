"""The agent process's side: forked from the server, it drops everything of the server's
(descriptors, credentials, traceability), then connects to the IRMd on request and hands each
connection back, so the IRMd's SO_PEERCRED names the client, not the server.

One request byte in, one reply out (b"ok" with the connection as SCM_RIGHTS, or an error
text); end of file ends it. It only makes system calls: no locks, logging or imports.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import socket
import sys

from apps import ids
from apps.accounts import Creds

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
REQUEST = b"c"


def _shed(control: int) -> None:
    """Keep only the control socket (and stderr); die with the thread that forked us;
    let no process of the client's user trace us or read the server's memory we inherited."""
    gc.disable()  # finalizers of inherited objects must not close descriptors we make
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.closerange(3, control)
    os.closerange(control + 1, 2**31 - 1)  # close_range(2): whatever RLIMIT_NOFILE allowed


def _become(creds: Creds) -> None:
    """All of the process's ids become the client's, and it stays untraceable by the client; fails
    closed (apps.ids). The parent-death signal the switch clears is set again."""
    ids.become(creds.uid, creds.gid, creds.groups)
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot die with the server")


def serve(control: socket.socket, irmd_sock: str, via: str | None = None) -> None:
    """Answer requests for IRMd connections, made to `via` (the socket file opened before the switch)
    or else to `irmd_sock`."""
    while True:
        try:
            request = control.recv(16)
        except OSError:
            return
        if request != REQUEST:
            return  # end of file (the session is over), or not a request we know
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            conn.connect(via or irmd_sock)
        except OSError as e:
            control.send(f"cannot reach the IRMd at {irmd_sock} as uid {os.getuid()}: {e.strerror}".encode())
        else:
            control.sendmsg([b"ok"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, conn.fileno().to_bytes(4, sys.byteorder))])
        finally:
            conn.close()


def child(control: int, irmd_sock: str, creds: Creds | None) -> None:
    """The forked child's whole life; never returns (os._exit), whatever happens."""
    code = 1
    try:
        _shed(control)
        # The IRMd's socket (mode 0666) as the server reaches it: a connect through this descriptor
        # needs the client's right to write the socket, not to search the directories above it (a
        # private run directory would otherwise keep clients out that the IRMd itself admits).
        via = None
        with contextlib.suppress(OSError):
            via = f"/proc/self/fd/{os.open(irmd_sock, os.O_PATH | os.O_CLOEXEC)}"
        if creds is not None:
            _become(creds)
        os.chdir("/")
        with socket.socket(fileno=control) as sock:
            serve(sock, irmd_sock, via)
        code = 0
    except BaseException as e:  # report and leave: nothing may return into the server's code
        with contextlib.suppress(BaseException):
            os.write(2, f"styx agent {os.getpid()}: {e}\n".encode())
    finally:
        os._exit(code)
