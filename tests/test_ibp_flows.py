"""IBP depots end to end: over local-layer flows (CLI and library), over TCP with a plain socket
client, depot-to-depot copy, crash recovery after SIGKILL, timeouts and bad input.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from helpers import BIN, IrmdProc, free_port, wait_for

from apps.ibp import wire as w
from apps.ibp.capability import Capability
from apps.ibp.client import Connection, parse_cap

Start = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def depots(irmd: IrmdProc, local_layer: str, tmp_path: Path, default_client: None) -> Iterator[Start]:
    """start(name, *extra) runs `ibp depot` registered in the local layer; all are killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *extra: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [str(BIN / "ibp"), "depot", "--name", name, "--dir", str(tmp_path / name), "--layer", local_layer, *extra],
            env=irmd.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        procs.append(proc)

        def up() -> bool:
            assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
            try:
                with Connection(name, timeout=2) as c:
                    return bool(c.status())
            except w.IbpError as e:
                return e.status == w.IBP_E_WRONG_PASSWD  # it answers: started with its own --password

        wait_for(up, 15, f"depot {name}", interval=0.1)
        return proc

    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def ibp(irmd: IrmdProc, *args: str, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(BIN / "ibp"), *args], env=irmd.env, input=stdin, capture_output=True, timeout=timeout)


def caps(out: bytes) -> dict[str, str]:
    return {c.rsplit("/", 1)[1]: c for c in out.decode().split()}


def test_cli_store_load_copy_mcopy_and_forged_cap(irmd: IrmdProc, depots: Start) -> None:
    for d in ("d1", "d2", "d3"):
        depots(d)
    data = os.urandom(1_500_000)
    r = ibp(irmd, "allocate", "d1", "--size", "2M", "--duration", "1h")
    assert r.returncode == 0, r.stderr
    c1 = caps(r.stdout)
    assert set(c1) == {"READ", "WRITE", "MANAGE"} and c1["READ"].startswith("ibp://d1/0#")
    assert ibp(irmd, "store", c1["WRITE"], stdin=data).returncode == 0
    assert ibp(irmd, "load", c1["READ"]).stdout == data
    assert ibp(irmd, "load", c1["READ"], "--offset", "10", "--length", "5").stdout == data[10:15]
    c2, c3 = (caps(ibp(irmd, "allocate", d, "--size", "2M", "--duration", "1h").stdout) for d in ("d2", "d3"))
    r = ibp(irmd, "mcopy", c1["READ"], c2["WRITE"], c3["WRITE"])
    assert r.returncode == 0, r.stderr
    assert ibp(irmd, "load", c2["READ"]).stdout == data
    assert ibp(irmd, "load", c3["READ"]).stdout == data
    forged = c1["READ"].replace("#", "#X", 1)
    r = ibp(irmd, "load", forged)
    assert r.returncode != 0 and b"capability not found" in r.stderr and not r.stdout
    wrong_right = (
        c1["READ"].rsplit("/", 2)[0]
        + "/"
        + caps(ibp(irmd, "allocate", "d1", "--size", "1k", "--duration", "60").stdout)["READ"].split("/")[-2]
    )
    assert ibp(irmd, "load", wrong_right + "/READ").returncode != 0
    status = ibp(irmd, "status", "d1").stdout.decode()
    assert "refused 2" in status and "allocations 2" in status


