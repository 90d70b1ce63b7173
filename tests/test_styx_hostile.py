"""A hostile 9P peer (uid 65534) against a real `styx serve`: malformed, oversized and
out-of-order messages, fid and connection exhaustion, silent flows, hang-ups mid-handshake
and floods. Each asserts the server answers or hangs up as specified, stays within bounded
memory and CPU, and serves a legitimate client meanwhile."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import IrmdProc, wait_for
from test_styx_e2e import stop
from test_styx_trust import (
    AS_NOBODY,
    CHECKOUT,
    SERVE_LOCAL_NAME,
    Probe,
    as_nobody,
    lab,
    needs_root,
    open_irmd,
    popen_nobody,
    probe,
    result,
    root_client,
    serve,
)

from apps.styx import wire as w

pytestmark = needs_root
__all__ = ["lab", "open_irmd", "probe"]  # fixtures shared with the trust tests

ATTACH_TIMEOUT = 2.0
SEND_TIMEOUT = 2.0
MAX_FIDS = 64
PER_USER = 4


@pytest.fixture
def files(open_irmd: IrmdProc, lab: Path) -> Iterator[subprocess.Popen[bytes]]:
    export = lab / "export"
    export.mkdir()
    (export / "hello.txt").write_text("hello\n")
    proc = serve(
        open_irmd,
        lab,
        "files",
        "--root",
        str(export),
        "--attach-timeout",
        str(ATTACH_TIMEOUT),
        "--send-timeout",
        str(SEND_TIMEOUT),
        "--max-fids",
        str(MAX_FIDS),
        "--max-conns-per-user",
        str(PER_USER),
    )
    try:
        yield proc
    finally:
        stop(proc)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def legit_ok(irmd: IrmdProc, within: float = 5.0) -> float:
    """A root client lists and reads; returns how long it took (and fails past `within`)."""
    t0 = time.monotonic()
    with root_client(irmd, "files") as c:
        assert [s.name for s in c.ls("/")] == ["hello.txt"]
        assert c.cat("hello.txt") == b"hello\n"
    took = time.monotonic() - t0
    assert took < within, f"a legitimate client took {took:.1f} s"
    return took


# Raw 9P over a flow: argv = NAME, then a JSON list of hex messages; prints each reply (hex or an error).
RAW = r"""
import json, sys
from flowlib import flow_alloc, qos, FlowError
name, msgs = sys.argv[1], json.loads(sys.argv[2])
f = flow_alloc(name, qos=qos.data, timeout=10)
f.set_timeout(5)
out = []
for hexmsg in msgs:
    try:
        f.write(bytes.fromhex(hexmsg))
        out.append(f.read().hex())
    except FlowError as e:
        out.append("ended: " + str(e))
        break
