"""The IRMd's registry (irmd.reg): names, bindings, flows, IPCPs and the decisions about them, free of I/O."""

from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace

import pytest

from irmd.identity import Peer, Program
from irmd.reg import Acceptor, FlowEvent, FlowState, IllegalFlowTransition, Ipcp, ProcBinding, Registry, prog_key
from irmd.reg.flow import TRANSITIONS, next_state, try_next_layer, worse
from irmd.reg.ipcp import by_preference, settled
from irmd.reg.name import Name
from proto.errors import Busy, InvalidArgument, NotFound
from proto.names import check_name, name_hash, wildcard_match

IRMD_UID = 4242  # the IRMd's own user in these tests: not root, not the users below
USER, OTHER = 1000, 1001


@pytest.fixture
def reg() -> Registry:
    return Registry(IRMD_UID)


def peer(pid: int, uid: int = USER, exe: str = "/usr/bin/other", start: int = 7, argv: tuple[str, ...] = ()) -> Peer:
    return Peer(pid, uid, uid, start, exe, argv or (exe,), "/")


def acceptors(*pids: int, exe: str = "/usr/bin/other") -> list[Acceptor]:
    return [Acceptor(100 + pid, peer(pid, exe=exe)) for pid in pids]


def bind_pid(reg: Registry, name: str, pid: int, start: int = 7) -> None:
    reg.bind_proc(name, ProcBinding(pid, start, USER))


# -- names ----------------------------------------------------------------------


def test_a_name_made_without_a_policy_spills_over_as_in_ouroboros(reg: Registry) -> None:
    assert reg.create_name("pong").lb == "spillover"
    assert reg.create_name("ping", "round-robin").lb == "round-robin"


def test_create_name_rejects_an_unknown_lb_policy_naming_the_choices(reg: Registry) -> None:
    with pytest.raises(InvalidArgument, match="round-robin or spillover"):
        reg.create_name("pong", "random")