def test_cli_refusals_are_one_line_errors(irmd: IrmdProc, depots: Start) -> None:
    depots("d1", "--capacity", "4M", "--max-duration", "1h", "--client-share", "1")
    r = ibp(irmd, "allocate", "d1", "--size", "8M", "--duration", "60")
    assert r.returncode == 1 and b"would exceed limit" in r.stderr and r.stderr.count(b"\n") == 1
    r = ibp(irmd, "allocate", "d1", "--size", "1M", "--duration", "2h")
    assert r.returncode == 1 and b"duration too long" in r.stderr
    r = ibp(irmd, "allocate", "d1", "--size", "1M", "--duration", "60", "--type", "fifo")
    assert r.returncode == 1 and b"type not supported" in r.stderr
    c = caps(ibp(irmd, "allocate", "d1", "--size", "1k", "--duration", "60").stdout)
    r = ibp(irmd, "store", c["WRITE"], stdin=b"x" * 2000)
    assert r.returncode == 1 and b"would exceed limit" in r.stderr
    assert ibp(irmd, "load", c["READ"]).stdout == b""  # nothing of the refused store was kept
    r = ibp(irmd, "load", c["WRITE"])
    assert r.returncode == 2 or b"READ capability is needed" in r.stderr
    r = ibp(irmd, "load", "ibp://nosuch/0#k/t/READ", "--timeout", "3")
    assert r.returncode == 1 and b"cannot reach depot" in r.stderr
    assert b"Traceback" not in r.stderr


def test_cli_manage_probe_extend_decr_and_admin_status(irmd: IrmdProc, depots: Start, tmp_path: Path) -> None:
    depots("d1")
    c = caps(ibp(irmd, "allocate", "d1", "--size", "1k", "--duration", "60").stdout)
    ibp(irmd, "store", c["WRITE"], stdin=b"abc")
    probe = ibp(irmd, "manage", c["MANAGE"], "probe").stdout.decode()
    assert "size 3" in probe and "max_size 1024" in probe and "read_refs 1" in probe
    assert ibp(irmd, "manage", c["MANAGE"], "extend", "--duration", "2h").returncode == 0
    left = int(
        dict(ln.split() for ln in ibp(irmd, "manage", c["MANAGE"], "probe").stdout.decode().splitlines())[
            "seconds_left"
        ]
    )
    assert 7000 < left <= 7200
    assert ibp(irmd, "manage", c["READ"], "probe").returncode != 0  # a read cap cannot manage
    assert ibp(irmd, "manage", c["MANAGE"], "decr").returncode == 0
    assert ibp(irmd, "load", c["READ"]).returncode != 0  # the last read reference went: freed
    r = ibp(irmd, "status", "d1", "--capacity", "2G", "--admin-key", "wrong")
    assert r.returncode == 1 and b"wrong password" in r.stderr
    key = (tmp_path / "d1" / "admin.key").read_text().strip()
    r = ibp(irmd, "status", "d1", "--capacity", "2G", "--admin-key", key)
    assert r.returncode == 0 and f"capacity {2 << 30}" in r.stdout.decode()


def test_library_copy_and_acknowledged_bytes_survive_sigkill_mid_store(depots: Start) -> None:
    proc = depots("d1")
    with Connection("d1", timeout=10) as c:
        r, wcap, m = c.allocate(4 << 20, 3600)
        assert c.store(wcap, [b"a" * 1000, b"b" * 1000], 2000) == 2000
        c.call(w.Store(wcap.key, wcap.typekey, 1 << 20, 10))  # the depot now waits for 1 MiB
        c.stream.send(b"c" * 100_000)
        time.sleep(0.3)
        proc.kill()
        proc.wait()
    depots("d1")
    with Connection("d1", timeout=10) as c:
        assert c.load_bytes(r) == b"a" * 1000 + b"b" * 1000
        assert c.manage(m, w.IBP_PROBE)[2] == "2000"
        assert c.store(wcap, [b"d"], 1) == 1