print(json.dumps({"replies": out}))
"""


def t(msg: w.Msg) -> str:
    return w.encode(msg).hex()


def raw(tag: int, mtype: int, body: bytes = b"", size: int | None = None) -> str:
    size = 7 + len(body) if size is None else size
    return (struct.pack("<IBH", size, mtype, tag) + body).hex()


def test_malformed_and_out_of_order_messages_are_answered_and_the_server_goes_on(
    open_irmd: IrmdProc, files: subprocess.Popen[bytes]
) -> None:
    version = t(w.Tversion(w.NOTAG, 8192, "9P2000"))
    bad_utf8 = struct.pack("<IIH", 0, w.NOFID, 2) + b"\xff\xfe" + struct.pack("<H", 0)
    # Each message, and what its reply must be: an Rerror with these words, or this reply type.
    cases: list[tuple[str, str | type[w.Msg]]] = [
        (t(w.Tattach(1, 0, w.NOFID, "root", "")), "Tversion first"),
        (t(w.Tread(2, 0, 0, 10)), "Tversion first"),
        (version, w.Rversion),
        ("01", "shorter than the 7-byte header"),
        (raw(3, 200), "unknown message type"),
        (raw(4, w.TWALK, b"\x00" * 3), "truncated"),
        (raw(5, w.TCLUNK, struct.pack("<I", 0), size=0xFFFFFFFF), "size field says"),
        (raw(6, w.TATTACH, bad_utf8), "not valid UTF-8"),
        (raw(7, w.TWALK, struct.pack("<IIH", 0, 1, 17) + b"\x01\x00a" * 17), "17 walk elements"),
        (t(w.Rread(8, b"reply as a request")), "Rread is not a request"),
        (t(w.Tread(9, 42, 0, 10)), "fid unknown or out of range"),
        (t(w.Tflush(10, 999)), w.Rflush),
        (t(w.Twrite(11, 0, 0, bytes(9000))), "exceeds msize 8192"),
        (t(w.Tattach(12, 0, w.NOFID, "root", "")), w.Rattach),  # claims root: is nobody
        (t(w.Tattach(13, 0, w.NOFID, "root", "")), "fid already in use"),
        (t(w.Twalk(14, 0, 1, ["..", "..", "etc", "passwd"])), w.Rwalk),
        (t(w.Tcreate(15, 0, "x", 0o644, w.OWRITE)), "permission denied"),
        (t(w.Tversion(w.NOTAG, 0, "9P2000")), "too small"),
        (version, w.Rversion),
        *[(os.urandom(n).hex(), "") for n in (7, 9, 64, 300)],  # anything, as long as it is an answer
    ]
    out = result(as_nobody(open_irmd, RAW, "files", json.dumps([hexmsg for hexmsg, _ in cases])))
    replies = out["replies"]
    assert isinstance(replies, list) and len(replies) == len(cases), replies
    for (_, expect), reply_hex in zip(cases, replies, strict=True):
        reply = w.decode(bytes.fromhex(reply_hex))  # every reply is well formed
        if isinstance(expect, str):
            assert isinstance(reply, w.Rerror) and expect in reply.ename, (expect, reply)
        else:
            assert isinstance(reply, expect), (expect, reply)
            if isinstance(reply, w.Rwalk):
                assert len(reply.wqid) < 4  # stopped at the root
    assert files.poll() is None
    legit_ok(open_irmd)


EXHAUST = r"""
import json, sys, time
from apps.styx import wire as w
from flowlib import flow_alloc, qos, FlowError
name, conns, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
out = {"refused": [], "fids": 0}
flows = []
for i in range(conns):
    f = flow_alloc(name, qos=qos.data, timeout=10)
    f.set_timeout(5)
    flows.append(f)
    f.write(w.encode(w.Tversion(w.NOTAG, 8192, "9P2000")))
    r = w.decode(f.read())
    if isinstance(r, w.Rerror):
        out["refused"].append(r.ename)
        continue
    f.write(w.encode(w.Tattach(1, 0, w.NOFID, "x", "")))
    w.decode(f.read())
f = flows[0]
for fid in range(1, 10000):
    f.write(w.encode(w.Twalk(2, 0, fid, [])))
    r = w.decode(f.read())
    if isinstance(r, w.Rerror):
        out["fid_error"] = r.ename
        break
    out["fids"] += 1
print(json.dumps(out), flush=True)
time.sleep(hold)
"""


def test_fid_and_connection_exhaustion_stop_at_the_limits_and_others_are_served(
    open_irmd: IrmdProc, files: subprocess.Popen[bytes]
) -> None:
    rss0 = rss_mb(files.pid)
    hog = popen_nobody(open_irmd, EXHAUST, "files", str(PER_USER + 3), "8")
    try:
        assert hog.stdout is not None
        line = hog.stdout.readline()
        assert line, hog.stderr.read() if hog.poll() is not None else "no output"
        out = json.loads(line)
        assert out["refused"] == [f"too many connections from user nobody (limit {PER_USER})"] * 3
        assert out["fids"] == MAX_FIDS - 1 and "too many fids" in out["fid_error"]
        legit_ok(open_irmd)  # while the attacker holds everything it may
        assert rss_mb(files.pid) - rss0 < 40
    finally:
        hog.kill()
        hog.wait()
    assert files.poll() is None


SILENT = r"""
import json, sys, time
from flowlib import flow_alloc, qos, FlowError
f = flow_alloc(sys.argv[1], qos=qos.data, timeout=10)
f.set_timeout(float(sys.argv[2]))
t0 = time.monotonic()
try:
    f.read()
    how = "data"
