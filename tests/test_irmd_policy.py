"""Who may do what at the IRMd (irmd.policy, irmd.limits, irmd.views): pure functions, every case."""

from __future__ import annotations

import json

import pytest

from irmd import policy, views
from irmd.limits import LimitError, Limits, parse_options
from irmd.policy import Caller
from irmd.spawn import RunAs, clean_env, ipcp_command, run_as
from proto import messages as m
from proto.errors import PermissionDenied
from transports.wire import MAX_BODY

IRMD = 4242
ROOT, HOST, USER, OTHER = Caller.of(0, IRMD), Caller.of(IRMD, IRMD), Caller.of(1000, IRMD), Caller.of(1001, IRMD)
ADMINS, USERS = (ROOT, HOST), (USER, OTHER)


def test_admins_are_root_and_the_irmds_user() -> None:
    assert ROOT.admin and HOST.admin and not USER.admin


@pytest.mark.parametrize("kind", sorted(policy.ADMIN_ONLY, key=lambda k: k.__name__))
def test_only_admins_manage_ipcps(kind: type[m.Message]) -> None:
    for caller in ADMINS:
        policy.check_request(caller, kind)
    for caller in USERS:
        with pytest.raises(PermissionDenied, match="managing IPCPs"):
            policy.check_request(caller, kind)


@pytest.mark.parametrize("kind", [m.ProcAnnounce, m.FlowAlloc, m.FlowAccept, m.FlowListen, m.FlowDealloc,
                                  m.FlowInfo, m.IpcpList, m.NameList, m.FlowList, m.Dump, m.Bind, m.NameCreate,
                                  m.NameDestroy, m.NameRegister])
def test_users_may_ask_the_rest_and_each_is_checked_on_what_it_touches(kind: type[m.Message]) -> None:
    policy.check_request(USER, kind)


def test_a_user_acts_on_their_own_names_and_new_ones_only() -> None:
    policy.check_name(USER, USER.uid, "mine")
    policy.check_name(USER, None, "new")
    for owner in (OTHER.uid, 0, IRMD):
        with pytest.raises(PermissionDenied, match=f"belongs to uid {owner}"):
            policy.check_name(USER, owner, "theirs")
    for caller in ADMINS:
        policy.check_name(caller, USER.uid, "any")


@pytest.mark.parametrize("kind", ["program", "ipcp"])
def test_users_never_bind_programs_or_ipcps(kind: str) -> None:
    with pytest.raises(PermissionDenied, match=f"binding {kind}s needs root"):
        policy.check_bind(USER, kind, USER.uid)
    for caller in ADMINS:
        policy.check_bind(caller, kind, None)


def test_a_user_binds_their_own_processes_only() -> None:
    policy.check_bind(USER, "process", USER.uid)
    for target in (OTHER.uid, 0, IRMD, -1):  # -1: real and effective uid differ (setuid)
        with pytest.raises(PermissionDenied, match="not yours"):
            policy.check_bind(USER, "process", target)
    policy.check_bind(ROOT, "process", OTHER.uid)


def test_an_admin_may_not_bind_a_program_to_a_users_name() -> None:
    with pytest.raises(PermissionDenied, match="belongs to uid 1000: destroy it"):
        policy.check_admin_name(ROOT, USER.uid, "squatted", IRMD)
    policy.check_admin_name(ROOT, IRMD, "hosts", IRMD)
    policy.check_admin_name(HOST, 0, "roots", IRMD)


def test_users_see_their_own_things_admins_all() -> None:
    assert policy.visible(USER, USER.uid) and not policy.visible(USER, OTHER.uid) and not policy.visible(USER, 0)
    assert all(policy.visible(c, USER.uid) for c in ADMINS)


# -- limits ----------------------------------------------------------------------------


def test_limits_have_defaults_and_take_options() -> None:
    limits = parse_options(["flows_per_uid=10", "conns_per_uid = 0x10"])
    assert (limits.flows_per_uid, limits.conns_per_uid) == (10, 16)
    assert limits.names_per_uid == Limits().names_per_uid


@pytest.mark.parametrize(("words", "says"), [
    (["nope=1"], "unknown limit 'nope'"), (["flows_per_uid"], "expected KEY=N"),
    (["flows_per_uid=x"], "expected a whole number"), (["flows_per_uid=0"], "from 1 to"),
])
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
    env = clean_env(Path("/run/ouroboros/irmd.sock"), RunAs(None, None, "/root", "root"))
    assert env == {"PATH": env["PATH"], "HOME": "/root", "USER": "root", "LOGNAME": "root", "LANG": "C.UTF-8",
                   "OUROBOROS_SOCK": "/run/ouroboros/irmd.sock"}


def test_ipcps_run_isolated_from_the_callers_python_settings() -> None:
    from pathlib import Path

    argv = ipcp_command("local", "lo", Path("/s"))
    assert argv[1] == "-I" and argv[-3:] == ["local", "lo", "/s"]


def test_a_user_registers_names_in_local_layers_only() -> None:
    policy.check_register(USER, "local", "local")
    for kind in ("unicast", "broadcast", "udp4", "udp6", "eth-dix", "eth-llc"):
        with pytest.raises(PermissionDenied, match=f"registering names in {kind} layer 'l' needs root"):
            policy.check_register(USER, kind, "l")
        for caller in ADMINS:
            policy.check_register(caller, kind, "l")
