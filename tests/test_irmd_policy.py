"""Who may do what at the IRMd (irmd.policy, irmd.limits, irmd.views): pure functions, every case."""

from __future__ import annotations

import json

import pytest

from irmd import policy, views
from irmd.limits import ADMIN_RESERVE, LimitError, Limits, parse_options
from irmd.policy import Caller
from irmd.spawn import Output, RunAs, clean_env, ipcp_command, run_as
from proto import messages as m
from proto.errors import PermissionDenied
from transports.wire import MAX_BODY

IRMD = 4242
ROOT, HOST, USER, OTHER = Caller.of(0, IRMD), Caller.of(IRMD, IRMD), Caller.of(1000, IRMD), Caller.of(1001, IRMD)
ADMINS, USERS = (ROOT, HOST), (USER, OTHER)


def test_admins_are_root_and_the_irmds_user() -> None:
    assert ROOT.admin and HOST.admin and not USER.admin


@pytest.mark.parametrize("kind", sorted(policy.ADMIN_ONLY, key=lambda k: k.__name__))
def test_only_admins_manage_ipcps_names_and_bindings(kind: type[m.Message]) -> None:
    for caller in ADMINS:
        policy.check_request(caller, kind)
    for caller in USERS:
        with pytest.raises(PermissionDenied, match=f"{policy.ADMIN_ONLY[kind]} needs root"):
            policy.check_request(caller, kind)


USERS_MAY = {
    m.ProcAnnounce,
    m.FlowAlloc,
    m.FlowAccept,
    m.FlowListen,
    m.FlowDealloc,
    m.FlowInfo,
    m.FlowPeer,  # of the flows it holds only (test_irmd_trust.py::test_who_a_flow_came_from_is_told_its_holder_alone)
    m.IpcpList,
    m.NameList,
    m.FlowList,
    m.Dump,
    m.ActAs,
}


@pytest.mark.parametrize("kind", sorted(USERS_MAY, key=lambda k: k.__name__))
def test_users_use_flows_and_list_their_own(kind: type[m.Message]) -> None:
    policy.check_request(USER, kind)


def test_every_request_is_either_for_admins_or_for_users_by_design() -> None:
    asked = {cls for cls in m.CODEC.types.values() if cls.__module__ == m.__name__}
    replies = {m.Ok, m.Table, m.FlowReply, m.Text, m.LayerInfo, m.IpcpFlow, m.IpcpFlowAccepted, m.IpcpInfo}
    ipcp_side = {
        m.IpcpBootstrapReq,
        m.IpcpEnrollReq,
        m.IpcpConnectReq,
        m.IpcpReg,
        m.IpcpQuery,
        m.IpcpFlowAlloc,
        m.IpcpFlowDealloc,
        m.IpcpAnnounce,
    }
    assert asked - replies - ipcp_side - policy.FROM_IPCP == USERS_MAY | set(policy.ADMIN_ONLY)
    assert policy.FOR_USERS == USERS_MAY  # widening what users may ask is a decision, made here too


@pytest.mark.parametrize("kind", sorted(set(m.CODEC.types.values()) - USERS_MAY, key=lambda k: k.__name__))
def test_users_may_ask_nothing_else_not_even_kinds_added_later(kind: type[m.Message]) -> None:
    with pytest.raises(PermissionDenied, match="needs root"):
        policy.check_request(USER, kind)
    policy.check_request(ROOT, kind)


def test_a_kind_nobody_listed_is_the_admins() -> None:
    class Novel(m.Message):
        TYPE = 999

    with pytest.raises(PermissionDenied, match="Novel requests needs root"):
        policy.check_request(USER, Novel)
    policy.check_request(HOST, Novel)


def test_users_see_their_own_things_admins_all() -> None:
    assert policy.visible(USER, USER.uid) and not policy.visible(USER, OTHER.uid) and not policy.visible(USER, 0)
    assert all(policy.visible(c, USER.uid) for c in ADMINS)