except FlowError as e:
    how = type(e).__name__
print(json.dumps({"after": time.monotonic() - t0, "how": how}))
"""


def test_a_silent_flow_is_hung_up_after_the_attach_timeout(open_irmd: IrmdProc, files: subprocess.Popen[bytes]) -> None:
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    silent = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", SILENT, "files", "20"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        legit_ok(open_irmd)  # meanwhile
        out_text, err = silent.communicate(timeout=30)
    finally:
        if silent.poll() is None:
            silent.kill()
    out = json.loads(out_text or "{}")
    assert out.get("how") == "FlowDown", err
    assert ATTACH_TIMEOUT - 0.5 < out["after"] < ATTACH_TIMEOUT + 5


HANDSHAKE = r"""
import os, sys, time
from flowlib.irm import IrmClient
from flowlib import crypto
from flowlib.qos import QosSpec
mode, name = sys.argv[1], sys.argv[2]
irm = IrmClient()
reply, fd = irm.alloc(name, QosSpec(cypher_s=256), 5.0)  # the encrypted flow, not made a Flow of
if mode == "forged":  # the shape of a sealed packet (IV, ciphertext, tag), under no key of this flow
    os.write(fd, os.urandom(crypto.OVERHEAD + 32))
elif mode == "garbage":
    os.write(fd, b"xyz")
time.sleep(float(sys.argv[3]))
os.close(fd)
irm.dealloc(reply.flow_id)
"""


def test_hang_ups_garbage_and_forged_packets_on_new_encrypted_flows_harm_only_their_own_flow(
    open_irmd: IrmdProc, files: subprocess.Popen[bytes]
) -> None:
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    stall = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", HANDSHAKE, "silent", "files", "6"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    try:
        time.sleep(0.5)
        legit_ok(open_irmd, within=3.0)  # not stalled behind the silent flow
        for mode, hold in [("garbage", "0.3"), ("forged", "0.3"), ("silent", "0.5")]:
            r = as_nobody(open_irmd, HANDSHAKE, mode, "files", hold)
            assert r.returncode == 0, r.stderr
            assert files.poll() is None, f"the server died of a {mode} flow"
    finally:
        stall.wait(20)
    assert files.poll() is None
    legit_ok(open_irmd)


FLOOD = r"""
import json, os, sys
from apps.styx import wire as w
from flowlib import flow_alloc, qos
f = flow_alloc(sys.argv[1], qos=qos.data, timeout=10)
f.set_timeout(10)
n, got = int(sys.argv[2]), 0
junk = [os.urandom(k) for k in (7, 40, 500, 4000)]
for i in range(n):
    f.write(junk[i % 4])
    if i % 64 == 63:  # drain now and then, as a client must take its replies
        while got < i + 1 - 32:
            f.read(); got += 1
while got < n:
    f.read(); got += 1