@pytest.mark.parametrize(
    "bad",
    ["", "two words", "tab\there", "nl\n", "x" * 256, "bell\x07", "nb\u00a0sp", "line\u2028sep", "wide\u3000space",
     "del\x7f", "nel\x85", "zw\u200bsp", "bom\ufeff"],
)  # fmt: skip
def test_bad_names_are_rejected(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        check_name(bad)


def test_longest_allowed_name_is_accepted() -> None:
    assert check_name("x" * 255) == "x" * 255


@pytest.mark.parametrize("good", ["café", "名前", "a-b_c.d:e@f", "~!#$%^&*()"])
def test_printable_names_of_any_script_are_accepted(good: str) -> None:
    assert check_name(good) == good


def test_get_unknown_name_is_enoent_saying_not_found(reg: Registry) -> None:
    with pytest.raises(NotFound, match="'ghost' not found") as err:
        reg.get_name("ghost")
    assert err.value.code == "ENOENT"


def test_destroy_removes_an_unregistered_name(reg: Registry) -> None:
    reg.create_name("pong")
    reg.destroy_name("pong")
    assert "pong" not in reg.names


def test_destroy_refuses_a_name_registered_in_a_layer(reg: Registry) -> None:
    reg.ipcps["lo"] = ipcp("lo", "local", "local")
    reg.create_name("pong").regs.add("lo")
    with pytest.raises(Busy, match="registered in local; unregister it first"):
        reg.destroy_name("pong")
    assert "pong" in reg.names


# -- bindings -------------------------------------------------------------------


def test_names_list_in_the_order_they_were_made(reg: Registry) -> None:
    for name in ("b", "a", "c"):
        reg.create_name(name)
    assert sorted(reg.names, key=lambda n: reg.names[n].seq) == ["b", "a", "c"]


def test_bind_program_creates_the_name_and_records_path_args_auto_and_owner(reg: Registry) -> None:
    reg.bind_program("pong", "/usr/bin/oping", ["-l"], True, owner=0)
    binding = reg.names["pong"].programs[prog_key("/usr/bin/oping")]
    assert (binding.path, binding.args, binding.auto, binding.owner) == ("/usr/bin/oping", ["-l"], True, 0)


def test_programs_are_keyed_by_their_real_path(tmp_path: os.PathLike[str]) -> None:
    real = os.path.join(tmp_path, "prog")
    link = os.path.join(tmp_path, "link")
    open(real, "w").close()
    os.symlink(real, link)
    assert prog_key(link) == prog_key(real) == os.path.realpath(real)


def test_unbind_program_removes_it_from_every_name_when_no_name_given(reg: Registry) -> None:
    reg.bind_program("a", "/bin/oping", [], False)
    reg.bind_program("b", "/bin/oping", [], False)
    reg.unbind_program("/bin/oping")
    assert not reg.names["a"].programs and not reg.names["b"].programs


def test_unbind_program_with_a_name_keeps_other_bindings(reg: Registry) -> None:
    reg.bind_program("a", "/bin/oping", [], False)
    reg.bind_program("b", "/bin/oping", [], False)
    reg.unbind_program("/bin/oping", "a")
    assert not reg.names["a"].programs and reg.names["b"].programs


def test_unbind_of_an_unbound_program_is_enoent(reg: Registry) -> None:
    reg.create_name("a")
    with pytest.raises(NotFound, match="not bound"):
        reg.unbind_program("/bin/oping")


def test_bind_and_unbind_pid(reg: Registry) -> None:
    bind_pid(reg, "a", 42)
    assert 42 in reg.names["a"].pids
    reg.unbind_pid(42, "a")
    assert 42 not in reg.names["a"].pids


def test_unbind_of_an_unbound_pid_is_enoent(reg: Registry) -> None:
    bind_pid(reg, "a", 42)
    with pytest.raises(NotFound, match="process 7 is not bound"):
        reg.unbind_pid(7)


def test_unbind_pid_without_a_name_stays_within_the_scope_given(reg: Registry) -> None:
    bind_pid(reg, "a", 42)
    bind_pid(reg, "b", 42)
    reg.unbind_pid(42, scope=[reg.names["a"]])
    assert 42 not in reg.names["a"].pids and 42 in reg.names["b"].pids


def test_forget_proc_drops_it_from_all_names(reg: Registry) -> None:
    bind_pid(reg, "a", 42, start=1000)
    bind_pid(reg, "b", 42, start=1000)
    reg.forget_proc(42, 1000)
    assert not reg.names["a"].pids and not reg.names["b"].pids


def test_forget_proc_leaves_a_later_process_with_its_pid_bound(reg: Registry) -> None:
    bind_pid(reg, "a", 42, start=2000)
    reg.started[42] = ("a", 2000)
    reg.forget_proc(42, 1000)  # an earlier process with pid 42 (or one unknown: 0) is gone
    reg.forget_proc(42, 0)
    assert reg.names["a"].pids == {42} and reg.started[42] == ("a", 2000)


# -- who may accept -------------------------------------------------------------


def test_a_pid_binding_is_that_process_not_a_later_one_with_its_pid(reg: Registry) -> None:
    entry = reg.create_name("a")
    bind_pid(reg, "a", 42, start=1000)
    assert reg.bound(entry, Acceptor(1, peer(42, start=1000)))
    assert not reg.bound(entry, Acceptor(1, peer(42, start=2000)))


def test_a_program_binding_takes_a_process_running_it_as_its_owner_root_or_the_irmds_user(reg: Registry) -> None:
    entry = reg.create_name("a")
    reg.bind_program("a", "/bin/oping", [], False, owner=USER, program=Program("/bin/oping", "/bin/oping"))
    for uid in (USER, 0, IRMD_UID):
        assert reg.bound(entry, Acceptor(1, peer(50, uid=uid, exe="/bin/oping"))), uid
    assert not reg.bound(entry, Acceptor(1, peer(50, uid=OTHER, exe="/bin/oping")))  # the program, another user
    assert not reg.bound(entry, Acceptor(1, peer(50, uid=USER, exe="/bin/sh")))  # the user, another program


def test_what_a_process_announces_is_no_identity(reg: Registry) -> None:
    """Only the kernel's exe counts: a process whose argv[0] says oping is not oping."""
    entry = reg.create_name("a")
    reg.bind_program("a", "/bin/oping", [], False, owner=USER, program=Program("/bin/oping", "/bin/oping"))
    liar = peer(50, exe="/bin/sh", argv=("/bin/oping", "-l"))
    assert not reg.bound(entry, Acceptor(1, liar))


def test_a_process_the_irmd_started_for_one_name_takes_that_names_flows_only(reg: Registry) -> None:
    a, b = reg.create_name("a"), reg.create_name("b")
    for name in ("a", "b"):
        reg.bind_program(name, "/bin/depot", [name], True, owner=USER, program=Program("/bin/depot", "/bin/depot"))
    reg.started[60] = ("a", 5)
    started = Acceptor(1, peer(60, exe="/bin/depot", start=5))
    assert reg.bound(a, started) and not reg.bound(b, started)
    later = Acceptor(1, peer(60, exe="/bin/depot", start=9))  # the pid again, another process: a plain instance
    assert reg.bound(a, later) and reg.bound(b, later)


def test_auto_program_is_the_binding_marked_auto(reg: Registry) -> None:
    reg.bind_program("a", "/bin/manual", [], False)
    assert reg.auto_program(reg.names["a"]) is None
    reg.bind_program("a", "/bin/oping", ["-l"], True)
    auto = reg.auto_program(reg.names["a"])
    assert auto is not None and auto.path == "/bin/oping"


# -- load balancing ---------------------------------------------------------------


def test_round_robin_pick_cycles_over_bound_acceptors(reg: Registry) -> None:
    entry = reg.create_name("a", "round-robin")
    for pid in (1, 2, 3):
        bind_pid(reg, "a", pid)
    ready = acceptors(1, 2, 3)
    picks = [reg.pick(entry, ready).pid for _ in range(6)]  # type: ignore[union-attr]
    assert picks == [1, 2, 3, 1, 2, 3]


def test_spillover_pick_always_takes_the_first_bound_acceptor(reg: Registry) -> None:
    entry = reg.create_name("a", "spillover")
    for pid in (1, 2, 3):
        bind_pid(reg, "a", pid)
    ready = acceptors(1, 2, 3)
    assert [reg.pick(entry, ready).pid for _ in range(4)] == [1, 1, 1, 1]  # type: ignore[union-attr]
    assert reg.pick(entry, ready[1:]).pid == 2  # type: ignore[union-attr]


def test_pick_ignores_acceptors_not_bound_to_the_name(reg: Registry) -> None:
    entry = reg.create_name("a")
    bind_pid(reg, "a", 2)
    assert reg.pick(entry, acceptors(1, 2, 3)).pid == 2  # type: ignore[union-attr]


def test_pick_with_no_bound_acceptor_is_none(reg: Registry) -> None:
    entry = reg.create_name("a")
    bind_pid(reg, "a", 9)
    assert reg.pick(entry, acceptors(1, 2)) is None


# -- hashes -----------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["SHA3_224", "SHA3_256", "SHA3_384", "SHA3_512"])
def test_name_hash_is_the_layers_sha3_of_the_name(algo: str) -> None:
    assert name_hash(algo, "pong") == hashlib.new(algo.lower().replace("_", "-"), b"pong").digest()


def test_unknown_hash_is_einval() -> None:
    with pytest.raises(InvalidArgument, match="unknown hash 'SHA1'"):
        name_hash("SHA1", "pong")


def test_udp_layers_hash_names_with_md5_as_ouroboros() -> None:
    assert name_hash("MD5", "pingsrv").hex() == "d2734aedb9cfd555ae646fd801963bfa"  # INTEROP-0.23.md §1.1


def test_name_for_hash_finds_the_name_registered_with_that_ipcp(reg: Registry) -> None:
    reg.create_name("pong").regs.add("lo")
    reg.create_name("ping").regs.add("lo")
    found = reg.name_for_hash("lo", "SHA3_256", name_hash("SHA3_256", "pong"))
    assert found is not None and found.name == "pong"


def test_name_for_hash_ignores_names_not_registered_with_the_ipcp(reg: Registry) -> None:
    reg.create_name("pong").regs.add("other")
    assert reg.name_for_hash("lo", "SHA3_256", name_hash("SHA3_256", "pong")) is None


def test_name_for_hash_uses_the_layers_algorithm(reg: Registry) -> None:
    reg.create_name("pong").regs.add("lo")
    assert reg.name_for_hash("lo", "SHA3_512", name_hash("SHA3_256", "pong")) is None
    assert reg.name_for_hash("lo", "SHA3_512", name_hash("SHA3_512", "pong")) is not None


def test_name_for_hash_keeps_each_algorithms_hash_apart_and_follows_registrations(reg: Registry) -> None:
    """A name's hashes are made once per algorithm: a lookup by one never answers for another, and a
    name whose hash is known is found only while it is registered with the IPCP asked."""
    entry = reg.create_name("pong")
    entry.regs.add("lo")
    for _ in range(2):
        for algo in ("SHA3_512", "SHA3_256", "MD5"):
            assert reg.name_for_hash("lo", algo, name_hash(algo, "pong")) is entry
            other = "SHA3_224" if algo != "SHA3_224" else "SHA3_256"
            assert reg.name_for_hash("lo", other, name_hash(algo, "pong")) is None
    entry.regs.discard("lo")
    assert reg.name_for_hash("lo", "SHA3_256", name_hash("SHA3_256", "pong")) is None


def test_a_name_is_in_the_layers_of_the_ipcps_it_is_registered_with_until_they_go(reg: Registry) -> None:
    for name, layer in (("u1", "net"), ("u2", "net"), ("lo", "local")):
        reg.ipcps[name] = ipcp(name, "unicast", layer)
    entry = reg.create_name("pong")
    entry.regs |= {"u1", "u2", "lo"}
    assert reg.layers_of(entry) == ["local", "net"]
    reg.drop_ipcp("u1")
    assert reg.layers_of(entry) == ["local", "net"]
    reg.drop_ipcp("u2")
    assert reg.layers_of(entry) == ["local"]


# -- flows ------------------------------------------------------------------------


def test_new_flows_get_distinct_ids_and_can_be_listed_by_owner_and_ipcp(reg: Registry) -> None:
    from flowlib.qos import raw

    common = {"pid": 1, "name": "n", "layer": "l", "qos": raw, "role": "src"}
    a = reg.new_flow(owner=1, ipcp="lo", **common)
    b = reg.new_flow(owner=2, ipcp="lo", **common)
    c = reg.new_flow(owner=1, ipcp="udp", **common)
    assert len({a.flow_id, b.flow_id, c.flow_id}) == 3
    assert [f.flow_id for f in reg.flows_of(owner=1)] == [a.flow_id, c.flow_id]
    assert [f.flow_id for f in reg.flows_of(ipcp="lo")] == [a.flow_id, b.flow_id]


# -- decisions: flow states, layer preference, which failure is told --------------------------


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (FlowState.PENDING, FlowEvent.ALLOCATED, FlowState.ALLOCATED),
        (FlowState.ALLOCATED, FlowEvent.PEER_DEALLOC, FlowState.DEALLOC),
        (FlowState.ALLOCATED, FlowEvent.DOWN, FlowState.DOWN),
        (FlowState.PENDING, FlowEvent.DOWN, FlowState.DOWN),
        (FlowState.DEALLOC, FlowEvent.DOWN, FlowState.DEALLOC),  # how it ended stays how it ended
        (FlowState.DOWN, FlowEvent.PEER_DEALLOC, FlowState.DOWN),
        (FlowState.DEALLOC, FlowEvent.ALLOCATED, FlowState.DEALLOC),  # its answer came after its end
    ],
)
def test_flow_states_change_as_the_table_says(state: FlowState, event: FlowEvent, after: FlowState) -> None:
    assert next_state(state, event) is after