# -- limits ----------------------------------------------------------------------------


def test_limits_have_defaults_and_take_options() -> None:
    limits = parse_options(["flows_per_uid=10", "conns_per_uid = 0x10"])
    assert (limits.flows_per_uid, limits.conns_per_uid) == (10, 16)
    assert limits.accepts_per_conn == Limits().accepts_per_conn


def test_totals_leave_admins_a_reserve_of_descriptors(caplog: pytest.LogCaptureFixture) -> None:
    assert Limits().fit_descriptors(1 << 20) == Limits()  # room enough: as configured
    fitted = Limits().fit_descriptors(1024)  # a common default hard limit
    assert fitted.conns_total + fitted.flows_total <= 1024 - ADMIN_RESERVE
    assert fitted.conns_total >= 1 and fitted.flows_total >= 1 and "conns_total=96" in caplog.text
    assert Limits().fit_descriptors(10).conns_total == 1  # never zero: users still get something


def test_users_allocations_under_way_leave_the_ipcps_shared_pools_to_the_admins() -> None:
    """Each allocation under way holds a place in a pool its IPCP shares among all users: users
    together must leave at least half of each to the admins (who are never counted)."""
    from ipcp.shim import Limits as ShimLimits
    from ipcp.unicast.dir import MAX_LOOKUPS

    limits = Limits()
    assert limits.allocs_per_uid <= limits.allocs_total
    assert limits.allocs_total <= ShimLimits().queries // 2
    assert limits.allocs_total <= MAX_LOOKUPS // 2


def test_a_users_share_of_each_ipcps_flows_leaves_room_to_others_and_to_the_admins() -> None:
    """A shim holds few flows (eth-llc: its 62 SAPs): a user holds at most half of them, and users
    together leave the admins a quarter; a shim tells the IRMd its capacity as it joins its layer."""
    from ipcp.shim import ShimCore
    from ipcp.shim_wire import ETH_DIX, ETH_LLC, UDP
    from irmd.limits import share

    capacity = {
        layout.name: ShimCore(layout, hash_len=16, own=b"x", discovery=False).flow_capacity
        for layout in (UDP, ETH_DIX, ETH_LLC)
    }
    assert capacity == {"udp": 4096, "eth-dix": 4096, "eth-llc": 62}
    limits = Limits()
    assert (share(62, limits.ipcp_share_per_uid), share(62, limits.ipcp_share_users)) == (31, 46)
    assert share(1, limits.ipcp_share_per_uid) == 1  # never none
    assert parse_options(["ipcp_share_per_uid=10"]).ipcp_share_per_uid == 10
    with pytest.raises(LimitError, match="ipcp_share_users = 101: expected a number from 1 to 100"):
        parse_options(["ipcp_share_users=101"])


def test_a_names_program_is_not_started_while_enough_started_for_it_run_without_serving_it() -> None:
    """A program that never comes to accept (stuck at its start) was started again every START_GRACE
    for as long as flows came: a process more, as the binding's owner, every 10 s without end."""
    import types

    from irmd.programs import UNSERVED_MAX, Programs
    from irmd.reg import ProgBinding

    spawned: list[object] = []
    irmd = types.SimpleNamespace(reg=types.SimpleNamespace(started={}), spawn_task=spawned.append)
    programs = Programs(irmd)  # type: ignore[arg-type]
    prog = ProgBinding("/bin/sleep", ["600"], auto=True)
    for pid in range(UNSERVED_MAX):
        irmd.reg.started[1000 + pid] = ("svc", 1)
    programs.start("svc", prog)
    assert not spawned, "started beside UNSERVED_MAX that do not serve the name"
    irmd.reg.started[2000] = ("other", 1)
    del irmd.reg.started[1000]  # one of them ended
    programs.start("svc", prog)
    assert len(spawned) == 1
    spawned[0].close()  # type: ignore[attr-defined]  # the coroutine, not run here