def test_copies_to_a_depot_share_a_kept_flow_that_is_replaced_when_it_breaks(depots: Start) -> None:
    depots("d1")
    d2 = depots("d2")
    data = os.urandom(300_000)
    with Connection("d1", timeout=10) as c1:
        r, wcap, _ = c1.allocate(len(data), 600)
        c1.store(wcap, [data], len(data))
        accepted = []  # connections d2 took since it started
        for round_ in range(3):
            if round_ == 2:  # the target restarts: the flow the copier kept is gone
                d2.kill()
                d2.wait()
                d2 = depots("d2")
            with Connection("d2", timeout=10) as c2:
                r2, w2, _ = c2.allocate(len(data), 600)
                assert c1.copy(r, w2) == len(data)
                assert c2.load_bytes(r2) == data
                accepted.append(int(c2.status()["accepted"]))
    # depots() probes once; then each round our connection, and the copier's flow in rounds 1 and 3 only
    assert accepted == [3, 4, 3]


def test_server_side_timeout_drops_a_stalled_store(depots: Start) -> None:
    depots("d1")
    with Connection("d1", timeout=10) as c:
        r, wcap, _ = c.allocate(1000, 600)
        c.call(w.Store(wcap.key, wcap.typekey, 100, 1))  # a 1 s server timeout
        c.stream.send(b"x" * 10)
        assert c._reply().status == w.IBP_E_SERVER_TIMEOUT  # said, then closed
        with pytest.raises(w.IbpError, match="closed the connection"):
            c._reply()
    with Connection("d1", timeout=10) as c:
        assert c.load_bytes(r) == b""
        assert c.store(wcap, [b"fine"], 4) == 4


@pytest.fixture
def tcp_depot(depots: Start) -> int:
    port = free_port(["127.0.0.1"])
    depots("t1", "--listen", f"tcp:127.0.0.1:{port}")
    return port


def ask(f: BinaryIO, data: bytes) -> list[bytes]:
    """Send `data` on a plain socket file and return the next reply line's fields."""
    f.write(data)
    f.flush()
    return f.readline().split()


def test_plain_tcp_client_speaks_the_text_protocol(tcp_depot: int) -> None:
    with socket.create_connection(("127.0.0.1", tcp_depot), timeout=10) as s:
        f = s.makefile("rwb")
        status, rcap, wcap, _ = ask(f, b"1 1 0 1 1 3600 1000 10\n")
        assert status == b"1" and rcap.startswith(f"ibp://127.0.0.1:{tcp_depot}/0#".encode())
        r, wc = Capability.parse(rcap.decode()), Capability.parse(wcap.decode())
        assert ask(f, f"1 2 {wc.key} {wc.typekey} 11 10\n".encode()) == [b"1"]
        assert ask(f, b"hello world") == [b"1", b"11"]
        assert ask(f, f"1 8 {r.key} {r.typekey} 6 5 10\n".encode()) == [b"1", b"5"]
        assert f.read(5) == b"world"
        assert ask(f, b"1 42 nonsense\n")[0] == b"-43"  # no such command, as L-Store
        assert ask(f, f"1 8 {r.key} {r.typekey} 0 99 10\n".encode())[0] == b"-19"  # past the end
        assert ask(f, b"2 8 a b 0 1 10\n")[0] == b"-27"
        assert ask(f, b"1 4 0 1 - 10\n")[0] == b"-29"  # L-Store's depot wants its password
        n = int(ask(f, b"1 4 0 1 IBPch@ngem3 10\n")[1])
        assert b" CT:1073741824 " in f.read(n)
    # The capability handed out over TCP works with the library too.
    with Connection(f"127.0.0.1:{tcp_depot}", timeout=10) as c:
        assert c.load_bytes(parse_cap(rcap.decode())) == b"hello world"


def test_tcp_oversized_line_is_refused_and_closed(tcp_depot: int) -> None:
    with socket.create_connection(("127.0.0.1", tcp_depot), timeout=10) as s:
        s.sendall(b"1" * 10_000)
        f = s.makefile("rb")
        assert f.readline().split()[0] == b"-21"
        assert f.readline() == b""


def test_silent_depot_returns_control_to_the_client() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        start = time.monotonic()
        with Connection(f"127.0.0.1:{port}", timeout=1) as c, pytest.raises(w.IbpError) as e:
            c.allocate(10, 10)
        assert e.value.status == w.IBP_E_CLIENT_TIMEOUT and time.monotonic() - start < 5


