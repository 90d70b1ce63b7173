"""udp4 shim: 20 s of structured garbage from uid 65534 (every management code with random fields
and bodies, random data eids, truncated headers), from a few hundred loopback addresses.

SAFE if the IPCP is alive afterwards, logged no traceback and no internal error, and still answers
a legitimate 0.23 FLOW_REQ from another address with a valid OAP response.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import time

from lab import BIN, CHECKOUT, irmd, lab, main, nobody_popen, stop, wait_for

sys.path.insert(0, str(CHECKOUT / "tests"))
from helpers import free_port

from proto import oap

IPCP_IP, FUZZ_NET, CLIENT_IP = "127.0.88.1", "127.0.89.", "127.0.90.1"
MGMT = struct.Struct("!IIIiQIIIIIBBB")

FUZZER = r"""
import os, random, socket, struct, sys, time
MGMT = struct.Struct("!IIIiQIIIIIBBB")
dst = (sys.argv[1], int(sys.argv[2]))
net = sys.argv[3]
rng = random.Random(int(sys.argv[4]))
socks = []
for i in range(1, 201):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((net + str(i), 0))
    s.setblocking(False)
    socks.append(s)
codes = [1, 2, 0xB1, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0, 3, 0xFF]
def word(bits):
    return rng.choice([0, 1, (1 << bits) - 1, 1 << (bits - 1), rng.getrandbits(bits)])
end = time.monotonic() + float(sys.argv[5])
sent = 0
while time.monotonic() < end:
    s = rng.choice(socks)
    kind = rng.random()
    if kind < 0.7:
        hdr = MGMT.pack(0, word(32), word(32), word(32) - (1 << 31), word(64), word(32), word(32), word(32),
                        word(32), word(32), rng.choice(codes), word(8), word(8))
        body = os.urandom(rng.choice([0, 1, 7, 8, 16, 20, 32, 64, 200, 511, 512, 1500, 2000]))
        if rng.random() < 0.3 and len(body) >= 8:
            body = struct.pack("!Q", rng.getrandbits(64)) + body[8:]
        pkt = hdr + body
        if rng.random() < 0.1:
            pkt = pkt[: rng.randrange(len(pkt))]
    elif kind < 0.9:
        pkt = struct.pack("!I", word(32)) + os.urandom(rng.randrange(0, 1500))
    else:
        pkt = os.urandom(rng.randrange(0, 64))
    try:
        s.sendto(pkt, dst)
        sent += 1
    except OSError:
        pass
    if sent % 500 == 0:
        time.sleep(0.01)
        for t in socks:
            try:
                while t.recv(65536):
                    pass
            except OSError:
                pass
print("sent", sent, flush=True)
"""


def flow_req(s_eid: int, oap_bytes: bytes, name: str) -> bytes:
    header = MGMT.pack(0, s_eid, 0, 0, 0, 0xFFFFFFFF, 1, 1, 0xFFFFFFFF, 120000, 1, 0, 0)
    return header + hashlib.md5(name.encode()).digest() + oap_bytes


def legit(port: int) -> bool:
    """A plain 0.23 FLOW_REQ for pong from CLIENT_IP gets response 0 and a valid OAP response."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((CLIENT_IP, 0))
    s.settimeout(5)
    req = oap.plain_request(os.urandom(16), time.time_ns())
    eid = int.from_bytes(os.urandom(3), "big") + 1
    s.sendto(flow_req(eid, req, "pong"), (IPCP_IP, port))
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            data = s.recv(9000)
            f = MGMT.unpack_from(data)
            if f[0] == 0 and f[10] == 2 and f[1] == eid:
                if f[3] != 0:
                    return False
                oap.check_response(oap.decode(req), data[MGMT.size :])
                return True
    except (TimeoutError, OSError, oap.OapError):
        return False
    finally:
        s.close()
    return False


def attack() -> bool:
    with lab("udpfuzz") as d, irmd(d, local=False) as ir:
        port = free_port([IPCP_IP, CLIENT_IP])
        ir.irm_ok("ipcp", "bootstrap", "type", "udp4", "name", "u", "layer", "lan", "ip", IPCP_IP, "port", str(port))
        ir.irm_ok("bind", "program", str(BIN / "oping"), "name", "pong")
        ir.irm_ok("name", "register", "pong", "layer", "lan")
        ping_srv = subprocess.Popen(
            [str(BIN / "oping"), "-l"],
            env=ir.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for(lambda: legit(port), 30, "a first legitimate FLOW_REQ to be answered")
            ipcp = ir.ipcp_pid("u")
            fuzzers = [
                nobody_popen(ir, FUZZER, IPCP_IP, str(port), FUZZ_NET, str(seed), "20", stdout=subprocess.PIPE)
                for seed in (1, 2)
            ]
            for f in fuzzers:
                f.wait(90)
                print("fuzzer:", f.stdout.read().strip() if f.stdout else "")
            alive = os.path.exists(f"/proc/{ipcp}") and ir.alive()
            ok = alive and legit(port)
            log = ir.log_text()
            bad = [ln for ln in log.splitlines() if "Traceback" in ln or "internal error" in ln.lower()]
            print(
                f"IPCP alive: {alive}; legitimate FLOW_REQ answered afterwards: {ok}; tracebacks/internal errors "
                f"in the log: {len(bad)}"
            )
            for ln in bad[:5]:
                print("  ", ln)
            return not ok or bool(bad)
        finally:
            stop(ping_srv)


if __name__ == "__main__":
    main(attack, 200)