@pytest.mark.parametrize(
    ("words", "says"),
    [
        (["nope=1"], "unknown limit 'nope'"),
        (["flows_per_uid"], "expected KEY=N"),
        (["flows_per_uid=x"], "expected a whole number"),
        (["flows_per_uid=0"], "from 1 to"),
    ],
)
def test_bad_limits_are_refused_naming_them(words: list[str], says: str) -> None:
    with pytest.raises(LimitError, match=says):
        parse_options(words)


def test_config_values_may_be_numbers() -> None:
    assert Limits().with_values({"accepts_per_conn": 3}).accepts_per_conn == 3
    with pytest.raises(LimitError, match="whole number"):
        Limits().with_values({"accepts_per_conn": True})


# -- views: pages, parts, secrets ---------------------------------------------------------


def rows(n: int, width: int = 100) -> list[tuple[int, dict[str, str]]]:
    return [(i, {"id": str(i), "pad": "x" * width}) for i in range(1, n + 1)]


def test_a_long_list_comes_in_pages_that_each_fit_a_frame_and_join_to_all() -> None:
    got: list[dict[str, str]] = []
    start, pages = 0, 0
    while True:
        table = views.page(["id", "pad"], rows(10_000), start)
        assert len(m.CODEC.encode(table)) <= MAX_BODY
        got += table.rows
        pages += 1
        if not table.next:
            break
        start = table.next
    assert [r["id"] for r in got] == [str(i) for i in range(1, 10_001)] and pages > 1


def test_a_page_starts_at_the_key_asked_even_if_rows_went_meanwhile() -> None:
    table = views.page(["id", "pad"], [(k, r) for k, r in rows(10) if k != 5], start=5)
    assert table.rows[0]["id"] == "6"


def test_a_cell_too_long_for_a_frame_is_cut_saying_how_much_is_left_out() -> None:
    pids = ",".join(str(i) for i in range(100_000))
    table = views.page(["name", "pids"], [(1, {"name": "n", "pids": pids})])
    assert len(m.CODEC.encode(table)) <= MAX_BODY and table.rows[0]["pids"].endswith("more)")


def test_a_long_text_comes_in_parts_that_each_fit_a_frame() -> None:
    text = json.dumps(["\u2603" * 10] * 20_000)
    out, offset = "", 0
    while True:
        part = views.text_part(text, offset)
        assert len(m.CODEC.encode(part)) <= MAX_BODY
        out += part.text
        if not part.next:
            break
        offset = part.next
    assert out == text


def test_secrets_are_redacted() -> None:
    assert views.redact({"key": "s3cret", "addr": "4"}) == {"key": views.REDACTED, "addr": "4"}


# -- what started processes get -----------------------------------------------------------


def test_a_root_irmd_runs_a_program_as_its_owner_a_users_irmd_as_itself() -> None:
    assert run_as(0, 0).uid is None
    nobody = run_as(65534, 0)
    assert nobody.uid == 65534 and nobody.gid is not None
    assert run_as(0, 1000).uid is None and run_as(65534, 1000).uid is None  # cannot switch: stays itself


def test_started_processes_get_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", "/evil")
    monkeypatch.setenv("LD_PRELOAD", "/evil.so")
    monkeypatch.setenv("LANG", "C.UTF-8")
    env = clean_env(
        Path("/run/ouroboros/irmd.sock"),
        RunAs(None, None, "/root", "root"),
        Output(env={"OUROBOROS_LOG_LEVEL": "INFO"}),
    )
    assert env == {
        "PATH": env["PATH"],
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "LANG": "C.UTF-8",
        "OUROBOROS_SOCK": "/run/ouroboros/irmd.sock",
        "OUROBOROS_LOG_LEVEL": "INFO",
    }  # only the log's own


def test_ipcps_run_isolated_from_the_callers_python_settings() -> None:
    from pathlib import Path

    argv = ipcp_command("local", "lo", Path("/s"))
    assert argv[1] == "-I" and argv[-3:] == ["local", "lo", "/s"]