def test_a_flow_allocated_twice_is_an_illegal_transition() -> None:
    with pytest.raises(IllegalFlowTransition, match="a flow in state allocated cannot be allocated"):
        next_state(FlowState.ALLOCATED, FlowEvent.ALLOCATED)


def test_every_state_and_event_is_in_the_table_or_illegal() -> None:
    legal = {(s, e) for s in FlowState for e in FlowEvent} - {(FlowState.ALLOCATED, FlowEvent.ALLOCATED)}
    assert set(TRANSITIONS) == legal


def ipcp(name: str, kind: str, layer: str = "") -> Ipcp:
    return Ipcp(name, kind, None, None, layer=layer)  # type: ignore[arg-type]


def test_ipcp_patterns_have_one_wildcard_star() -> None:
    assert wildcard_match("uni-*", "uni-1") and wildcard_match("*", "") and wildcard_match("a*b*c", "aXbYc")
    assert not wildcard_match("uni-*", "unicast") and not wildcard_match("a*b", "ab-") and wildcard_match("a*b", "ab")
    assert not wildcard_match("uni-?", "uni-1") and wildcard_match("uni-?", "uni-?")  # ? is no pattern
    assert not wildcard_match("a*a", "a")


def test_the_most_local_layer_is_tried_first_then_as_they_came() -> None:
    got = by_preference([ipcp("u", "udp4"), ipcp("n1", "unicast"), ipcp("lo", "local"), ipcp("n2", "unicast")])
    assert [i.name for i in got] == ["lo", "n1", "n2", "u"]


