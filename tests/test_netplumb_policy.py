"""netplumb policy, as a pure function: who may log in, what a START may run, as whom, with which
environment. A table of cases, then invariants over every key and request hypothesis makes up."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.netplumb.keys import AuthorizedKey, Identity, parse_authorized_line, public_line
from apps.netplumb.messages import Start
from apps.netplumb.policy import (
    NOT_FOUND,
    REFUSED,
    Account,
    Plan,
    Program,
    Refused,
    Settings,
    login,
    plan,
)

KEY = Identity.generate().public
ROOT = Account("root", 0, 0, (0,), "/root", "/bin/bash")
NOBODY = Account("nobody", 65534, 65534, (65534,), "/nonexistent", "/usr/sbin/nologin")
ALICE = Account("alice", 1000, 1000, (1000, 27), "/home/alice", "/bin/bash")
ACCOUNTS = {a.name: a for a in (ROOT, NOBODY, ALICE)}
PATH = "/usr/local/bin:/usr/bin:/bin"
# What this imaginary machine has: the name or path asked -> the program found.
PROGRAMS = {
    "cat": Program("/usr/bin/cat", "/usr/bin/cat"),
    "/usr/bin/cat": Program("/usr/bin/cat", "/usr/bin/cat"),
    "/bin/cat": Program("/bin/cat", "/usr/bin/cat"),  # merged /usr: the same file
    "tar": Program("/usr/bin/tar", "/usr/bin/tar"),
    "sh": Program("/usr/bin/sh", "/usr/bin/dash"),
    "id": Program("/usr/bin/id", "/usr/bin/id"),
    "/tmp/x/cat": Program("/tmp/x/cat", "/tmp/x/cat"),  # someone's own "cat"
    "rbash": Program("/usr/bin/rbash", "/usr/bin/bash"),  # a link: bash, restricted by its argv[0]
    "bash": Program("/usr/bin/bash", "/usr/bin/bash"),
}


def which(name: str, path: str) -> Program | None:
    assert path == PATH  # the server's PATH, whatever the client sent
    return PROGRAMS.get(name)


SHELLS = frozenset({"/bin/sh", "/bin/bash"})


def config(me: Account = ROOT, accept_env: tuple[str, ...] = ()) -> Settings:
    return Settings(me, PATH, ACCOUNTS.get, which, accept_env, SHELLS, "C.UTF-8", max_channels=4)


def key(options: str = "") -> AuthorizedKey:
    entry = parse_authorized_line(f"{options} {public_line(KEY)}".strip(), "test")
    assert entry is not None
    return entry


def run(options: str, req: Start, me: Account = ROOT, accept_env: tuple[str, ...] = ()) -> Plan:
    return plan([key(options)], req, config(me, accept_env))


def refused(options: str, req: Start, me: Account = ROOT, accept_env: tuple[str, ...] = ()) -> Refused:
    with pytest.raises(Refused) as e:
        run(options, req, me, accept_env)
    return e.value


# -- login --------------------------------------------------------------------------------


def test_login_needs_an_authorized_key() -> None:
    assert "not authorized" in (login(KEY, [], spent=False) or "")
    assert login(KEY, [key()], spent=False) is None


def test_login_refuses_a_spent_one_time_key_unless_another_line_admits_it() -> None:
    otk = key('one-time,command="true"')
    assert "already used" in (login(KEY, [otk], spent=True) or "")
    assert login(KEY, [otk], spent=False) is None
    assert login(KEY, [otk, key()], spent=True) is None


# -- who it runs as ----------------------------------------------------------------------------

ARGV = Start(argv=("id",))


@pytest.mark.parametrize(
    "options, user, me, runs_as",
    [
        ("", None, ROOT, "root"),  # no users=: netplumbd's own account
        ("", "root", ROOT, "root"),
        ('users="nobody"', None, ROOT, "nobody"),  # the first listed is the default
        ('users="nobody alice"', "alice", ROOT, "alice"),
        ('users="alice,nobody"', None, ROOT, "alice"),
        ('users="root nobody"', "root", ROOT, "root"),
        ("", None, ALICE, "alice"),
        ('users="alice"', None, ALICE, "alice"),
    ],
)
def test_runs_as(options: str, user: str | None, me: Account, runs_as: str) -> None:
    assert run(options, Start(argv=("id",), user=user), me).account == ACCOUNTS[runs_as]


@pytest.mark.parametrize(
    "options, user, me, why",
    [
        ("", "nobody", ROOT, "may not run commands as 'nobody'"),  # no users=: nobody else
        ('users="nobody"', "root", ROOT, "may not run commands as 'root'"),  # users= restricts the default too
        ('users="nobody"', "alice", ROOT, "may not run commands as 'alice'"),
        ('users="ghost"', None, ROOT, "no user 'ghost' here"),
        ('users="nobody"', None, ALICE, "does not run as root and cannot switch to user 'nobody'"),
    ],
)
def test_user_refusals(options: str, user: str | None, me: Account, why: str) -> None:
    assert why in str(refused(options, Start(argv=("id",), user=user), me))


# -- what it runs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, user, argv, step",
    [
        ("", None, ("cat", "x"), (("bash", "-c", "cat x"), "/bin/bash")),
        ("", None, ("sh", "-c", "exit 7"), (("bash", "-c", "sh -c 'exit 7'"), "/bin/bash")),  # several: quoted
        ("", None, ("echo $HOME | wc -c",), (("bash", "-c", "echo $HOME | wc -c"), "/bin/bash")),  # one: a line
        ("", None, ("/tmp/x/cat",), (("bash", "-c", "/tmp/x/cat"), "/bin/bash")),  # anything goes, unrestricted
        ('users="nobody"', None, ("id",), (("sh", "-c", "id"), "/bin/sh")),  # nologin is no login shell
        ('users="alice"', None, ("id",), (("bash", "-c", "id"), "/bin/bash")),
    ],
)
def test_an_unrestricted_key_runs_the_command_line_through_the_accounts_shell(
    options: str, user: str | None, argv: tuple[str, ...], step: tuple[tuple[str, ...], str]
) -> None:
    p = run(options, Start(argv=argv, user=user))
    assert [(s.argv, s.exe) for s in p.steps] == [step]


@pytest.mark.parametrize(
    "options, argv, exe",
    [
        ('allow="cat"', ("cat",), "/usr/bin/cat"),
        ('allow="cat"', ("/bin/cat",), "/bin/cat"),  # the same file by another path
        ('allow="/usr/bin/cat"', ("cat",), "/usr/bin/cat"),
        ('allow="tar cat"', ("tar", "c", "/etc"), "/usr/bin/tar"),
        ('command="tar x -C /srv"', ("tar", "x", "-C", "/srv"), "/usr/bin/tar"),
        ('allow="rbash"', ("rbash", "-c", "id"), "/usr/bin/rbash"),
    ],
)
def test_a_restricted_key_runs_its_program_found_with_the_servers_path(
    options: str, argv: tuple[str, ...], exe: str
) -> None:
    p = run(options, Start(argv=argv))
    assert [(s.argv, s.exe) for s in p.steps] == [(argv, exe)]


def test_a_restricted_keys_single_line_is_split_not_given_to_a_shell() -> None:
    p = run('command="tar x -C \\"/a b\\""', Start(argv=('tar x -C "/a b"',)))
    assert p.steps[0].argv == ("tar", "x", "-C", "/a b") and p.steps[0].exe == "/usr/bin/tar"
    p = run('allow="cat"', Start(argv=("cat /x; sh",)))  # no shell: ';' and 'sh' are cat's arguments
    assert p.steps[0].argv == ("cat", "/x;", "sh") and p.steps[0].exe == "/usr/bin/cat"
    assert "command: No closing quotation" in str(refused('allow="cat"', Start(argv=("cat 'x",))))


@pytest.mark.parametrize(
    "options, argv, why, status",
    [
        ('allow="cat"', ("/tmp/x/cat",), "'/tmp/x/cat' (/tmp/x/cat) is not in this key's allowlist", REFUSED),
        ('allow="cat"', ("tar",), "is not in this key's allowlist (cat)", REFUSED),
        ('allow="rbash"', ("bash", "-c", "id"), "'bash' (/usr/bin/bash) is not in this key's allowlist", REFUSED),
        ('allow="nosuch"', ("cat",), "allowlist (nosuch)", REFUSED),
        ('allow=""', ("cat",), "allowlist (empty)", REFUSED),
        ('allow="cat"', ("./cat",), "give a program found in PATH or an absolute path", REFUSED),
        ('allow="cat"', ("x/cat",), "give a program found in PATH", REFUSED),
        ('allow="nosuch"', ("nosuch",), "nosuch: command not found", NOT_FOUND),
        ('command="tar x -C /srv"', ("tar", "x", "-C", "/"), "may only run: tar x -C /srv", REFUSED),
    ],
)
def test_program_refusals(options: str, argv: tuple[str, ...], why: str, status: int) -> None:
    e = refused(options, Start(argv=argv))
    assert why in str(e) and e.status == status


def test_recipe_commands_are_each_checked() -> None:
    p = run('allow="cat tar"', Start(recipe="a: tar c /etc >%b &\nb: cat >out\n"))
    assert [s.exe for s in p.steps] == ["/usr/bin/tar", "/usr/bin/cat"] and p.cwd is None
    assert "'sh' (/usr/bin/dash) is not in this key's allowlist" in str(
        refused('allow="cat"', Start(recipe="cat x\nsh -c 'cat /etc/shadow'\n"))
    )


def test_recipe_refusals() -> None:
    assert "cannot run recipes" in str(refused('command="cat"', Start(recipe="cat\n")))
    assert "bad recipe: line 1" in str(refused("", Start(recipe="cat >%nowhere\n")))


def test_first_admitting_line_wins_else_the_first_reason() -> None:
    lines = [key('allow="tar"'), key('users="nobody",allow="cat"')]
    p = plan(lines, Start(argv=("cat",)), config())
    assert p.account == NOBODY and p.line == lines[1].line
    with pytest.raises(Refused, match=r"allowlist \(tar\)"):
        plan(lines, Start(argv=("id",)), config())


def test_one_time_is_in_the_plan() -> None:
    assert run('one-time,command="id"', ARGV).one_time
    assert not run("", ARGV).one_time


def test_channels_are_limited() -> None:
    req = Start(argv=("cat",), infifos=tuple((3 + i, f"/tmp/f{i}") for i in range(5)))
    assert "at most 4" in str(refused("", req))


# -- environment (AcceptEnv) ---------------------------------------------------------------------

CLIENT_ENV = (("NP_OK", "1"), ("LD_PRELOAD", "/tmp/evil.so"), ("PATH", "/tmp/x"), ("HOME", "/tmp"))


def test_client_variables_are_dropped_unless_accepted() -> None:
    p = run('users="nobody"', Start(argv=("id",), env=CLIENT_ENV))
    assert dict(p.env) == {
        "PATH": PATH,
        "HOME": "/nonexistent",
        "USER": "nobody",
        "LOGNAME": "nobody",
        "SHELL": "/usr/sbin/nologin",
        "LANG": "C.UTF-8",
    }
    assert p.ignored_env == ("NP_OK", "LD_PRELOAD", "PATH", "HOME")


def test_accepted_variables_pass_by_pattern() -> None:
    p = run("", Start(argv=("id",), env=CLIENT_ENV), accept_env=("NP_*",))
    assert dict(p.env)["NP_OK"] == "1" and dict(p.env)["PATH"] == PATH and "LD_PRELOAD" not in dict(p.env)


def test_a_command_key_gets_no_client_variables_even_accepted_ones() -> None:
    p = run('command="id"', Start(argv=("id",), env=CLIENT_ENV), accept_env=("*",))
    assert "NP_OK" not in dict(p.env) and dict(p.env)["PATH"] == PATH


@pytest.mark.parametrize("options", ['allow="cat"', 'allow="cat",users="nobody"', 'allow=""', 'command="id"'])
def test_a_restricted_key_gets_no_client_variables_even_accepted_ones(options: str) -> None:
    """LD_PRELOAD, BASH_ENV, PATH... would run code of the client's in an allowed program: a key
    restricted by allow= gets none of the client's variables, as one bound to a command."""
    argv = ("id",) if "command" in options else ("cat",)
    danger = (("LD_PRELOAD", "/tmp/evil.so"), ("BASH_ENV", "/tmp/evil.sh"), ("PYTHONPATH", "/tmp"), ("IFS", "/"))
    env = CLIENT_ENV + danger
    if options == 'allow=""':
        refused(options, Start(argv=argv, env=env), accept_env=("*",))
        return
    p = run(options, Start(argv=argv, env=env), accept_env=("*",))
    got = dict(p.env)
    assert not {name for name, _ in env} - {"PATH", "HOME"} & got.keys(), got
    assert got["PATH"] == PATH and got["HOME"] in ("/root", "/nonexistent")
    assert set(p.ignored_env) == {name for name, _ in env}