def test_copy_to_a_silent_depot_fails_with_a_timeout_not_a_hang(depots: Start) -> None:
    depots("d1", "--copy-to", "127.0.0.1:*")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        with Connection("d1", timeout=2) as c:
            r, wcap, _ = c.allocate(100, 60)
            c.store(wcap, [b"x" * 100], 100)
            dead = Capability(f"127.0.0.1:{port}", "0", "k" * 64, "k" * 64, "WRITE")
            start = time.monotonic()
            with pytest.raises(w.IbpError) as e:
                c.copy(r, dead)
            assert e.value.status == w.IBP_E_CLIENT_TIMEOUT and "copy to 127.0.0.1" in e.value.reason
            assert time.monotonic() - start < 10
            assert c.load_bytes(r) == b"x" * 100  # the depot and the connection carry on


def test_encrypted_flows_store_load_and_copy(irmd: IrmdProc, depots: Start) -> None:
    depots("e1", "--encrypt")
    depots("e2")
    data = os.urandom(200_000)
    c1 = caps(ibp(irmd, "allocate", "e1", "--size", "1M", "--duration", "60", "--encrypt").stdout)
    c2 = caps(ibp(irmd, "allocate", "e2", "--size", "1M", "--duration", "60", "--encrypt").stdout)
    assert ibp(irmd, "store", c1["WRITE"], "--encrypt", stdin=data).returncode == 0
    assert ibp(irmd, "load", c1["READ"], "--encrypt").stdout == data
    r = ibp(irmd, "copy", c1["READ"], c2["WRITE"], "--encrypt")  # e1 copies over an encrypted flow too
    assert r.returncode == 0, r.stderr
    assert ibp(irmd, "load", c2["READ"]).stdout == data


@pytest.mark.timeout(90)
def test_every_acknowledged_change_survives_a_kill_9_amid_others(depots: Start) -> None:
    """Four clients allocate and INCR at once, their records put on disk by shared syncs; the depot
    is killed (SIGKILL) while they go on. After a restart every allocation and every INCR a client
    was answered for is there (one sent but unanswered may be there or not)."""
    port = free_port(["127.0.0.1"])
    proc = depots("k9", "--listen", f"tcp:127.0.0.1:{port}")
    with Connection(f"127.0.0.1:{port}", timeout=10) as c:
        _, _, shared = c.allocate(100, 3600)
    acked: list[Capability] = []  # manage capabilities of acknowledged allocations
    incrs = {"acked": 0, "sent": 0}
    lock = threading.Lock()

    def client() -> None:
        with contextlib.suppress(OSError, w.IbpError), socket.create_connection(("127.0.0.1", port), 10) as s:
            f = s.makefile("rb")
            for _ in range(500):  # bounded: the kill ends it well before
                s.sendall(b"1 1 0 1 1 3600 10 10\n")
                reply = f.readline().split()
                if reply[:1] != [b"1"]:
                    return
                with lock:
                    acked.append(Capability.parse(reply[3].decode()))
                    incrs["sent"] += 1
                s.sendall(f"1 9 {shared.key} {shared.typekey} {w.IBP_INCR} 1 10\n".encode())
                if f.readline().split()[:1] != [b"1"]:
                    return
                with lock:
                    incrs["acked"] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked) >= 40, 30, "changes to be acknowledged", interval=0.01)
    proc.kill()  # right after acknowledged requests, while others are under way
    proc.wait()
    for t in threads:
        t.join(10)
    depots("k9", "--listen", f"tcp:127.0.0.1:{port}")
    with Connection(f"127.0.0.1:{port}", timeout=10) as c:
        assert all(c.probe(m)["max_size"] == 10 for m in acked)
        assert 1 + incrs["acked"] <= c.probe(shared)["read_refs"] <= 1 + incrs["sent"]
