"""Flows as file descriptors over the local layer, used in-process through flowlib."""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import IrmdProc, Pair, accepted_pair, pid_alive, wait_for

import flowlib
from flowlib import fccntl as fc
from flowlib import qos
from flowlib.errors import (
    FlowDown,
    FlowError,
    FlowTimeout,
    FlowWouldBlock,
    InvalidArgument,
    NameNotFound,
    PermissionDenied,
)
from flowlib.events import EventQueue, EventType, FlowSet, fevent
from flowlib.fccntl import FLOWFRNONBLOCK, Fccntl
from flowlib.flow import Flow, flow_accept, flow_alloc
from flowlib.frct import APP_MTU
from flowlib.irm import IrmClient
from flowlib.stats import FlowStats, FrctStats, IpcpStats


@pytest.fixture
def pair(client_factory: Callable[[], IrmClient], bound_name: str) -> Iterator[Pair]:
    cli, srv = accepted_pair(client_factory(), client_factory(), bound_name)
    yield cli, srv
    cli.close()
    srv.close()


def echo_in_thread(flow: Flow) -> threading.Thread:
    """Echo every SDU on `flow` until it goes down."""

    def run() -> None:
        try:
            while True:
                flow.write(flow.read())
        except FlowError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def poll_events(fset: FlowSet, want: int, timeout: float) -> list[tuple[Flow, EventType]]:
    """fevent until `want` events were seen or `timeout` passed."""
    got: list[tuple[Flow, EventType]] = []
    q = EventQueue()
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        fevent(fset, q, max(deadline - time.monotonic(), 0))
        got += [(e.flow, e.type) for e in q]
    return got


# -- allocation -------------------------------------------------------------------


def test_accepted_flow_reports_name_layer_and_mtu(pair: Pair, bound_name: str, local_layer: str) -> None:
    cli, srv = pair
    assert (cli.name, cli.layer, cli.mtu) == (bound_name, local_layer, 65535)
    assert (srv.name, srv.layer, srv.mtu) == (bound_name, local_layer, 65535)
    assert cli.flow_id != srv.flow_id


@pytest.mark.parametrize("spec", [qos.raw_no_errors, qos.data], ids=["crc", "frct"])
def test_a_local_flow_asking_for_no_errors_needs_no_crc(
    client_factory: Callable[[], IrmClient], bound_name: str, spec: qos.QosSpec
) -> None:
    """A local layer's flow is a kernel socket end to end: both ends are told so and add no trailer
    (as Linux skips checksums on loopback); the QoS both see still says ber 0."""
    server, client = client_factory(), client_factory()
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(flow_accept, timeout=10, irm=server)
        cli = flow_alloc(bound_name, spec, 10, irm=client)
        srv = accepted.result(timeout=15)
    with cli, srv:
        assert cli.qos.ber == srv.qos.ber == 0
        if spec is qos.raw_no_errors:
            assert cli.mtu == srv.mtu == 65535  # no 4 bytes kept for a trailer
        else:
            assert cli._session is not None and srv._session is not None
            assert not cli._session.crc and not srv._session.crc
        cli.write(b"x" * 1000)
        assert srv.read() == b"x" * 1000


def test_flow_is_a_selectable_file_descriptor(pair: Pair) -> None:
    cli, srv = pair
    assert select.select([srv], [], [], 0)[0] == []
    cli.write(b"ping")
    assert select.select([srv], [], [], 5)[0] == [srv]
    assert os.fstat(srv.fileno()).st_mode  # a real fd of this process


def test_requested_qos_reaches_both_ends(client_factory: Callable[[], IrmClient], bound_name: str) -> None:
    cli, srv = accepted_pair(client_factory(), client_factory(), bound_name, qos.voice)
    with cli, srv:
        assert cli.fccntl(Fccntl.GQOSSPEC) == qos.voice
        assert srv.qos == qos.voice


def test_allocating_an_unregistered_name_raises_name_not_found_fast(
    client_factory: Callable[[], IrmClient], local_layer: str
) -> None:
    start = time.monotonic()
    with pytest.raises(NameNotFound, match="not found"):
        client_factory().alloc("nobody", None, 10)
    assert time.monotonic() - start < 5


def test_allocation_fails_once_the_name_is_unregistered(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str, local_layer: str
) -> None:
    server, client = client_factory(), client_factory()
    cli, srv = accepted_pair(server, client, bound_name)
    cli.close()
    srv.close()
    irmd.irm_ok("name", "unregister", bound_name, "layer", local_layer)
    with pytest.raises(NameNotFound, match="not found"):
        client.alloc(bound_name, None, 10)


