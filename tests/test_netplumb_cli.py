"""plumb's command line, as ssh takes it: options before and after the host, ssh's short options and
the seed's -NAME=VALUE, USER@HOST, `--`; every mistake a usage error that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from apps.netplumb.client import Request, UsageError, parse_args


@pytest.mark.parametrize(
    "args, want",
    [
        (["host2", "echo", "hi"], Request("host2", ["echo", "hi"])),
        (["-v", "host2", "ls", "-l"], Request("host2", ["ls", "-l"], verbose=1)),  # -l after the host is the command's
        (["host2", "-vv", "ls"], Request("host2", ["ls"], verbose=2)),  # options after the host, as ssh
        (["-vvv", "-q", "host2", "ls"], Request("host2", ["ls"], verbose=3, quiet=True)),
        (["-l", "nobody", "host2", "id"], Request("host2", ["id"], user="nobody")),
        (["-lnobody", "host2", "id"], Request("host2", ["id"], user="nobody")),
        (["nobody@host2", "id"], Request("host2", ["id"], user="nobody")),
        (["-user=nobody", "nobody@host2", "id"], Request("host2", ["id"], user="nobody")),
        (["host2", "-user=nobody", "id"], Request("host2", ["id"], user="nobody")),  # the seed's order
        (["-i", "/k/id", "host2", "id"], Request("host2", ["id"], key=Path("/k/id"))),
        (["-vi/k/id", "host2", "id"], Request("host2", ["id"], key=Path("/k/id"), verbose=1)),
        (["host2", "-key=/k/id", "id"], Request("host2", ["id"], key=Path("/k/id"))),
        (["host2", "--", "-weird", "arg"], Request("host2", ["-weird", "arg"])),
        (["--", "host2", "ls"], Request("host2", ["ls"])),
        (["host2", "-export=A,B", "-export=C", "env"], Request("host2", ["env"], export=["A", "B", "C"])),
        (
            ["host2", "-infifo=/l:/r", "-outfifo=/o", "-socket=/s:/t", "true"],
            Request("host2", ["true"], infifos=[("/l", "/r")], outfifos=[("/o", "/o")], sockets=[("/s", "/t")]),
        ),
        (["host2", "echo $HOME | wc"], Request("host2", ["echo $HOME | wc"])),  # one line, for the remote shell
    ],
)
def test_parses_like_ssh(args: list[str], want: Request) -> None:
    assert parse_args(args) == want


def test_recipe_is_read_and_checked_locally(tmp_path: Path) -> None:
    (tmp_path / "r").write_text("cat\n")
    assert parse_args([f"-recipe={tmp_path / 'r'}", "host2"]).recipe == "cat\n"
    (tmp_path / "bad").write_text("cat >%nowhere\n")
    with pytest.raises(UsageError, match="line 1"):
        parse_args(["host2", f"-recipe={tmp_path / 'bad'}"])


@pytest.mark.parametrize(
    "args, why",
    [
        ([], "no HOST"),
        (["-v"], "no HOST"),
        (["host2"], "no command"),
        (["-x", "host2", "ls"], "unknown option '-x'"),
        (["-infifo", "/a", "host2", "ls"], "'-infifo': -infifo= takes a value"),  # not -i nfifo
        (["-users=x", "host2", "ls"], "unknown option '-users=x'"),
        (["-l"], "-l needs a value"),
        (["-l", "root", "nobody@host2", "id"], "the user is given twice: 'root' and 'nobody'"),
        (["@host2", "id"], "an empty user name"),
        (["nobody@", "id"], "no HOST in 'nobody@'"),
        (["host2", "-infifo=rel", "ls"], "absolute REMOTE path"),
        (["host2", "-recipe=/nonexistent/r"], "-recipe=/nonexistent/r: No such file"),
    ],
)
def test_mistakes_are_named(args: list[str], why: str) -> None:
    with pytest.raises(UsageError, match=why):
        parse_args(args)


def test_a_recipe_and_a_command_at_once_is_a_mistake(tmp_path: Path) -> None:
    (tmp_path / "r").write_text("cat\n")
    with pytest.raises(UsageError, match="either a command or -recipe="):
        parse_args(["host2", f"-recipe={tmp_path / 'r'}", "ls"])