def test_an_unrestricted_key_keeps_accept_env() -> None:
    p = run('users="nobody"', Start(argv=("cat",), env=CLIENT_ENV), accept_env=("*",))
    assert dict(p.env)["LD_PRELOAD"] == "/tmp/evil.so" and dict(p.env)["PATH"] == "/tmp/x"
    assert p.ignored_env == ()


# -- invariants over any key and any request -----------------------------------------------------

NAMES = st.sampled_from(["cat", "/bin/cat", "tar", "sh", "id", "/tmp/x/cat", "nosuch", "./cat"])
USERS = st.sampled_from(["root", "nobody", "alice", "ghost"])


@st.composite
def entries(draw: st.DrawFn) -> AuthorizedKey:
    allow = draw(st.none() | st.frozensets(NAMES, max_size=3))
    users = tuple(draw(st.lists(USERS, max_size=3, unique=True)))
    command = draw(st.none() | st.tuples(NAMES, st.sampled_from(["x", "-C"])))
    return AuthorizedKey(KEY, "", allow, users, command, command is not None and draw(st.booleans()), 1)


@st.composite
def requests(draw: st.DrawFn) -> Start:
    if draw(st.booleans()):
        argv: tuple[str, ...] = (draw(NAMES), *draw(st.lists(st.sampled_from(["x", "-C"]), max_size=2)))
        recipe = None
    else:
        argv, recipe = (), "\n".join(f"{n} x" for n in draw(st.lists(NAMES, min_size=1, max_size=3)))
    env = tuple(draw(st.lists(st.tuples(st.sampled_from(["NP_OK", "LD_PRELOAD", "PATH"]), st.just("v")), max_size=3)))
    return Start(argv, recipe, draw(st.none() | USERS), env)