def test_allocation_honours_its_timeout_when_the_server_never_accepts(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], local_layer: str
) -> None:
    irmd.irm_ok("bind", "program", "sleep", "name", "mute", "auto", "--", "30")  # started, never accepts
    irmd.irm_ok("name", "register", "mute", "layer", local_layer)
    start = time.monotonic()
    with pytest.raises(FlowTimeout):
        client_factory().alloc("mute", None, 1.0)
    assert time.monotonic() - start < 4


def test_allocation_timeout_error_says_what_happened(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], local_layer: str
) -> None:
    irmd.irm_ok("bind", "program", "sleep", "name", "mute", "auto", "--", "30")
    irmd.irm_ok("name", "register", "mute", "layer", local_layer)
    with pytest.raises(FlowTimeout) as err:
        client_factory().alloc("mute", None, 0.5)
    assert not str(err.value).rstrip().endswith(":"), f"empty reason in {str(err.value)!r}"


def test_accept_times_out_when_no_flow_arrives(client_factory: Callable[[], IrmClient], bound_name: str) -> None:
    start = time.monotonic()
    with pytest.raises(FlowTimeout):
        client_factory().accept(0.3)
    assert 0.25 < time.monotonic() - start < 3


def test_direct_ipc_a_flow_between_one_users_processes_needs_no_ipcp(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    """Direct IPC (0.23's): the IRMd makes the socket pair itself when the server ready to accept is the
    allocator's user, so a stopped local IPCP holds nothing up; the arrival is served as ever (the
    acceptor learns who allocated) and each end learns that the other let go."""
    server, client = client_factory(), client_factory()
    server.listen(True)  # ready before the allocation: only a process ready to accept is taken directly
    lo = irmd.ipcp_pid("lo")
    os.kill(lo, signal.SIGSTOP)
    try:
        cli = Flow(*client.alloc(bound_name, None, 5), client)
        arrived = wait_for(server.take_arrived, 5, "the arrival")
        assert isinstance(arrived, list) and len(arrived) == 1
        srv = Flow(*arrived[0], server)
        assert (srv.peer_uid, srv.peer_pid) == (os.getuid(), os.getpid())
        cli.write(b"direct")
        srv.set_timeout(5)
        assert srv.read() == b"direct"
        cli.close()
        with pytest.raises(FlowDown, match="deallocated by the peer"):
            srv.read()
        srv.close()
    finally:
        os.kill(lo, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_a_forked_child_allocates_through_a_connection_and_engine_of_its_own(
    default_client: None, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    """The parent's IRMd connection and flow engine are told of the fork: the child's first flow makes
    its own (the parent's threads are not in the child, so using theirs would hang)."""
    server = client_factory()

    def serve() -> None:
        for _ in range(2):
            echo_in_thread(flow_accept(timeout=20, irm=server))

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    with flow_alloc(bound_name, qos.data, timeout=10) as first:  # the default client, and the engine (FRCT)
        first.set_timeout(10)
        first.write(b"parent")
        assert first.read() == b"parent"
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 only if its own flow echoes
            status = 1
            with contextlib.suppress(BaseException), flow_alloc(bound_name, qos.data, timeout=10) as own:
                own.set_timeout(10)
                own.write(b"child")
                status = 0 if own.read() == b"child" else 2
            os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        first.write(b"still")  # the parent's flow goes on
        assert first.read() == b"still"
    acceptor.join(10)


# -- data -------------------------------------------------------------------------

SIZES = sorted(
    {1, 2, 3, 65533, 65534, 65535}
    | {n + d for n in (2**k for k in range(3, 16)) for d in (-1, 0, 1)}
    | set(random.Random(1).sample(range(1, 65536), 100))
)


def test_sdus_of_every_size_arrive_intact_and_whole(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], local_layer: str
) -> None:
    irmd.irm_ok("bind", "process", str(os.getpid()), "name", "integrity")
    irmd.irm_ok("name", "register", "integrity", "layer", local_layer)
    cli, srv = accepted_pair(client_factory(), client_factory(), "integrity")
    echo_in_thread(srv)
    rng = random.Random(7)
    with cli, srv:
        for size in SIZES:
            sdu = rng.randbytes(size)
            assert cli.write(sdu) == size
            assert cli.read() == sdu, f"SDU of {size} bytes came back different"


def test_sdu_boundaries_are_kept_for_queued_sdus(pair: Pair) -> None:
    cli, srv = pair
    sdus = [bytes([i]) * (i * 100 + 1) for i in range(20)]
    for sdu in sdus:
        cli.write(sdu)
    assert [srv.read() for _ in sdus] == sdus


def test_both_directions_carry_data(pair: Pair) -> None:
    cli, srv = pair
    cli.write(b"request")
    assert srv.read() == b"request"
    srv.write(b"reply")
    assert cli.read() == b"reply"


def test_sdu_larger_than_the_mtu_raises_invalid_argument(pair: Pair) -> None:
    cli, _ = pair
    with pytest.raises(InvalidArgument, match="65536 bytes"):
        cli.write(bytes(cli.mtu + 1))


def test_empty_write_raises_invalid_argument(pair: Pair) -> None:
    cli, _ = pair
    with pytest.raises(InvalidArgument, match="0 bytes"):
        cli.write(b"")


# -- fccntl -----------------------------------------------------------------------


# C Ouroboros 0.23's include/ouroboros/fccntl.h, name for name, value for value.
C_FCCNTL = {
    "FLOWFRDONLY": 0,
    "FLOWFWRONLY": 0o1,
    "FLOWFRDWR": 0o2,
    "FLOWFACCMODE": 0o3,
    "FLOWFDOWN": 0o4,
    "FLOWFRNOBLOCK": 0o1000,
    "FLOWFWNOBLOCK": 0o2000,
    "FLOWFNONBLOCK": 0o3000,
    "FLOWFRNOPART": 0o10000,
    "FLOWFWNOPART": 0o20000,
    "FLOWFDEFAULT": 0o20002,
    "FRCTFRTX": 0o1,
    "FRCTFRESCNTL": 0o2,
    "FRCTFLINGER": 0o4,
    "FLOWSRCVTIMEO": 0o1,
    "FLOWGRCVTIMEO": 0o2,
    "FLOWSSNDTIMEO": 0o3,
    "FLOWGSNDTIMEO": 0o4,
    "FLOWGQOSSPEC": 0o5,
    "FLOWSFLAGS": 0o6,
    "FLOWGFLAGS": 0o7,
    "FLOWGRXQLEN": 0o10,
    "FLOWGTXQLEN": 0o11,
    "FRCTSFLAGS": 0o1000,
    "FRCTGFLAGS": 0o2000,
}


@pytest.mark.parametrize(("name", "value"), sorted(C_FCCNTL.items()))
def test_fccntl_names_and_values_are_cs(name: str, value: int) -> None:
    assert getattr(flowlib, name) == getattr(fc, name) == value


def test_the_older_command_names_stay_as_aliases() -> None:
    assert Fccntl.SRCVTIMEO is fc.FLOWSRCVTIMEO and Fccntl.GFLAGS == fc.FLOWGFLAGS == 7
    assert FLOWFRNONBLOCK == fc.FLOWFRDWR | fc.FLOWFNONBLOCK


def test_flags_start_as_cs_default(pair: Pair) -> None:
    assert pair[0].fccntl(fc.FLOWGFLAGS) == fc.FLOWFDEFAULT == fc.FLOWFRDWR | fc.FLOWFWNOPART


def test_an_unknown_command_or_access_mode_is_an_invalid_argument(pair: Pair) -> None:
    with pytest.raises(InvalidArgument, match="no command 42"):
        pair[0].fccntl(42)
    with pytest.raises(InvalidArgument, match="no access mode"):
        pair[0].fccntl(fc.FLOWSFLAGS, fc.FLOWFWRONLY | fc.FLOWFRDWR)


def test_nonblocking_read_with_nothing_queued_raises_would_block(pair: Pair) -> None:
    _, srv = pair
    srv.fccntl(fc.FLOWSFLAGS, fc.FLOWFRDWR | fc.FLOWFRNOBLOCK)
    assert srv.fccntl(fc.FLOWGFLAGS) == fc.FLOWFRDWR | fc.FLOWFRNOBLOCK
    start = time.monotonic()
    with pytest.raises(FlowWouldBlock):
        srv.read()
    assert time.monotonic() - start < 0.5


def test_nonblocking_read_returns_a_queued_sdu(pair: Pair) -> None:
    cli, srv = pair
    srv.set_blocking(False)
    cli.write(b"x")
    wait_for(srv.has_data, 5, "the SDU")
    assert srv.read() == b"x"


def test_nonblocking_write_to_a_full_flow_raises_would_block(pair: Pair) -> None:
    cli, _ = pair
    cli.set_blocking(False)
    with pytest.raises(FlowWouldBlock):
        for _ in range(100_000):
            cli.write(bytes(1000))


def test_read_timeout_raises_flow_timeout_after_the_timeout(pair: Pair) -> None:
    _, srv = pair
    srv.fccntl(Fccntl.SRCVTIMEO, 0.3)
    assert srv.fccntl(Fccntl.GRCVTIMEO) == 0.3
    start = time.monotonic()
    with pytest.raises(FlowTimeout):
        srv.read()
    assert 0.29 <= time.monotonic() - start < 1.5


def test_read_with_a_timeout_returns_data_that_arrives_in_time(pair: Pair) -> None:
    cli, srv = pair
    srv.set_timeout(5)
    threading.Timer(0.1, cli.write, (b"late",)).start()
    assert srv.read() == b"late"


def test_write_timeout_raises_flow_timeout_on_a_full_flow(pair: Pair) -> None:
    cli, _ = pair
    cli.fccntl(Fccntl.SSNDTIMEO, 0.2)
    start = time.monotonic()
    with pytest.raises(FlowTimeout):
        for _ in range(100_000):
            cli.write(bytes(1000))
    assert time.monotonic() - start < 5


def test_negative_timeout_is_an_invalid_argument(pair: Pair) -> None:
    with pytest.raises(InvalidArgument):
        pair[0].fccntl(Fccntl.SRCVTIMEO, -1)


def test_mtu_is_available_through_fccntl(pair: Pair) -> None:
    assert pair[0].fccntl(Fccntl.GMTU) == 65535


def test_nonblocking_reads_leave_writes_blocking(pair: Pair) -> None:
    cli, srv = pair
    cli.fccntl(fc.FLOWSFLAGS, fc.FLOWFRDWR | fc.FLOWFRNOBLOCK)
    with pytest.raises(FlowWouldBlock):
        cli.read()
    got: list[bytes] = []
    reader = threading.Timer(0.3, lambda: got.extend(srv.read() for _ in range(2000)))
    reader.start()
    for _ in range(2000):  # fills the flow: a non-blocking write would raise, this one waits
        cli.write(bytes(1000))
    reader.join(30)
    assert len(got) == 2000 and not reader.is_alive()  # every write arrived; the reader is done


def test_older_flowfrnonblock_makes_reads_and_writes_nonblocking(pair: Pair) -> None:
    cli, _ = pair
    cli.fccntl(Fccntl.SFLAGS, FLOWFRNONBLOCK)
    with pytest.raises(FlowWouldBlock):
        cli.read()
    with pytest.raises(FlowWouldBlock):
        for _ in range(100_000):
            cli.write(bytes(1000))


def test_a_read_only_flow_refuses_writes_and_a_write_only_one_reads(pair: Pair) -> None:
    cli, srv = pair
    cli.fccntl(fc.FLOWSFLAGS, fc.FLOWFRDONLY)
    with pytest.raises(PermissionDenied, match="read-only"):
        cli.write(b"x")
    srv.fccntl(fc.FLOWSFLAGS, fc.FLOWFWRONLY)
    with pytest.raises(PermissionDenied, match="write-only"):
        srv.read()
    srv.write(b"to a read-only end")
    cli.set_timeout(5)
    assert cli.read() == b"to a read-only end"


def test_partial_reads_return_the_rest_of_an_sdu_then_an_empty_read_at_its_exact_end(pair: Pair) -> None:
    cli, srv = pair
    srv.set_timeout(5)
    cli.write(b"0123456789")
    cli.write(b"abcd")
    cli.write(b"next")
    assert [srv.read(4), srv.read(4), srv.read(4)] == [b"0123", b"4567", b"89"]
    assert [srv.read(4), srv.read(4)] == [b"abcd", b""]  # as C: an SDU that filled the read exactly
    assert srv.read() == b"next"


def test_no_partial_reads_fails_and_drops_an_sdu_that_does_not_fit(pair: Pair) -> None:
    cli, srv = pair
    srv.set_timeout(5)
    srv.fccntl(fc.FLOWSFLAGS, fc.FLOWFRDWR | fc.FLOWFRNOPART)
    cli.write(b"too long for four")
    cli.write(b"fits")
    with pytest.raises(InvalidArgument, match=r"does not fit in 4 \(FLOWFRNOPART\): dropped"):
        srv.read(4)
    assert srv.read(4) == b"fits"


def test_partial_writes_cut_an_sdu_to_the_mtu_once_flowfwnopart_is_cleared(pair: Pair) -> None:
    cli, srv = pair
    big = bytes(cli.mtu + 10)
    with pytest.raises(InvalidArgument):
        cli.write(big)
    cli.fccntl(fc.FLOWSFLAGS, fc.FLOWFRDWR)
    assert cli.write(big) == cli.mtu
    srv.set_timeout(5)
    assert len(srv.read()) == cli.mtu


def test_queue_lengths_count_what_waits(pair: Pair) -> None:
    cli, srv = pair
    assert srv.fccntl(fc.FLOWGRXQLEN) == 0 and cli.fccntl(fc.FLOWGTXQLEN) == 0
    cli.write(b"one")
    cli.write(b"two")
    wait_for(srv.has_data, 5, "the SDUs")
    assert cli.fccntl(fc.FLOWGTXQLEN) >= 1 and srv.fccntl(fc.FLOWGRXQLEN) >= 1
    srv.read()
    srv.read()
    assert srv.fccntl(fc.FLOWGRXQLEN) == 0 and cli.fccntl(fc.FLOWGTXQLEN) == 0


def established_pair(client_factory: Callable[[], IrmClient], name: str, spec: qos.QosSpec) -> Pair:
    """(client end, server end) of a flow allocated and accepted through flowlib, engine and all."""
    server, client = client_factory(), client_factory()
    with ThreadPoolExecutor(1) as pool:
        accepted = pool.submit(flow_accept, timeout=10, irm=server)
        deadline = time.monotonic() + 5
        while True:
            try:
                cli = flow_alloc(name, qos=spec, timeout=10, irm=client)
                break
            except NameNotFound as e:
                if "no process is accepting" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        return cli, accepted.result(timeout=15)


def test_frct_receive_buffer_bounds_what_a_reader_holds_and_grows_on_request(
    client_factory: Callable[[], IrmClient], bound_name: str, pair: Pair
) -> None:
    """FRCTSRCVBUF: a receiver at its smallest buffer holds about one SDU of a writer that never stops
    (the writer waits at the window), and takes the rest once it grows."""
    with pytest.raises(PermissionDenied, match="runs no FRCT"):
        pair[0].fccntl(fc.FRCTSRCVBUF, 1)
    cli, srv = established_pair(client_factory, bound_name, qos.data)
    try:
        with pytest.raises(InvalidArgument, match="bytes > 0"):
            srv.fccntl(fc.FRCTSRCVBUF, 0)
        srv.fccntl(fc.FRCTSRCVBUF, 1)
        small = srv.fccntl(fc.FRCTGRCVBUF)
        assert small < 2 * APP_MTU, small  # one whole SDU and one PDU: not the default 4 MiB
        sdu = b"x" * 30000
        cli.set_timeout(1)
        sent = 0
        with contextlib.suppress(FlowTimeout):
            while sent < 100:
                cli.write(sdu)
                sent += 1
        time.sleep(0.5)
        held = srv.fccntl(fc.FLOWGRXQLEN)
        assert 0 < held * len(sdu) <= small, (held, sent)  # the rest waits at the writer
        srv.fccntl(fc.FRCTSRCVBUF, 4 << 20)
        assert srv.fccntl(fc.FRCTGRCVBUF) == 4 << 20
        cli.set_timeout(10)
        for _ in range(100):
            cli.write(sdu)
        srv.set_timeout(10)
        got = sum(len(srv.read()) for _ in range(sent + 100))
        assert got == (sent + 100) * len(sdu)
    finally:
        cli.close()
        srv.close()


def test_frct_flags_are_the_qos_s_and_only_frct_flows_have_them(
    client_factory: Callable[[], IrmClient], bound_name: str, pair: Pair
) -> None:
    with pytest.raises(PermissionDenied, match="runs no FRCT"):
        pair[0].fccntl(fc.FRCTGFLAGS)
    cli, srv = established_pair(client_factory, bound_name, qos.data)
    try:
        assert cli.fccntl(fc.FRCTGFLAGS) == fc.FRCTFRTX | fc.FRCTFRESCNTL | fc.FRCTFLINGER
        cli.fccntl(fc.FRCTSFLAGS, fc.FRCTFRESCNTL)  # retransmission stays: the QoS asked for it
        assert cli.fccntl(fc.FRCTGFLAGS) == fc.FRCTFRTX | fc.FRCTFRESCNTL
        cli.write(b"still reliable")
        srv.set_timeout(5)
        assert srv.read() == b"still reliable"
    finally:
        cli.close()
        srv.close()
    uo, us = established_pair(client_factory, bound_name, qos.best_effort)
    try:
        assert uo.fccntl(fc.FRCTGFLAGS) == fc.FRCTFRESCNTL
    finally:
        uo.close()
        us.close()


def test_a_local_flow_says_it_is_direct_and_a_reliable_one_reports_frct_s_counts(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str, pair: Pair
) -> None:
    """The local layer's SDUs go from one application's socket to the other's: no IPCP counts them,
    and the flow, `irm flow list` and the IRMd say so. FRCT counts its own at each end."""
    raw_cli, _ = pair
    assert raw_cli.stats() == FlowStats(None, IpcpStats("lo", "direct"))
    rows = irmd.table("flow", "list")
    assert len(rows) == 2 and {(r["sent"], r["received"], r["dropped"]) for r in rows} == {("direct",) * 3}
    cli, srv = established_pair(client_factory, bound_name, qos.data)
    try:
        srv.set_timeout(5)
        cli.set_timeout(5)
        for i in range(5):
            cli.write(b"ping %d" % i)
            assert srv.read() == b"ping %d" % i
            srv.write(b"pong")
            assert cli.read() == b"pong"
        got = wait_for(
            lambda: (f := cli.stats(ask_ipcp=False).frct) is not None and f.rtt is not None and f,
            10,
            "an acknowledgement to measure the RTT",
        )
        assert isinstance(got, FrctStats) and got.sent >= 5 and got.received >= 5 and got.retransmitted == 0
        assert got.rtt is not None and 0 < got.rtt < 5 and got.dropped == 0
        assert cli.stats().ipcp == IpcpStats("lo", "direct")
    finally:
        cli.close()
        srv.close()


@pytest.mark.timeout(60)
def test_a_writer_that_closes_at_once_delivers_everything_despite_sdus_it_never_read(
    client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    # An SDU the writer never reads sits in its socket when it closes: the engine's end of the socket
    # then says ECONNRESET once, ahead of the SDUs still queued there, which must go out all the same.
    cli, srv = established_pair(client_factory, bound_name, qos.data)
    try:
        srv.write(b"never read")
        poller = select.poll()
        poller.register(cli.fileno(), select.POLLIN)
        assert poller.poll(5000), "the SDU never reached the writer's socket"
        sdus = [i.to_bytes(4, "big") * 350 for i in range(2000)]  # more than FRCT's window holds at once
        received: list[bytes] = []
        srv.set_timeout(10)
        reader = threading.Thread(target=lambda: received.extend(srv.read() for _ in sdus), daemon=True)
        reader.start()
        for sdu in sdus:
            cli.write(sdu)
        cli.close()
        reader.join(20)
        assert len(received) == len(sdus), f"{len(received)} of {len(sdus)} SDUs arrived"
        assert received == sdus
    finally:
        cli.close()
        srv.close()


def test_back_to_blocking_read_waits_for_data(pair: Pair) -> None:
    cli, srv = pair
    srv.set_blocking(False)
    srv.set_blocking(True)
    threading.Timer(0.1, cli.write, (b"ok",)).start()
    assert srv.read() == b"ok"


# -- the end of a flow ---------------------------------------------------------------


def test_read_after_the_peer_deallocated_raises_flow_down(pair: Pair) -> None:
    cli, srv = pair
    cli.close()
    with pytest.raises(FlowDown, match="deallocated by the peer"):
        srv.read()


def test_blocked_read_is_woken_by_the_peer_deallocating(pair: Pair) -> None:
    cli, srv = pair
    threading.Timer(0.2, cli.close).start()
    with pytest.raises(FlowDown):
        srv.read()


def test_write_after_the_peer_deallocated_raises_flow_down(pair: Pair) -> None:
    cli, srv = pair
    srv.close()  # a notice to the IRMd: the end reaches this side a moment later
    with pytest.raises(FlowDown):
        cli.read()  # returns once it has
    with pytest.raises(FlowDown):
        cli.write(b"anyone?")


def test_sdus_queued_before_the_peer_deallocated_are_still_read(pair: Pair) -> None:
    cli, srv = pair
    cli.write(b"last words")
    cli.close()
    assert srv.read() == b"last words"
    with pytest.raises(FlowDown):
        srv.read()


def test_fevent_reports_dealloc_when_the_peer_deallocates(pair: Pair) -> None:
    cli, srv = pair
    fset = FlowSet(srv._irm)
    fset.add(srv)
    threading.Timer(0.1, cli.close).start()
    assert poll_events(fset, 1, 5) == [(srv, EventType.DEALLOC)]
    assert srv not in fset  # reported once, then out of the set
    fset.close()


def test_closing_a_flow_is_idempotent_and_later_io_fails(pair: Pair) -> None:
    cli, _ = pair
    cli.close()
    cli.close()
    assert cli.closed
    with pytest.raises(FlowError):
        cli.write(b"x")


def test_deallocated_flows_leave_the_flow_list(irmd: IrmdProc, pair: Pair) -> None:
    cli, srv = pair
    assert len(irmd.table("flow", "list")) == 2
    cli.close()
    srv.close()
    assert irmd.table("flow", "list") == []


def test_flows_of_a_client_that_disconnects_are_released(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str
) -> None:
    server, client = client_factory(), client_factory()
    cli, srv = accepted_pair(server, client, bound_name)
    client.channel.close()  # the connection drops with the flow still open
    with pytest.raises(FlowDown):
        srv.read()
    assert [r["role"] for r in irmd.table("flow", "list")] == ["dst"]
    srv.close()
    cli.close()  # the IRMd is unreachable for this client: close still succeeds


def test_a_process_stays_bound_while_it_has_another_connection(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], local_layer: str
) -> None:
    irmd.irm_ok("bind", "process", str(os.getpid()), "name", "srv")
    irmd.irm_ok("name", "register", "srv", "layer", local_layer)
    server, helper = client_factory(), client_factory()
    helper.channel.close()  # e.g. a library in the process that talked to the IRMd once
    wait_for(lambda: helper.channel.closed, 5, "the connection to close")
    time.sleep(0.2)  # let the IRMd see it go
    assert irmd.table("name", "list")[0]["pids"] == str(os.getpid())
    cli, srv = accepted_pair(server, client_factory(), "srv")
    cli.close()
    srv.close()


def test_closing_an_irm_client_twice_is_harmless(irmd: IrmdProc) -> None:
    client = IrmClient(irmd.sock)
    client.close()
    bystander = os.eventfd(0)  # likely to reuse the fd number just freed
    try:
        client.close()
        os.fstat(bystander)  # still open
    finally:
        with contextlib.suppress(OSError):
            os.close(bystander)


# -- the IPCP dies -----------------------------------------------------------------------


def test_killing_the_ipcp_takes_its_flows_down_and_the_irmd_carries_on(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str, local_layer: str
) -> None:
    server, client = client_factory(), client_factory()
    cli, srv = accepted_pair(server, client, bound_name)
    fset = FlowSet(server)
    fset.add(cli)
    fset.add(srv)
    pid = irmd.ipcp_pid("lo")

    os.kill(pid, signal.SIGKILL)

    events = poll_events(fset, 2, 5)
    assert sorted((f.flow_id, t) for f, t in events) == sorted(
        [(cli.flow_id, EventType.DOWN), (srv.flow_id, EventType.DOWN)]
    )
    with pytest.raises(FlowDown, match="is down"):
        srv.read()
    with pytest.raises(FlowDown):
        cli.write(b"x")
    wait_for(lambda: not pid_alive(pid), 5, "the IPCP to be reaped")
    assert irmd.table("ipcp", "list") == []
    assert {r["state"] for r in irmd.table("flow", "list")} == {"down"}
    assert irmd.alive()
    fset.close()
    cli.close()
    srv.close()


def test_a_new_ipcp_serves_the_layer_after_the_old_one_was_killed(
    irmd: IrmdProc, client_factory: Callable[[], IrmClient], bound_name: str, local_layer: str
) -> None:
    pid = irmd.ipcp_pid("lo")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: irmd.table("ipcp", "list") == [], 5, "the IPCP to leave the list")

    irmd.irm_ok("ipcp", "bootstrap", "name", "lo2", "layer", local_layer, "type", "local")
    irmd.note_children()
    assert irmd.table("name", "list")[0]["layers"] == "-"  # registrations died with the layer
    irmd.irm_ok("name", "register", bound_name, "layer", local_layer)
    cli, srv = accepted_pair(client_factory(), client_factory(), bound_name)
    with cli, srv:
        cli.write(b"again")
        assert srv.read() == b"again"


SAY_ARGS = """#!{python}
import sys
from flowlib import flow_accept
while True:
    with flow_accept() as flow:
        flow.read()
        flow.write(" ".join(sys.argv[1:]).encode())
"""


@pytest.mark.timeout(60)
def test_one_program_started_for_two_names_serves_each_with_its_own_arguments(
    irmd: IrmdProc, local_layer: str, tmp_path: Path
) -> None:
    prog = tmp_path / "say-args"
    prog.write_text(SAY_ARGS.format(python=sys.executable))
    prog.chmod(0o755)
    for name in ("depot-a", "depot-b"):
        irmd.irm_ok("bind", "program", str(prog), "name", name, "auto", "--", "serving", name)
        irmd.irm_ok("name", "register", name, "layer", local_layer)
    client = IrmClient(irmd.sock)
    try:
        for _ in range(2):  # again once both run: a running instance must not take the other's flows
            for name in ("depot-a", "depot-b"):
                reply, fd = client.alloc(name, None, 20)
                with Flow(reply, fd, client) as flow:
                    flow.write(b"who?")
                    flow.set_timeout(10)
                    assert flow.read() == f"serving {name}".encode()
    finally:
        client.close()


def test_acceptor_learns_who_allocated_a_local_flow(pair: Pair) -> None:
    """The kernel's word (SO_PEERCRED and SO_PEERGROUPS at the IRMd), not anything the allocator said."""
    cli, srv = pair
    assert (srv.peer_uid, srv.peer_pid) == (os.getuid(), os.getpid())
    assert (srv.peer_gid, srv.peer_groups) == (os.getegid(), tuple(sorted(os.getgroups())))
    assert (cli.peer_uid, cli.peer_pid) == (None, None)  # the allocator learns nothing of the acceptor here
    assert (cli.peer_gid, cli.peer_groups) == (None, None)


# -- who accepts --------------------------------------------------------------------

SERVER_OF_ITS_OWN = """
import sys
from flowlib.irm import IrmClient
irm = IrmClient()
irm.bind(sys.argv[1])
irm.register(sys.argv[1], ["local"])
print("ready", flush=True)
while True:
    reply, fd = irm.accept(None)
    print("flow", reply.name, flush=True)
"""

BOUND_PARENT = """
parent() {
  "$PY" -c "$SERVER" other &  # a server of a name of its own, started by the bound process
  read -r go < "$GO"          # until the test has tried the parent's name
  oping --listen              # a plain child: serves the parent's name
}
parent & irm bind process $! name probe && echo bound
wait
"""


@pytest.mark.timeout(90)
def test_a_bound_parents_child_server_of_another_name_takes_none_of_its_flows_a_plain_child_does(
    irmd: IrmdProc, local_layer: str, client_factory: Callable[[], IrmClient], tmp_path: Path
) -> None:
    """`parent & irm bind process $! name probe`: the parent's children take probe's flows, except one
    that serves a name of its own (it bound itself to "other"): a server keeps to its own names."""
    go = tmp_path / "go"
    os.mkfifo(go)
    env = dict(
        irmd.env,
        PY=sys.executable,
        SERVER=SERVER_OF_ITS_OWN,
        GO=str(go),
        PYTHONPATH=str(Path(__file__).resolve().parents[1]),
    )
    lines: list[str] = []
    shell = subprocess.Popen(
        ["bash", "-c", BOUND_PARENT], env=env, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    threading.Thread(target=lambda: lines.extend(shell.stdout or ()), daemon=True).start()
    try:
        wait_for(lambda: {"bound\n", "ready\n"} <= set(lines) or shell.poll() is not None, 30, "the bound parent")
        assert {"bound\n", "ready\n"} <= set(lines), lines
        irmd.irm_ok("name", "register", "probe", "layer", local_layer)
        client = client_factory()
        _, fd = client.alloc("other", None, 10)  # the child serves its own name
        os.close(fd)
        wait_for(lambda: "flow other\n" in lines, 10, "the child's flow")
        with pytest.raises(FlowError):
            client.alloc("probe", None, 3)  # but not its parent's
        assert not any(line.startswith("flow probe") for line in lines)
        with open(go, "w") as f:
            f.write("go\n")
        wait_for(lambda: any("server started" in line for line in lines), 30, "oping --listen")
        pinged = irmd.run("oping", "-n", "probe", "-c", "2", "-i", "100", timeout=60)
        assert "2 packets transmitted, 2 received" in pinged.stdout, pinged.stdout + pinged.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(10)
