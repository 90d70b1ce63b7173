"""The IRMd's bookkeeping (irmd.registry), free of I/O."""

from __future__ import annotations

import hashlib

import pytest

from irmd.registry import Acceptor, Registry, RegistryError, check_name, name_hash, prog_key


@pytest.fixture
def reg() -> Registry:
    return Registry()


def acceptors(*pids: int, prog: str = "/usr/bin/other") -> list[Acceptor]:
    return [Acceptor(conn_id=100 + pid, pid=pid, prog=prog) for pid in pids]


# -- names ----------------------------------------------------------------------


def test_create_name_defaults_to_round_robin(reg: Registry) -> None:
    assert reg.create_name("pong").lb == "round-robin"


def test_create_name_rejects_an_unknown_lb_policy_naming_the_choices(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="round-robin or spillover") as err:
        reg.create_name("pong", "random")
    assert err.value.code == "EINVAL"


@pytest.mark.parametrize("bad", ["", "two words", "tab\there", "nl\n", "x" * 256, "bell\x07"])
def test_bad_names_are_rejected(bad: str) -> None:
    with pytest.raises(RegistryError) as err:
        check_name(bad)
    assert err.value.code == "EINVAL"


def test_longest_allowed_name_is_accepted() -> None:
    assert check_name("x" * 255) == "x" * 255


def test_get_unknown_name_is_enoent_saying_not_found(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="'ghost' not found") as err:
        reg.get_name("ghost")
    assert err.value.code == "ENOENT"


def test_destroy_removes_an_unregistered_name(reg: Registry) -> None:
    reg.create_name("pong")
    reg.destroy_name("pong")
    assert "pong" not in reg.names


def test_destroy_refuses_a_name_registered_in_a_layer(reg: Registry) -> None:
    reg.create_name("pong").layers.add("local")
    with pytest.raises(RegistryError, match="registered in local; unregister it first"):
        reg.destroy_name("pong")
    assert "pong" in reg.names


# -- bindings -------------------------------------------------------------------


def test_bind_program_creates_the_name_and_records_path_args_auto(reg: Registry) -> None:
    reg.bind_program("pong", "/usr/bin/oping", ["-l"], True)
    binding = reg.names["pong"].programs["oping"]
    assert (binding.path, binding.args, binding.auto) == ("/usr/bin/oping", ["-l"], True)


def test_programs_are_matched_by_base_name() -> None:
    assert prog_key("/usr/local/bin/oping") == prog_key("oping") == "oping"


def test_unbind_program_removes_it_from_every_name_when_no_name_given(reg: Registry) -> None:
    reg.bind_program("a", "/bin/oping", [], False)
    reg.bind_program("b", "/bin/oping", [], False)
    reg.unbind_program("oping")
    assert not reg.names["a"].programs and not reg.names["b"].programs


def test_unbind_program_with_a_name_keeps_other_bindings(reg: Registry) -> None:
    reg.bind_program("a", "/bin/oping", [], False)
    reg.bind_program("b", "/bin/oping", [], False)
    reg.unbind_program("/bin/oping", "a")
    assert "oping" not in reg.names["a"].programs and "oping" in reg.names["b"].programs


def test_unbind_of_an_unbound_program_is_enoent(reg: Registry) -> None:
    reg.create_name("a")
    with pytest.raises(RegistryError, match="not bound") as err:
        reg.unbind_program("/bin/oping")
    assert err.value.code == "ENOENT"


def test_bind_and_unbind_pid(reg: Registry) -> None:
    reg.bind_pid("a", 42)
    assert 42 in reg.names["a"].pids
    reg.unbind_pid(42, "a")
    assert 42 not in reg.names["a"].pids


def test_unbind_of_an_unbound_pid_is_enoent(reg: Registry) -> None:
    reg.bind_pid("a", 42)
    with pytest.raises(RegistryError, match="process 7 is not bound") as err:
        reg.unbind_pid(7)
    assert err.value.code == "ENOENT"


def test_forget_pid_drops_it_from_all_names(reg: Registry) -> None:
    reg.bind_pid("a", 42)
    reg.bind_pid("b", 42)
    reg.forget_pid(42)
    assert not reg.names["a"].pids and not reg.names["b"].pids


def test_bound_by_pid_or_by_program(reg: Registry) -> None:
    entry = reg.create_name("a")
    reg.bind_pid("a", 42)
    reg.bind_program("a", "/bin/oping", [], False)
    assert reg.bound(entry, Acceptor(1, 42, "/bin/sh"))
    assert reg.bound(entry, Acceptor(2, 43, "/opt/bin/oping"))
    assert not reg.bound(entry, Acceptor(3, 44, "/bin/sh"))


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
        reg.bind_pid("a", pid)
    ready = acceptors(1, 2, 3)
    picks = [reg.pick(entry, ready).pid for _ in range(6)]  # type: ignore[union-attr]
    assert picks == [1, 2, 3, 1, 2, 3]


def test_spillover_pick_always_takes_the_first_bound_acceptor(reg: Registry) -> None:
    entry = reg.create_name("a", "spillover")
    for pid in (1, 2, 3):
        reg.bind_pid("a", pid)
    ready = acceptors(1, 2, 3)
    assert [reg.pick(entry, ready).pid for _ in range(4)] == [1, 1, 1, 1]  # type: ignore[union-attr]
    assert reg.pick(entry, ready[1:]).pid == 2  # type: ignore[union-attr]


def test_pick_ignores_acceptors_not_bound_to_the_name(reg: Registry) -> None:
    entry = reg.create_name("a")
    reg.bind_pid("a", 2)
    assert reg.pick(entry, acceptors(1, 2, 3)).pid == 2  # type: ignore[union-attr]


def test_pick_with_no_bound_acceptor_is_none(reg: Registry) -> None:
    entry = reg.create_name("a")
    reg.bind_pid("a", 9)
    assert reg.pick(entry, acceptors(1, 2)) is None


# -- hashes -----------------------------------------------------------------------


@pytest.mark.parametrize("algo", ["SHA3_224", "SHA3_256", "SHA3_384", "SHA3_512"])
def test_name_hash_is_the_layers_sha3_of_the_name(algo: str) -> None:
    assert name_hash(algo, "pong") == hashlib.new(algo.lower().replace("_", "-"), b"pong").digest()


def test_unknown_hash_is_einval() -> None:
    with pytest.raises(RegistryError, match="unknown hash 'SHA1'"):
        name_hash("SHA1", "pong")


def test_udp_layers_hash_names_with_md5_as_ouroboros() -> None:
    assert name_hash("MD5", "pingsrv").hex() == "d2734aedb9cfd555ae646fd801963bfa"  # INTEROP-0.23.md §1.1


def test_name_for_hash_finds_the_name_registered_in_that_layer(reg: Registry) -> None:
    reg.create_name("pong").layers.add("local")
    reg.create_name("ping").layers.add("local")
    found = reg.name_for_hash("local", "SHA3_256", name_hash("SHA3_256", "pong"))
    assert found is not None and found.name == "pong"


def test_name_for_hash_ignores_names_not_registered_in_the_layer(reg: Registry) -> None:
    reg.create_name("pong").layers.add("other")
    assert reg.name_for_hash("local", "SHA3_256", name_hash("SHA3_256", "pong")) is None


def test_name_for_hash_uses_the_layers_algorithm(reg: Registry) -> None:
    reg.create_name("pong").layers.add("local")
    assert reg.name_for_hash("local", "SHA3_512", name_hash("SHA3_256", "pong")) is None
    assert reg.name_for_hash("local", "SHA3_512", name_hash("SHA3_512", "pong")) is not None


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