def test_resolution_waits_only_for_layers_that_would_come_first() -> None:
    lo, net, udp = ipcp("lo", "local"), ipcp("n", "unicast"), ipcp("u", "udp4")
    assert settled([lo], [net, udp])
    assert not settled([net], [lo])
    assert settled([net], [udp])
    assert not settled([], [udp])


@pytest.mark.parametrize(
    ("code", "next_layer"),
    [("ENOENT", True), ("ENOTSUP", True), ("ETIMEDOUT", False), ("EPERM", False), ("EIPCP", False)],
)
def test_a_stale_directory_or_a_qos_refusal_leaves_the_flow_to_the_next_layer(code: str, next_layer: bool) -> None:
    assert try_next_layer(code) is next_layer


def test_the_latest_failure_is_told_unless_it_would_hide_a_qos_refusal() -> None:
    assert worse("ENOENT", "ENOTSUP") and worse("ENOENT", "ENOENT") and worse("ENOTSUP", "ETIMEDOUT")
    assert not worse("ENOTSUP", "ENOENT")


def test_the_flows_a_user_holds_are_counted_as_they_come_and_go(reg: Registry) -> None:
    from proto.qos import raw

    common = {"owner": 1, "pid": 1, "name": "n", "layer": "l", "ipcp": "lo", "qos": raw, "role": "src"}
    a, b = reg.new_flow(uid=USER, **common), reg.new_flow(uid=USER, **common)
    reg.new_flow(uid=OTHER, **common)
    assert (reg.flows_of_uid(USER), reg.flows_of_uid(OTHER)) == (2, 1)
    reg.drop_flow(a)
    reg.drop_flow(a)  # twice: no matter
    assert reg.flows_of_uid(USER) == 1 and b.flow_id in reg.flows


