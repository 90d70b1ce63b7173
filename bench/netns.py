"""Network namespaces for the eth and c suites: one host alone, or two joined by a veth pair.

Always removed after. Sockets can be opened inside a namespace from this process (a short-lived
thread enters it).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from bench.harness import BenchError, Resource

CLONE_NEWNET = 0x40000000


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise BenchError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _add(ns: str) -> None:
    _ip("netns", "add", ns)
    _ip("-n", ns, "link", "set", "lo", "up")


def _delete(ns: str) -> None:
    if Path(f"/run/netns/{ns}").exists():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


class Netns(Resource):
    """Namespace NAME<pid> with only its loopback, up."""

    def __init__(self, name: str) -> None:
        self.ns = f"{name}{os.getpid() % 100000}"

    def open(self) -> None:
        _add(self.ns)

    def close(self) -> None:
        _delete(self.ns)


class VethPair(Resource):
    """Namespaces NAME-a and NAME-b with interfaces `dev_a` and `dev_b` between them, up.

    With `addrs` (two "IP/LEN"), each end gets its address; without, the link carries no IP.
    """

    def __init__(self, name: str, addrs: tuple[str, str] | None = None) -> None:
        tag = f"{name}{os.getpid() % 100000}"
        self.ns = (f"{tag}a", f"{tag}b")
        self.dev = (f"{tag}va", f"{tag}vb")
        self.addrs = addrs

    @property
    def ips(self) -> tuple[str, str]:
        """The two ends' addresses without the prefix length."""
        if self.addrs is None:
            raise BenchError("this veth pair carries no IP")
        return self.addrs[0].split("/")[0], self.addrs[1].split("/")[0]

    def open(self) -> None:
        for ns in self.ns:
            _add(ns)
        _ip("link", "add", self.dev[0], "netns", self.ns[0], "type", "veth",
            "peer", "name", self.dev[1], "netns", self.ns[1])  # fmt: skip
        for i, (ns, dev) in enumerate(zip(self.ns, self.dev, strict=True)):
            if self.addrs is not None:
                _ip("-n", ns, "addr", "add", self.addrs[i], "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")

    def close(self) -> None:
        for ns in self.ns:  # deleting a namespace deletes its end of the veth, and so the pair
            _delete(ns)

    def mac(self, side: int) -> bytes:
        info = json.loads(_ip("-n", self.ns[side], "-j", "link", "show", "dev", self.dev[side]))
        return bytes.fromhex(str(info[0]["address"]).replace(":", ""))

    def inside(self, side: int, make: Callable[[], socket.socket]) -> socket.socket:
        """`make()` run in namespace `side`: the socket it returns belongs there for good."""
        result: list[socket.socket | BaseException] = []

        def enter_and_make() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            try:
                with open(f"/run/netns/{self.ns[side]}", "rb") as f:  # setns moves this thread only
                    if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns failed")
                result.append(make())
            except BaseException as e:
                result.append(e)

        worker = threading.Thread(target=enter_and_make)
        worker.start()
        worker.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]