print(json.dumps({"answered": got}))
"""


def test_a_flood_of_garbage_costs_bounded_memory_and_cpu_and_others_are_served(
    open_irmd: IrmdProc, files: subprocess.Popen[bytes]
) -> None:
    n = 4000
    rss0, cpu0 = rss_mb(files.pid), cpu_s(files.pid)
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    flood = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", FLOOD, "files", str(n)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        took = [legit_ok(open_irmd, within=10.0) for _ in range(3)]  # during the flood
        out_text, err = flood.communicate(timeout=60)
    finally:
        if flood.poll() is None:
            flood.kill()
    assert json.loads(out_text or "{}").get("answered") == n, err  # every message got its Rerror
    assert files.poll() is None
    grew, spent = rss_mb(files.pid) - rss0, cpu_s(files.pid) - cpu0
    print(
        f"flood of {n}: server +{grew:.1f} MB, {1000 * spent / n:.2f} ms CPU per message, "
        f"legitimate client {max(took):.2f} s at worst"
    )
    assert grew < 30, f"the server grew {grew:.0f} MB"
    assert spent / n < 0.005, f"{spent:.1f} s of CPU for {n} messages"  # milliseconds per message, no more
    assert max(took) < 10.0


# A client attached as whoever it is: the flow `f`, version and attach done, msize 8192.
ATTACHED = r"""
import json, sys, time
from apps.styx import wire as w
from flowlib import flow_alloc, qos, FlowError, FlowTimeout
f = flow_alloc(sys.argv[1], qos=qos.data, timeout=10)
f.set_timeout(5)
for msg in (w.Tversion(w.NOTAG, 8192, "9P2000"), w.Tattach(1, 0, w.NOFID, "x", "")):
    f.write(w.encode(msg))
    f.read()
"""

DEAF = (
    ATTACHED
    + r"""
f.set_timeout(1)
sent = 0
try:
    while sent < 500000:  # requests, never reading a reply
        f.write(w.encode(w.Tstat(sent % 60000, 0)))
        sent += 1
except FlowTimeout:
    pass  # the server stopped taking them: its replies have nowhere to go
time.sleep(float(sys.argv[2]) + 3)
f.set_timeout(5)
read, how = 0, "still open"
try:
    while True:
        f.read()
        read += 1
except FlowError as e:
    how = type(e).__name__
print(json.dumps({"sent": sent, "read": read, "how": how}))
"""
)


def test_a_client_that_takes_no_replies_is_dropped_after_the_send_timeout(
    open_irmd: IrmdProc, files: subprocess.Popen[bytes]
) -> None:
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    deaf = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", DEAF, "files", str(SEND_TIMEOUT)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        time.sleep(1)
        legit_ok(open_irmd)  # while the deaf client's session is blocked on its replies
        out_text, err = deaf.communicate(timeout=50)
    finally:
        if deaf.poll() is None:
            deaf.kill()
    out = json.loads(out_text or "{}")
    assert out.get("how") == "FlowDown", (out, err)  # the server hung up on it
    assert out["read"] < out["sent"]  # not every reply was ever sent
    assert files.poll() is None
    legit_ok(open_irmd)


PIECES = (
    ATTACHED
    + r"""
big = w.encode(w.Twrite(2, 0, 0, bytes(6000)))
f.write(big[:5000])  # a message in pieces: the rest must follow, and nothing else
f.write(big[5000:] + bytes(2000))  # runs past the end of its message
try:
    f.read()
    how = "answered"
except FlowError as e:
    how = type(e).__name__
print(json.dumps({"how": how}))
"""
)


def test_a_piece_running_past_its_message_ends_that_connection_only(
    open_irmd: IrmdProc, files: subprocess.Popen[bytes]
) -> None:
    out = result(as_nobody(open_irmd, PIECES, "files"))
    assert out["how"] == "FlowDown"
    assert files.poll() is None
    legit_ok(open_irmd)


# The start of a net/ conversation script: 9P to the server at argv[1], a conversation cloned and
# its ctl written argv[2] (`connect NAME ...`), its data file open as fid `data`.
NET_DATA = r"""
import json, sys, time
from apps.styx import wire as w
from apps.styx.client import Client
from apps.styx.transport import TransportTimeout, dial
c = Client(dial(sys.argv[1]))
fid = c.walk("net/clone")
c.open(fid, w.ORDWR)
n = c.read(fid, 0, 32).decode()
c.write(fid, 0, sys.argv[2].encode())
data = c.walk(f"net/{n}/data")
c.open(data, w.ORDWR)
"""

# A net/ conversation to a peer that takes nothing (the probe accepts flows and never reads them):
# Twrites of its data file until one is not answered, then a Tflush of it and a Tstat beside it.
STUCK_WRITE = (
    NET_DATA
    + r"""