def test_a_pid_binding_takes_in_the_processes_the_bound_one_started_as_its_user(reg: Registry) -> None:
    entry = reg.create_name("a")
    reg.bind_proc("a", ProcBinding(42, 1000, USER))  # the shell that ran `oping -l &`
    child = Peer(43, USER, USER, 1001, "/bin/oping", ("oping", "-l"), "/", ancestors=((42, 1000), (1, 1)))
    assert reg.bound(entry, Acceptor(1, child))
    setuid = Peer(44, 0, 0, 1002, "/usr/bin/passwd", ("passwd",), "/", ancestors=((42, 1000),))
    assert not reg.bound(entry, Acceptor(1, setuid))  # another user's, though the bound one started it
    orphan = Peer(45, USER, USER, 1003, "/bin/oping", ("oping",), "/", ancestors=((42, 999),))
    assert not reg.bound(entry, Acceptor(1, orphan))  # a child of a later process with that pid


# A bound shell (pid 42, started at 1000) and what runs under it; (pid, start) -> what it serves.
SHELL = (42, 1000)
DESCENDANTS = [
    # (what, ancestors nearest first, the processes that serve something, takes the shell's flows)
    ("its child", (SHELL,), {}, True),
    ("its grandchild", ((43, 1001), SHELL), {}, True),
    ("a child that serves a name of its own", (SHELL,), {(50, 7): "bound to irm"}, False),
    ("the child of such a server", ((43, 1001), SHELL), {(43, 1001): "bound to irm"}, False),
    ("an IPCP of an IRMd the shell started", ((43, 1001), SHELL), {(50, 7): "ipcp lo"}, False),
    ("a process under the IRMd the shell started", ((43, 1001), SHELL), {(43, 1001): "the IRMd"}, False),
    ("a process started for another name", (SHELL,), {(50, 7): "started for b"}, False),
    ("a server above the shell is no matter", (SHELL, (30, 900)), {(30, 900): "bound to irm"}, True),
]


