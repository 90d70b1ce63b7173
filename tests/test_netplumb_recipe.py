"""netplumb recipes: the parser (labels, pipes, redirections, clear errors, fuzz) and running one."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.netplumb.jobs import Exe, Launch
from apps.netplumb.recipe import File, RecipeError, RecipeJob, ToLabel, ToNext, ToStdout, parse_recipe

SEED_EXAMPLE = """\
# labelled commands, as the seed's recipe format
label1: tar c /etc/hostname >%label3 2>%label2 &
label2: cat >errors.log &
label3: gzip -c | wc -c
"""


def test_seed_style_recipe_parses() -> None:
    cmds = parse_recipe(SEED_EXAMPLE)
    assert [c.label for c in cmds] == ["label1", "label2", "label3", None]
    assert cmds[0].argv == ["tar", "c", "/etc/hostname"]
    assert cmds[0].stdout == ToLabel("label3") and cmds[0].stderr == ToLabel("label2")
    assert not cmds[0].wait and not cmds[1].wait
    assert cmds[1].stdout == File("errors.log")
    assert cmds[2].stdout == ToNext() and cmds[3].fed and cmds[2].fed and cmds[1].fed
    assert cmds[3].argv == ["wc", "-c"] and cmds[3].wait


def test_a_label_is_sent_to_as_the_seed_writes_it_colon_and_all() -> None:
    """The seed: '>%label: will send its output to ... and 2>%label3: will send its stderr'."""
    a, _, _ = parse_recipe("a: tar c /etc >%label3: 2>%label2: &\nlabel2: cat &\nlabel3: wc -c")
    assert (a.stdout, a.stderr) == (ToLabel("label3"), ToLabel("label2"))
    for bad in ("echo >%a::\na: cat", "echo >%:\na: cat"):
        with pytest.raises(RecipeError, match="bad label"):
            parse_recipe(bad)


def test_redirections() -> None:
    (c,) = parse_recipe("sort <in.txt >>out.txt 2>&1")
    assert c.stdin == File("in.txt") and c.stdout == File("out.txt", append=True) and c.stderr == ToStdout()
    (c,) = parse_recipe('x 2>>err \'a b\' "c\\"d" e\\ f # comment')
    assert c.stderr == File("err", append=True) and c.argv == ["x", "a b", 'c"d', "e f"]


def test_pipe_at_end_of_line_feeds_the_next_line() -> None:
    a, b = parse_recipe("echo hi |\ncat")
    assert a.stdout == ToNext() and b.fed


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "no commands"),
        ("echo |", "pipes into nothing"),
        ("| cat", "without a command"),
        ("a: echo >%nowhere", "no command is labelled"),
        ("a: echo\na: cat", "used twice"),
        ("a: cat >%a", "own stdin"),
        ("echo > ", "needs a file name"),
        ("echo >a >b", "redirected twice"),
        ("echo 'x", "unterminated"),
        ("echo >>%a\na: cat", "a label takes"),
        ("echo hi | cat <f", "both a pipe and"),
        ("lonely:", "without a command"),
    ],
)
def test_bad_recipes_name_the_problem(text: str, why: str) -> None:
    with pytest.raises(RecipeError, match=why):
        parse_recipe(text)


def test_errors_name_the_line() -> None:
    with pytest.raises(RecipeError, match="line 3"):
        parse_recipe("echo a\necho b\necho >%x\n")


@settings(max_examples=200)
@given(st.text(alphabet="ab: |&;<>%2\n'\"\\#x", max_size=40))
def test_fuzz_parser_only_raises_recipe_errors(text: str) -> None:
    with contextlib.suppress(RecipeError):
        parse_recipe(text)


def _job(text: str, open_timeout: float = 10.0) -> RecipeJob:
    """The job as the runner starts it: programs found in PATH, in the current directory."""
    commands = parse_recipe(text)
    exes = [Exe(shutil.which(c.argv[0]) or c.argv[0]) for c in commands]
    return RecipeJob(commands, exes, Launch(dict(os.environ)), open_timeout)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the runner works in the user's recipe directory


def _run(text: str, tmp_path: Path, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    job = _job(text)
    out: dict[int, bytes] = {}

    def drain(fd: int) -> None:
        chunks = []
        while data := os.read(fd, 65536):
            chunks.append(data)
        out[fd] = b"".join(chunks)
        os.close(fd)

    threads = [threading.Thread(target=drain, args=(fd,)) for fd in (job.stdout, job.stderr)]
    for t in threads:
        t.start()
    os.write(job.stdin, stdin)
    os.close(job.stdin)
    code = job.wait()
    job.reap()  # as the runner does once the end is reported
    for t in threads:
        t.join(10)
    return code, out[job.stdout], out[job.stderr]


def test_run_labels_and_pipes(tmp_path: Path) -> None:
    text = (
        "src: sh -c 'echo out; echo err >&2' >%up 2>%low &\n"
        "up: tr a-z A-Z >upper.txt &\n"
        "low: cat >lower.txt\n"
        "sleep 0.2\n"
        "cat upper.txt lower.txt | sort\n"
    )
    code, out, _ = _run(text, tmp_path)
    assert code == 0 and out == b"OUT\nerr\n"
    assert (tmp_path / "upper.txt").read_text() == "OUT\n"
    assert (tmp_path / "lower.txt").read_text() == "err\n"


def test_run_stdin_goes_to_the_first_unfed_command_and_status_is_first_failure(tmp_path: Path) -> None:
    code, out, _ = _run("tr a-z A-Z | cat\nsh -c 'exit 3'\nsh -c 'exit 4'", tmp_path, b"hello\n")
    assert out == b"HELLO\n" and code == 3


def test_run_missing_program_reports_127(tmp_path: Path) -> None:
    code, _, err = _run("no-such-program-xyz", tmp_path)
    assert code == 127 and b"cannot run no-such-program-xyz" in err


def test_unopenable_file_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot open"):
        _job(f"touch {tmp_path}/ran\ncat <{tmp_path}/missing/x")
    assert not (tmp_path / "ran").exists()


def test_files_a_recipe_makes_are_private(tmp_path: Path) -> None:
    code, _, _ = _run("echo hi >made.txt", tmp_path)
    assert code == 0 and os.stat(tmp_path / "made.txt").st_mode & 0o777 == 0o600


def test_redirection_from_a_pipe_nobody_writes_gives_up_with_a_reason(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "lonely")
    t0 = time.monotonic()
    with pytest.raises(RecipeError, match=r"lonely: nothing opened the other end of this named pipe within 0\.3 s"):
        _job("cat <lonely\n", open_timeout=0.3)
    assert time.monotonic() - t0 < 5
    with pytest.raises(RecipeError, match=r"within 0\.3 s"):
        _job("echo x >lonely\n", open_timeout=0.3)


def test_redirection_meets_a_writer_that_comes_meanwhile(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")

    def writer() -> None:
        fd = os.open(tmp_path / "pipe", os.O_WRONLY)  # waits for the recipe's `<`
        os.write(fd, b"through the pipe\n")
        os.close(fd)

    t = threading.Thread(target=writer)
    t.start()
    code, out, _ = _run("cat <pipe\n", tmp_path)
    t.join(10)
    assert code == 0 and out == b"through the pipe\n"


@pytest.mark.parametrize("to", [">only-out.txt", ">%sink"])
def test_stderr_to_stdout_takes_stdout_where_it_stands_as_sh_does(to: str, tmp_path: Path) -> None:
    """`2>&1 >file`: stderr goes where stdout went before `>file` (the session's stdout), and only
    stdout into the file; `>file 2>&1` sends both into it."""
    text = f"sh -c 'echo out; echo err >&2' 2>&1 {to}\nsink: cat >only-out.txt\n"
    code, out, err = _run(text if "%" in to else text.splitlines()[0], tmp_path)
    assert (code, out, err) == (0, b"err\n", b"")
    assert (tmp_path / "only-out.txt").read_text() == "out\n"
    code, out, err = _run("sh -c 'echo out; echo err >&2' >both.txt 2>&1", tmp_path)
    assert (code, out, err) == (0, b"", b"")
    assert sorted((tmp_path / "both.txt").read_text().splitlines()) == ["err", "out"]