out = {"sent": 0}
t0 = time.monotonic()
while time.monotonic() - t0 < 30:
    tag = c._send(w.Twrite(0, data, 0, bytes(c.iounit)))
    try:
        out["sent"] += c._receive(3).count
    except TransportTimeout:
        out["stalled"] = True
        break
for msg in (w.Tflush(0, tag), w.Tstat(0, c.root)):
    c._send(msg)
    try:
        out[type(msg).__name__] = type(c._receive(3)).__name__
    except TransportTimeout:
        out[type(msg).__name__] = "no answer"
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""
)


@pytest.mark.timeout(120)
def test_a_net_write_its_peer_never_takes_waits_flushable_and_holds_nothing_once_the_client_left(
    open_irmd: IrmdProc, lab: Path, probe: Probe
) -> None:
    """A data write waits for the flow's window as a read waits for data: parked, so the connection
    goes on answering and a Tflush ends it, not on the connection's thread, where nothing could end
    it and the connection's slot stayed taken after the client left."""
    proc = serve(open_irmd, lab, "irm5", "--irm", "--max-conns-per-user", "1")
    hog = popen_nobody(open_irmd, STUCK_WRITE, "irm5", "connect probe", stdin=True)
    try:
        assert hog.stdout is not None
        line = hog.stdout.readline()
        assert line, hog.communicate(timeout=10)[1]
        out = json.loads(line)
        assert out.get("stalled") and out["sent"] > 0, out
        assert out["Tflush"] == "Rflush" and out["Tstat"] == "Rstat", out
        hog.kill()
        hog.wait()
        # The hog's one slot is free again: the same user connects and is served.
        ls = "from apps.styx.client import Client\nfrom apps.styx.transport import dial\n"
        ls += "import sys\nprint(sorted(s.name for s in Client(dial(sys.argv[1])).ls('net')))"
        wait_for(lambda: as_nobody(open_irmd, ls, "irm5").returncode == 0, 15, "the hog's slot to be free")
        with root_client(open_irmd, "irm5") as c:  # and others beside it
            assert "clone" in [s.name for s in c.ls("net")]
    finally:
        hog.kill()
        hog.wait()
        stop(proc)


# A name whose flows, once accepted, get one empty record (a keepalive's shape) and then nothing.
TEASER = (
    SERVE_LOCAL_NAME
    + r"""
while True:
    flows.append(flow_accept(irm=irm))
    os.write(flows[-1].fileno(), b"")
    if len(sys.argv) > 2:  # and later an SDU
        time.sleep(float(sys.argv[2]))
        flows[-1].write(b"late")
"""
)