@pytest.mark.parametrize(("what", "ancestors", "servers", "takes"), DESCENDANTS, ids=[d[0] for d in DESCENDANTS])
def test_a_descendant_of_a_bound_process_takes_its_flows_unless_it_or_one_between_serves_of_its_own(
    what: str, ancestors: tuple[tuple[int, int], ...], servers: dict[tuple[int, int], str], takes: bool
) -> None:
    from irmd.reg.proc import may_accept

    entry = Name("a", procs={SHELL[0]: ProcBinding(*SHELL, USER)})
    child = Peer(50, USER, USER, 7, "/usr/bin/other", ("other",), "/", ancestors=ancestors)
    assert may_accept(entry, child, None, IRMD_UID, lambda pid, start: servers.get((pid, start), "")) is takes


def test_a_server_keeps_to_its_own_names_though_a_bound_process_started_it(reg: Registry) -> None:
    """The registry knows its servers: by pid, started for a name, running a bound program, its IPCPs,
    the IRMd itself. None of them, nor what they start, takes the flows of the process that started them."""
    probe = reg.create_name("probe")
    reg.bind_proc("probe", ProcBinding(*SHELL, USER))
    under = (SHELL,)

    styx = Peer(50, USER, USER, 7, "/usr/bin/other", ("styx",), "/", ancestors=under)
    reg.bind_proc("irm", ProcBinding(50, 7, USER))  # the server the shell started binds its own name
    assert reg.serves(50, 7) == "bound to irm"
    assert not reg.bound(probe, Acceptor(1, styx)) and reg.bound(reg.names["irm"], Acceptor(1, styx))
    worker = Peer(51, USER, USER, 8, "/usr/bin/other", ("styx",), "/", ancestors=((50, 7), SHELL))
    assert not reg.bound(probe, Acceptor(1, worker))  # the server's child is the server's

    reg.bind_program("pong", "/bin/oping", [], False, owner=USER, program=Program("/bin/oping", "/bin/oping"))
    oping = Peer(52, USER, USER, 9, "/bin/oping", ("oping", "-l"), "/", ancestors=under)
    assert reg.serves(52, 9, oping) == "runs a program bound to pong"
    assert not reg.bound(probe, Acceptor(1, oping))

    reg.started[53] = ("depot", 10)
    assert not reg.bound(probe, Acceptor(1, Peer(53, USER, USER, 10, "/bin/depot", ("depot",), "/", ancestors=under)))

    lo = Ipcp("lo", "local", SimpleNamespace(pid=54), None, layer="local", start=11)  # type: ignore[arg-type]
    reg.ipcps["lo"] = lo
    assert reg.serves(54, 11) == "ipcp lo" and reg.serves(54, 12) == ""  # a later process with its pid is not it
    assert not reg.bound(
        probe, Acceptor(1, Peer(54, USER, USER, 11, "/usr/bin/python3", ("python3",), "/", ancestors=((60, 12), SHELL)))
    )
    reg.irmd_proc = (60, 12)  # an IRMd the shell started: what it starts is its own
    assert not reg.bound(
        probe, Acceptor(1, Peer(55, USER, USER, 13, "/usr/bin/other", ("x",), "/", ancestors=((60, 12), SHELL)))
    )

    plain = Peer(56, USER, USER, 14, "/usr/bin/other", ("oping",), "/", ancestors=under)
    assert reg.serves(56, 14, plain) == "" and reg.bound(probe, Acceptor(1, plain))  # `cmd & irm bind process $!`