@settings(max_examples=500)
@given(entries(), requests(), st.sampled_from([ROOT, ALICE]), st.sampled_from([(), ("NP_*",), ("*",)]))
def test_every_plan_keeps_every_rule(
    entry: AuthorizedKey, req: Start, me: Account, accept_env: tuple[str, ...]
) -> None:
    try:
        p = plan([entry], req, config(me, accept_env))
    except Refused as e:
        assert e.status in (REFUSED, NOT_FOUND) and str(e)
        return
    env = dict(p.env)
    # who: a listed user, or netplumbd's own account when none is listed; switching only as root
    assert p.account.name in (entry.users or (me.name,))
    assert p.account.uid == me.uid or me.uid == 0
    if req.user is not None:
        assert p.account.name == req.user
    # what: a restricted key or a recipe runs programs the server's PATH found, an allowlist the very
    # files it names, a command key its command; an unrestricted command goes to the account's shell
    restricted = entry.allow is not None or entry.command is not None
    for step in p.steps:
        if req.recipe is None and not restricted:
            shell = p.account.shell if p.account.shell in SHELLS else "/bin/sh"
            assert step.exe == shell and step.argv[:2] == (shell.rsplit("/", 1)[1], "-c")
            continue
        found = which(step.argv[0], PATH)
        assert found is not None and step.exe == found.path
        if entry.allow is not None:
            assert found.real in {f.real for a in entry.allow if (f := which(a, PATH))}
    if entry.command is not None:
        assert req.recipe is None and p.steps[0].argv == entry.command
    # environment: ours, plus accepted client variables only, none for a restricted key
    assert env["PATH"] == PATH or (("PATH" in accept_env or accept_env == ("*",)) and not restricted)
    assert env["USER"] == p.account.name and env["HOME"] == p.account.home
    for name, _ in req.env:
        accepted = not restricted and any(name.startswith(a.rstrip("*")) for a in accept_env)
        assert (name in p.ignored_env) != accepted
    assert p.one_time == entry.one_time