# A raw net/ conversation to the teaser: a Tread of its data file, then a Tflush of it and a Tstat.
TEASED_READ = (
    NET_DATA
    + r"""
out = {}
time.sleep(1)  # the empty record is there


def ask(msg):
    tag = c._send(msg)
    try:
        out[type(msg).__name__] = type(c._receive(3)).__name__
    except TransportTimeout:
        out[type(msg).__name__] = "no answer"
    return tag


read = ask(w.Tread(0, data, 0, 100))
ask(w.Tflush(0, read))
ask(w.Tstat(0, c.root))
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""
)


@pytest.mark.timeout(120)
def test_a_net_read_woken_by_an_empty_record_waits_flushable_and_holds_nothing_once_the_client_left(
    open_irmd: IrmdProc, lab: Path
) -> None:
    """A flow readable for a record that carries no SDU (a keepalive) is no SDU to return: the read
    waits parked for the next, as it would have before the record came, not on the connection's
    thread, which the peer would hold for as long as it sent nothing more."""
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    teaser = subprocess.Popen([sys.executable, "-c", TEASER, "teaser"], env=env, stdout=subprocess.PIPE, text=True)
    proc = hog = None
    try:
        assert teaser.stdout is not None and teaser.stdout.readline().strip() == "ready"
        proc = serve(open_irmd, lab, "irm6", "--irm", "--max-conns-per-user", "1")
        hog = popen_nobody(open_irmd, TEASED_READ, "irm6", "connect teaser raw", stdin=True)
        assert hog.stdout is not None
        line = hog.stdout.readline()
        assert line, hog.communicate(timeout=10)[1]
        out = json.loads(line)
        assert out == {"Tread": "no answer", "Tflush": "Rflush", "Tstat": "Rstat"}, out
        hog.kill()
        hog.wait()
        ls = "from apps.styx.client import Client\nfrom apps.styx.transport import dial\n"
        ls += "import sys\nprint(sorted(s.name for s in Client(dial(sys.argv[1])).ls('net')))"
        wait_for(lambda: as_nobody(open_irmd, ls, "irm6").returncode == 0, 15, "the hog's slot to be free")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
        teaser.kill()
        teaser.wait()
        if proc is not None:
            stop(proc)


# 9P over a raw flow: a Tread of a net/ conversation's data parked, then an empty record on the 9P
# flow itself while it waits; the conversation's peer sends an SDU 2 s later.
TEASED_SERVER = r"""
import json, os, sys, time
from apps.styx import wire as w
from flowlib import flow_alloc, qos
f = flow_alloc(sys.argv[1], qos=qos.raw, timeout=10)
f.set_timeout(6)
def rpc(msg):
    f.write(w.encode(msg))
    return w.decode(f.read())
rpc(w.Tversion(w.NOTAG, 8192, "9P2000"))
rpc(w.Tattach(1, 0, w.NOFID, "x", ""))
rpc(w.Twalk(1, 0, 1, ["net", "clone"]))
rpc(w.Topen(1, 1, w.ORDWR))
n = bytes(rpc(w.Tread(1, 1, 0, 32)).data).decode()
rpc(w.Twrite(1, 1, 0, b"connect teaser raw"))
rpc(w.Twalk(1, 0, 2, ["net", n, "data"]))
rpc(w.Topen(1, 2, w.OREAD))
f.write(w.encode(w.Tread(2, 2, 0, 100)))  # parked: nothing came yet but the empty record
time.sleep(0.5)
os.write(f.fileno(), b"")
t0 = time.monotonic()
try:
    reply = w.decode(f.read())
    data = bytes(getattr(reply, "data", b"")).decode()
    out = {"reply": type(reply).__name__, "data": data, "after": time.monotonic() - t0}
except Exception as e:
    out = {"reply": type(e).__name__}
print(json.dumps(out), flush=True)
"""


@pytest.mark.timeout(120)
def test_an_empty_record_on_a_clients_flow_does_not_hold_its_parked_requests(open_irmd: IrmdProc, lab: Path) -> None:
    """While requests are parked, the client's own flow readable for a record with no message in it
    (a raw flow's keepalive) is no message to wait for: a parked read is answered when its data
    comes, not once the client happens to send its next request."""
    env = dict(open_irmd.env, PYTHONPATH=str(CHECKOUT))
    teaser = subprocess.Popen([sys.executable, "-c", TEASER, "teaser", "2"], env=env, stdout=subprocess.PIPE, text=True)
    proc = None
    try:
        assert teaser.stdout is not None and teaser.stdout.readline().strip() == "ready"
        proc = serve(open_irmd, lab, "irm7", "--irm")
        out = result(as_nobody(open_irmd, TEASED_SERVER, "irm7"))
        assert out["reply"] == "Rread" and out["data"] == "late", out
        assert out["after"] < 4, out
    finally:
        teaser.kill()
        teaser.wait()
        if proc is not None:
            stop(proc)


# Holds `hold` connections attached, then allocates flow after flow to the server for `secs` seconds,
# each closed at once (past the limit, each is refused; within it, each is a connection come and gone).
KNOCK = r"""
import json, sys, time
from apps.styx import wire as w
from flowlib import flow_alloc, qos, FlowError
name, hold, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
held = []
for _ in range(hold):
    f = flow_alloc(name, qos=qos.data, timeout=10)
    f.set_timeout(5)
    f.write(w.encode(w.Tversion(w.NOTAG, 8192, "9P2000")))
    assert isinstance(w.decode(f.read()), w.Rversion)
    f.write(w.encode(w.Tattach(1, 0, w.NOFID, "x", "")))
    assert isinstance(w.decode(f.read()), w.Rattach)
    held.append(f)
knocks, end = 0, time.monotonic() + secs
while time.monotonic() < end:
    try:
        f = flow_alloc(name, qos=qos.data, timeout=10)
    except FlowError:
        continue
    knocks += 1
    f.close()
print(json.dumps({"knocks": knocks}), flush=True)
"""


@pytest.mark.timeout(180)
def test_connections_refused_or_come_and_gone_in_a_loop_do_not_fill_the_servers_log(
    open_irmd: IrmdProc, lab: Path, files: subprocess.Popen[bytes]
) -> None:
    """A user allocating flows to a root server in a loop, at its connection limit (each refused) or
    within it (each a connection come and gone), wrote a line or two of the server's log per flow,
    ~500 lines a second; now refusals and connections are logged at a bounded rate, the rest counted."""
    log = lab / "files.log"
    secs = 4.0
    for hold in (PER_USER, 0):
        before = len(log.read_text())
        out = result(as_nobody(open_irmd, KNOCK, "files", str(hold), str(secs), timeout=90))
        knocks = out["knocks"]
        assert isinstance(knocks, int) and knocks > 100, out  # far past what the log takes in that time
        legit_ok(open_irmd)  # root is served beside it
        time.sleep(0.5)
        lines = log.read_text()[before:].splitlines()
        # refusals 10 lines a second (bursts of 20), connections 10 (bursts of 50), a second's slack each
        assert len(lines) <= 70 + 20 * (secs + 1), f"{len(lines)} lines for {knocks} flows: {lines[-3:]}"
        if hold:
            assert any("too many connections from user nobody" in line for line in lines), lines[:3]
        assert any("lines not logged" in line for line in lines), lines[:3]  # what was not logged is counted
    assert files.poll() is None


# Sessions one after another, each attached and listing ipcp/ (its agent started): `count` of them, for
# `secs` seconds at least (and 60 at most), and how long they took.
SESSIONS = r"""
import json, sys, time
from apps.styx.client import Client
from apps.styx.transport import dial
n, start = 0, time.monotonic()
while (n < int(sys.argv[3]) or time.monotonic() < start + float(sys.argv[2])) and time.monotonic() < start + 60:
    with Client(dial(sys.argv[1])) as c:
        c.ls("ipcp")
    n += 1
print(json.dumps({"sessions": n, "secs": time.monotonic() - start}))
"""


@pytest.mark.timeout(180)
def test_sessions_whose_agents_come_and_go_in_a_loop_do_not_fill_the_servers_log(
    open_irmd: IrmdProc, lab: Path
) -> None:
    """Each session of a root `styx serve --irm` that asks the IRMd anything starts an agent as its user,
    and each agent started wrote a line: a user opening sessions in a loop wrote them as fast as the
    server forked. Agents are logged at a bounded rate, the rest counted."""
    proc = serve(open_irmd, lab, "irm7", "--irm")
    log = lab / "irm7.log"
    try:
        before = len(log.read_text())
        out = result(as_nobody(open_irmd, SESSIONS, "irm7", "4", "80", timeout=90))
        sessions, secs = out["sessions"], out["secs"]
        assert isinstance(sessions, int) and isinstance(secs, float), out
        bound = 10 + 2 * (secs + 1)  # 2 lines a second (bursts of 10) and a second's slack
        assert sessions >= 80 and sessions > bound, out  # past what the log takes in that time
        time.sleep(0.5)
        lines = log.read_text()[before:].splitlines()
        agents = [line for line in lines if "agent" in line and "for nobody" in line]
        assert 1 <= len(agents) <= bound, f"{len(agents)} agents logged for {sessions} sessions in {secs:.1f} s"
        with root_client(open_irmd, "irm7") as c:  # root is served beside it
            assert c.cat("ctl").startswith(b"write")
    finally:
        stop(proc)
