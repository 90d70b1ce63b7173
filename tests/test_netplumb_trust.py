"""netplumb trust, end to end: netplumbd as root, the attacker as uid 65534 (setpriv) holding keys
restricted to `nobody`. Each test plays an attack, asserts it fails, and that the legitimate use beside
it still works: work done as the target user, private recipe directories, AcceptEnv, programs from the
server's PATH, one-time keys spent once, StrictModes, and every limit reached with a reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import resource
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, children_of, free_port, pid_alive, start_irmd, stop_irmd, udp4_bootstrap, wait_for
from netplumb_lab import NOBODY, PY, Lab, lab_dir, needs_root, running_lab

pytestmark = [needs_root, pytest.mark.timeout(120)]

SECRET = "secret-of-root-4f2a"
OTHER = pwd.getpwnam("daemon").pw_uid  # a second unprivileged user


@pytest.fixture
def lab() -> Iterator[Lab]:
    with running_lab() as lab:
        yield lab


def _files(lab: Lab) -> tuple[Path, Path, Path, Path]:
    """A public file, a root-only one, a root-only directory, one nobody may write in."""
    public, secret = lab.root / "public.txt", lab.root / "secret.txt"
    public.write_text("public words\n")
    os.chmod(public, 0o644)
    secret.write_text(SECRET + "\n")
    os.chmod(secret, 0o600)
    rootonly, shared = lab.root / "rootonly", lab.root / "shared"
    rootonly.mkdir(mode=0o700)
    shared.mkdir()
    os.chmod(shared, 0o1777)
    return public, secret, rootonly, shared


def _recipe(lab: Lab, name: str, text: str) -> str:
    path = lab.root / f"{name}.recipe"
    path.write_text(text)
    os.chmod(path, 0o644)
    return f"-recipe={path}"


# -- work is done as the target user ------------------------------------------------------------


def test_recipe_redirections_are_opened_as_the_target_user(lab: Lab) -> None:
    public, secret, rootonly, shared = _files(lab)
    mallory = lab.client("mallory", NOBODY, 'allow="cat",users="nobody"')
    r = lab.plumb(mallory, _recipe(lab, "legit", f"cat <{public} >{shared}/copy\ncat {shared}/copy\n"))
    assert r.returncode == 0 and r.stdout == b"public words\n", r.stderr
    assert os.stat(shared / "copy").st_uid == NOBODY  # made by nobody, not by netplumbd
    for name, text in (
        ("read", f"cat <{secret}\n"),
        ("write", f"cat >{rootonly}/planted\n"),
        ("append", f"cat >>{secret}\n"),
        ("stderr", f"cat 2>{rootonly}/err\n"),
    ):
        r = lab.plumb(mallory, _recipe(lab, name, text), input=b"planted\n")
        assert r.returncode != 0 and b"Permission denied" in r.stderr, (name, r.stderr)
        assert SECRET.encode() not in r.stdout
    assert os.listdir(rootonly) == [] and secret.read_text() == SECRET + "\n"


def test_pipes_and_sockets_are_made_as_the_target_user(lab: Lab) -> None:
    _, secret, rootonly, shared = _files(lab)
    mallory = lab.client("mallory", NOBODY, 'users="nobody"')
    src = mallory.config / "in.txt"
    src.write_bytes(b"via the pipe\n")
    os.chown(src, NOBODY, NOBODY)
    r = lab.plumb(
        mallory, f"-infifo={src}:{shared}/in.fifo", "sh", "-c", f"stat -c %U {shared}/in.fifo; cat {shared}/in.fifo"
    )
    assert r.returncode == 0 and r.stdout == b"nobody\nvia the pipe\n", r.stderr
    for opt in (
        f"-infifo={src}:{rootonly}/in.fifo",
        f"-outfifo={src}.out:{rootonly}/out.fifo",
        f"-socket={mallory.config}/s:{rootonly}/s.sock",
    ):
        r = lab.plumb(mallory, opt, "true")
        assert r.returncode == 126 and b"Permission denied" in r.stderr, (opt, r.stderr)
    assert os.listdir(rootonly) == []
    # A link planted where the pipe should go is not followed into root's file.
    os.symlink(secret, shared / "trap.fifo")
    r = lab.plumb(mallory, f"-outfifo={mallory.config}/got:{shared}/trap.fifo", "true")
    assert r.returncode == 126 and b"not a named pipe" in r.stderr
    assert secret.read_text() == SECRET + "\n" and stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_each_user_has_a_private_recipe_directory(lab: Lab) -> None:
    alice = lab.client("alice", 0)  # runs as root, netplumbd's own account
    mallory = lab.client("mallory", NOBODY, 'users="nobody"')
    r = lab.plumb(alice, _recipe(lab, "root", f"echo {SECRET} >notes.txt\n"))
    assert r.returncode == 0, r.stderr
    r = lab.plumb(mallory, _recipe(lab, "peek", "cat <../root/notes.txt\n"))
    assert r.returncode != 0 and SECRET.encode() not in r.stdout and b"Permission denied" in r.stderr
    r = lab.plumb(mallory, _recipe(lab, "own", "echo mine >notes.txt\ncat notes.txt\n"))
    assert r.returncode == 0 and r.stdout == b"mine\n", r.stderr
    mine = lab.recipes / "nobody"
    assert os.stat(mine).st_uid == NOBODY and stat.S_IMODE(os.stat(mine).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(lab.recipes).st_mode) == 0o700 and os.stat(lab.recipes).st_uid == 0
    assert (lab.recipes / "root" / "notes.txt").read_text() == SECRET + "\n"


def test_netplumbd_refuses_a_recipe_directory_others_control() -> None:
    with running_lab(args=None) as lab:
        theirs = lab.root / "theirs"
        theirs.mkdir()
        os.chown(theirs, NOBODY, NOBODY)
        loose = lab.root / "loose"
        loose.mkdir(mode=0o755)
        for d, why in ((theirs, f"owner uid {NOBODY}"), (loose, "mode 0755")):
            r = lab.start_refused(d)
            assert r.returncode == 1 and f"recipe directory {d}" in r.stderr and why in r.stderr, r.stderr
        lab.start()  # its own, made private: fine
        alice = lab.client("alice")
        assert lab.plumb(alice, "echo", "ok").stdout == b"ok\n"


# -- what runs, and with which environment ------------------------------------------------------


def test_an_account_without_a_login_shell_runs_commands_with_sh(lab: Lab) -> None:
    """nobody's shell is nologin: `users="nobody"` admits it explicitly, so /bin/sh runs its commands."""
    mallory = lab.client("mallory", NOBODY, 'users="nobody"')
    r = lab.plumb(mallory, "echo $0 $(id -un)")
    assert (r.returncode, r.stdout) == (0, b"sh nobody\n"), r.stderr


def test_allow_matches_the_program_found_in_the_servers_path(lab: Lab) -> None:
    public, _, _, shared = _files(lab)
    fake = shared / "bin"
    fake.mkdir()
    (fake / "cat").write_text(f"#!/bin/sh\ntouch {shared}/fake-ran\n")
    os.chmod(fake / "cat", 0o755)
    mallory = lab.client("mallory", NOBODY, 'allow="cat",users="nobody"')
    r = lab.plumb(mallory, str(fake / "cat"))
    assert r.returncode == 126 and b"not in this key's allowlist" in r.stderr
    r = lab.plumb(mallory, "-export=PATH", "cat", str(public), env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert r.returncode == 0 and r.stdout == b"public words\n", r.stderr
    assert not (shared / "fake-ran").exists()


SWAP = "import os, sys; os.symlink(sys.argv[2], sys.argv[1] + '.new'); os.replace(sys.argv[1] + '.new', sys.argv[1])"


def _open_gate(gate: Path, meanwhile: Callable[[], object] = lambda: None) -> None:
    """Wait for the recipe's first command to read `gate` (the recipe was checked and runs), do
    `meanwhile`, then let that command end."""

    def writer() -> int | None:
        try:
            return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            return None

    fd = wait_for(writer, 30, "the recipe reading its gate")
    try:
        meanwhile()
    finally:
        os.close(fd)


def test_the_program_run_is_the_file_checked(lab: Lab) -> None:
    """An allowed name that is a symlink of the attacker's, swapped after the check (here while the
    recipe's first command waits), runs nothing but the file allowed: the runner opens the program once,
    compares the open file with the one checked and executes that file, scripts included."""
    public, _, _, shared = _files(lab)
    tool = lab.root / "tool"
    tool.write_text("#!/bin/sh\necho tool ran as $(id -un)\n")
    os.chmod(tool, 0o755)
    x, gate = shared / "x", shared / "gate"
    x.mkdir()
    os.chown(x, NOBODY, NOBODY)
    link = x / "cat"
    os.mkfifo(gate, 0o666)
    cat = os.path.realpath("/bin/cat")
    assert lab.py(NOBODY, SWAP, str(link), cat).returncode == 0
    mallory = lab.client("mallory", NOBODY, f'allow="cat,{tool}",users="nobody"')
    recipe = _recipe(lab, "gated", f"cat {gate}\n{link} {public}\n{tool}\n")
    p = lab.popen_plumb(mallory, recipe)
    _open_gate(gate)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out) == (0, b"public words\ntool ran as nobody\n"), err
    p = lab.popen_plumb(mallory, recipe)
    _open_gate(gate, lambda: lab.py(NOBODY, SWAP, str(link), "/usr/bin/id").check_returncode())  # checked as cat
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0 and b"uid=" not in out and b"tool ran" not in out, (out, err)
    assert f"{link} is now /usr/bin/id, not the {cat} allowed".encode() in err, err


def test_client_environment_only_through_accept_env() -> None:
    with running_lab(["--accept-env", "NP_*"]) as lab:
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        ticket = lab.client("ticket", NOBODY, 'command="env",users="nobody"')
        sent = {"NP_OK": "yes", "LD_PRELOAD": "/tmp/evil.so", "BASH_ENV": "/tmp/evil.sh", "PATH": "/tmp/evil"}
        export = "-export=" + ",".join(sent)
        r = lab.plumb(mallory, export, "env", env=sent)
        got = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
        assert r.returncode == 0 and got["NP_OK"] == "yes", r.stderr
        assert "LD_PRELOAD" not in got and "BASH_ENV" not in got and got["PATH"] != "/tmp/evil"
        assert got["USER"] == "nobody" and got["HOME"] == "/nonexistent"
        r = lab.plumb(ticket, export, "env", env=sent)
        assert r.returncode == 0 and b"NP_OK" not in r.stdout and b"LD_PRELOAD" not in r.stdout
        assert "client variables not accepted: LD_PRELOAD, BASH_ENV, PATH" in lab.log_text()


def test_a_restricted_key_cannot_escape_through_accepted_variables() -> None:
    """With --accept-env "*", a key allowed one bash script sends BASH_ENV (bash runs that file first)
    and PATH (the script's `date` becomes the client's): neither reaches the script, which runs as
    it should. The same variables still reach an unrestricted key's command."""
    with running_lab(["--accept-env", "*"]) as lab:
        _, _, _, shared = _files(lab)
        tool = lab.root / "report"
        tool.write_text("#!/bin/bash\necho report at $(date +%Y)\n")
        os.chmod(tool, 0o755)
        evil, fake = shared / "evil.sh", shared / "bin"
        evil.write_text(f"touch {shared}/escaped-bash-env\n")
        fake.mkdir()
        (fake / "date").write_text(f"#!/bin/sh\ntouch {shared}/escaped-path\n")
        os.chmod(fake / "date", 0o755)
        sent = {"BASH_ENV": str(evil), "PATH": f"{fake}:/usr/bin:/bin", "NP_OK": "yes"}
        mallory = lab.client("mallory", NOBODY, f'allow="{tool}",users="nobody"')
        r = lab.plumb(mallory, "-export=" + ",".join(sent), str(tool), env=sent)
        assert r.returncode == 0 and r.stdout.startswith(b"report at 2"), r.stderr
        assert not (shared / "escaped-bash-env").exists() and not (shared / "escaped-path").exists()
        assert "client variables not accepted: BASH_ENV, PATH, NP_OK" in lab.log_text()
        free = lab.client("free", NOBODY, 'users="nobody"')  # may run anything: AcceptEnv as configured
        r = lab.plumb(free, "-export=NP_OK", "echo $NP_OK", env=sent)
        assert (r.returncode, r.stdout) == (0, b"yes\n"), r.stderr


def test_one_time_key_runs_once_of_many_racing(lab: Lab) -> None:
    ran = lab.root / "ran"
    ticket = lab.client("ticket", NOBODY, f'one-time,command="sh -c \\"echo x >>{ran}\\""')
    procs = [lab.popen_plumb(ticket, "sh", "-c", f"echo x >>{ran}") for _ in range(4)]
    results = [(p.wait(60), p.communicate()[1]) for p in procs]
    assert ran.read_text() == "x\n", results
    assert [code for code, _ in results].count(0) == 1, results
    # The others are refused: the key is used, or (four at once) uid 65534 is past its unauthenticated share.
    assert all(
        b"already used" in err or b"too many unauthenticated connections" in err for code, err in results if code
    ), results
    again = lab.client("again", NOBODY, f'one-time,command="sh -c \\"echo y >>{ran}\\""')
    assert lab.plumb(again, "sh", "-c", f"echo y >>{ran}").returncode == 0
    assert ran.read_text() == "x\ny\n"


# -- StrictModes -------------------------------------------------------------------------------


def test_a_private_key_others_may_read_is_refused(lab: Lab) -> None:
    mallory = lab.client("mallory", NOBODY)
    os.chmod(mallory.key, 0o644)
    r = lab.plumb(mallory, "true")
    assert r.returncode == 255 and f"{mallory.key}: mode 0644 is too open".encode() in r.stderr
    os.chmod(mallory.key, 0o600)
    assert lab.plumb(mallory, "echo", "ok").stdout == b"ok\n"


def test_an_authorized_keys_others_may_write_is_refused(lab: Lab) -> None:
    alice = lab.client("alice")
    assert lab.plumb(alice, "true").returncode == 0
    mallory = lab.client("mallory", NOBODY, authorize=False)
    os.chmod(lab.auth.parent, 0o755)
    os.chmod(lab.auth, 0o666)
    r = lab.py(
        NOBODY, "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')", str(lab.auth), mallory.public_line
    )
    assert r.returncode == 0, r.stderr  # nobody planted its key...
    r = lab.plumb(mallory, "id", "-un")
    assert r.returncode == 255 and b"cannot read its authorized keys" in r.stderr and r.stdout == b""
    assert f"{lab.auth}: mode 0666 is writable by group or others".encode() in lab.log.read_bytes()
    lab.auth.write_text(alice.public_line + "\n")  # the admin notices, removes it, fixes the mode
    os.chmod(lab.auth, 0o644)
    assert lab.plumb(alice, "echo", "ok").stdout == b"ok\n"
    assert lab.plumb(mallory, "id").returncode == 255


def test_netplumbd_refuses_to_start_with_loose_authorized_keys() -> None:
    with running_lab(args=None) as lab:
        os.chmod(lab.auth, 0o646)
        r = lab.start_refused()
        assert r.returncode == 1 and f"{lab.auth}: mode 0646 is writable by group or others" in r.stderr


def test_files_the_tools_make_are_private(lab: Lab) -> None:
    alice = lab.client("alice")
    assert lab.plumb(alice, _recipe(lab, "r", "echo x >made\n")).returncode == 0
    ticket = lab.client("ticket", 0, 'one-time,command="true"')
    assert lab.plumb(ticket, "true").returncode == 0
    files = [
        alice.key,
        alice.key.with_name("id.pub"),
        alice.config / "netplumb" / "known_hosts",
        lab.root / "server" / "host_key",
        lab.root / "server" / "host_key.pub",
        lab.root / "server" / "authorized_keys.spent",
        lab.recipes / "root" / "made",
    ]
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f
    for d in (alice.config / "netplumb", lab.recipes, lab.recipes / "root"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d


# -- limits ------------------------------------------------------------------------------------

SILENT = r"""
import sys, time
from flowlib import flow_alloc, qos
flows = [flow_alloc("host2", qos=qos.data, timeout=10) for _ in range(int(sys.argv[1]))]
print("holding", len(flows), flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(lab: Lab, uid: int, n: int, seconds: float) -> subprocess.Popen[str]:
    p = lab.popen_py(uid, SILENT, str(n), str(seconds))
    assert p.stdout is not None
    assert p.stdout.readline().startswith("holding"), p.communicate()
    return p


def test_unauthenticated_connections_are_capped_per_peer_and_timed_out() -> None:
    with running_lab(["--per-peer-startups", "2", "--login-grace-time", "3"]) as lab:
        alice = lab.client("alice")
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        hold = _hold(lab, NOBODY, 2, 60)
        try:
            r = lab.plumb(mallory, "true")
            assert (
                r.returncode == 255
                and b"too many unauthenticated connections from uid 65534" in r.stderr
                and b"--per-peer-startups" in r.stderr
            ), r.stderr
            assert lab.plumb(alice, "echo", "served").stdout == b"served\n"  # another peer meanwhile
            # The grace time ends the silent ones, and the attacker's own slots free up.
            wait_for(lambda: lab.log_text().count("no command asked for within 3 s") >= 2, 15, "the grace time")
            assert lab.plumb(mallory, "echo", "again").stdout == b"again\n"
        finally:
            hold.kill()
            hold.wait()


DEAF_PEER = r"""
import socket, sys, time
from apps.netplumb.keys import Identity
from apps.netplumb.session import ClientSession
from flowlib.frct import DATA, DRF, FC, PCI
from flowlib.irm import IrmClient
from proto.qos import data as reliable
irm = IrmClient()
socks = []
for _ in range(int(sys.argv[1])):
    reply, fd = irm.alloc("host2", reliable, 10)
    s = socket.socket(fileno=fd)
    c = ClientSession(Identity.generate(), lambda k: None)
    c.start()
    (hello,) = c.data_to_send()
    try:
        s.send(PCI.pack((DRF | DATA) << 24, 1000, 0) + hello)
    except OSError:  # closed unanswered: netplumbd had no refusal thread free
        continue
    while sys.argv[2] == "shut":  # netplumbd's HELLO: never acknowledged, and FRCT's window shut at it
        word, seq, _ = PCI.unpack_from(s.recv(65536))
        if word >> 24 & DATA:
            s.send(PCI.pack(FC << 24 | seq & 0xFFFFFF, 0, 0))
            break
    socks.append(s)
print("holding", len(socks), flush=True)
time.sleep(90)  # acknowledging nothing more, reading nothing, opening nothing
"""


def test_a_peer_that_shuts_its_window_holds_no_slot_past_the_grace_time() -> None:
    """uid 65534, with no key, takes its two unauthenticated slots and shuts FRCT's window on each at
    netplumbd's HELLO, which it never acknowledges: the grace time's ERROR cannot be sent, and a close
    that lingered would retransmit the HELLO for two minutes. netplumbd gives up on that write within
    the grace time and closes without lingering on a peer it owes nothing, and the slots come back
    while the attacker still holds its ends; a client is served meanwhile."""
    with running_lab(["--per-peer-startups", "2", "--login-grace-time", "3"]) as lab:
        alice = lab.client("alice")
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        hold = lab.popen_py(NOBODY, DEAF_PEER, "2", "shut")
        try:
            assert hold.stdout is not None and hold.stdout.readline() == "holding 2\n", hold.communicate()
            t0 = time.monotonic()
            r = lab.plumb(mallory, "true")
            assert r.returncode == 255 and b"--per-peer-startups" in r.stderr, r.stderr
            assert lab.plumb(alice, "echo", "served").stdout == b"served\n"
            wait_for(lambda: lab.plumb(mallory, "true").returncode == 0, 20, "the slots to come back")
            assert time.monotonic() - t0 < 15 and hold.poll() is None
        finally:
            hold.kill()
            hold.wait()


def test_refusals_are_not_held_up_by_peers_that_never_acknowledge_them() -> None:
    """uid 65534 fills its two unauthenticated slots, then opens 12 more connections and acknowledges
    (and reads) none of the refusals netplumbd sends them: a refusal's flow closes at once instead of
    lingering two minutes on it, so the few threads that send refusals stay free, and the next client
    over the limit still hears why; a client within its limits is served meanwhile."""
    with running_lab(["--per-peer-startups", "2", "--login-grace-time", "60"]) as lab:
        alice = lab.client("alice")
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        hold = _hold(lab, NOBODY, 2, 90)
        deaf = lab.popen_py(NOBODY, DEAF_PEER, "12", "deaf")
        try:
            assert deaf.stdout is not None and deaf.stdout.readline() == "holding 12\n", deaf.communicate()
            wait_for(lambda: lab.log_text().count("too many unauthenticated connections") >= 8, 10, "refusals")
            r = lab.plumb(mallory, "true")
            assert r.returncode == 255 and b"(at most 2: --per-peer-startups)" in r.stderr, r.stderr
            assert lab.plumb(alice, "echo", "served").stdout == b"served\n"
        finally:
            for p in (hold, deaf):
                p.kill()
                p.wait()


def test_a_remote_peers_unauthenticated_connections_are_capped_per_peer() -> None:
    """A peer on another machine, as the IRMd names it (a udp shim's source host), is held to
    --per-peer-startups as a local uid is: 127.0.0.2 holding two silent connections is refused a third,
    the refusal naming it, while a client at 127.0.0.3 logs in meanwhile."""
    with running_lab(None) as lab:
        port = str(free_port(["127.0.0.1", "127.0.0.2", "127.0.0.3"]))
        lab.irmd.irm_ok(*udp4_bootstrap("lan", "127.0.0.1", "port", port))
        lab.irmd.note_children()
        hosts: list[IrmdProc] = []
        hold: subprocess.Popen[str] | None = None
        try:
            for name, ip in (("b", "127.0.0.2"), ("c", "127.0.0.3")):
                hosts.append(start_irmd(lab.root, name))
                hosts[-1].irm_ok(*udp4_bootstrap("lan", ip, "port", port, "peer", "127.0.0.1"))
                hosts[-1].note_children()
            b, c = hosts
            lab.start("--layer", "lan", "--per-peer-startups", "2", "--login-grace-time", "30")
            alice = lab.client("alice")
            hold = subprocess.Popen(
                [PY, "-c", SILENT, "2", "60"],
                stdout=subprocess.PIPE,
                text=True,
                env={**b.env, "PYTHONPATH": str(Path.cwd())},
            )
            assert hold.stdout is not None and hold.stdout.readline().startswith("holding"), hold.communicate()
            r = lab.plumb(alice, "true", env={"OUROBOROS_SOCK": str(b.sock)})
            assert r.returncode == 255, r.stderr
            assert b"too many unauthenticated connections from peer 127.0.0.2 of layer lan" in r.stderr, r.stderr
            r = lab.plumb(alice, "echo", "served", env={"OUROBOROS_SOCK": str(c.sock)})
            assert r.stdout == b"served\n", r.stderr
        finally:
            if hold is not None:
                hold.kill()
                hold.wait()
            for h in hosts:
                stop_irmd(h, check=False)


def test_all_unauthenticated_connections_are_capped_but_admins_get_in() -> None:
    """uid 65534's silent connections fill --max-startups: another user is refused, naming it; root (an
    admin, as for the IRMd's users' limits) still logs in, and the others once the slots free up."""
    with running_lab(["--max-startups", "3", "--per-peer-startups", "3", "--login-grace-time", "30"]) as lab:
        alice = lab.client("alice")  # root
        bob = lab.client("bob", OTHER, 'users="nobody"')
        hold = _hold(lab, NOBODY, 3, 60)
        try:
            r = lab.plumb(bob, "true")
            assert r.returncode == 255 and b"(at most 3: --max-startups); try again later" in r.stderr, r.stderr
            assert lab.plumb(alice, "echo", "admin").stdout == b"admin\n"
        finally:
            hold.kill()
            hold.wait()
        wait_for(lambda: lab.plumb(bob, "true").returncode == 0, 15, "the slots to free up")


def test_sessions_fill_max_sessions_but_admins_still_get_in() -> None:
    """uid 65534's key holds every session --max-sessions allows: another user is refused, naming it;
    root still logs in (the few sessions kept for admins), and the others once the sessions end."""
    with running_lab(["--max-sessions", "2"]) as lab:
        alice = lab.client("alice")  # root
        bob = lab.client("bob", OTHER, 'users="nobody"')
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        with lab.sessions(mallory, 2):
            r = lab.plumb(bob, "true")
            assert r.returncode == 255 and b"(at most 2: --max-sessions)" in r.stderr, r.stderr
            assert lab.plumb(alice, "echo", "admin").stdout == b"admin\n"
        wait_for(lambda: lab.plumb(bob, "true").returncode == 0, 20, "the sessions to end")


def test_sessions_are_capped_per_key_and_per_peer() -> None:
    with running_lab(["--per-key-sessions", "2", "--per-peer-sessions", "3"]) as lab:
        alice = lab.client("alice")
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        mallory2 = lab.client("mallory2", NOBODY, 'users="nobody"')
        with lab.sessions(mallory, 2):
            r = lab.plumb(mallory, "true")
            assert (
                r.returncode == 255
                and b"too many sessions with key" in r.stderr
                and b"(at most 2: --per-key-sessions)" in r.stderr
            ), r.stderr
            with lab.sessions(mallory2, 1):
                r = lab.plumb(mallory2, "true")
                assert r.returncode == 255 and b"too many connections from uid 65534" in r.stderr, r.stderr
                assert lab.plumb(alice, "echo", "served").stdout == b"served\n"
        wait_for(lambda: lab.plumb(mallory, "true").returncode == 0, 20, "the sessions to end")


def test_connections_to_a_replicated_socket_are_capped() -> None:
    with running_lab(["--max-connections", "2"]) as lab:
        alice = lab.client("alice")
        local = alice.config / "local.sock"
        remote = lab.root / "remote.sock"
        code = (
            "import socket, sys\n"
            "conns = [socket.socket(socket.AF_UNIX) for _ in range(4)]\n"
            "for s in conns:\n"
            "    s.connect(sys.argv[1])\n"
            "closed = 0\n"
            "for s in conns:  # a refused one ends at once; the others stay open, quiet\n"
            "    s.settimeout(3)\n"
            "    try:\n"
            "        closed += s.recv(1) == b''\n"
            "    except TimeoutError:\n"
            "        pass\n"
            "print(closed)\n"
        )
        server = subprocess.Popen(
            [
                str(BIN / "python"),
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); "
                "s.listen(); c=[s.accept() for _ in range(2)]; import time; time.sleep(30)",
                str(local),
            ]
        )
        try:
            wait_for(lambda: local.exists(), 10, "the local socket")
            r = lab.plumb(alice, f"-socket={local}:{remote}", str(BIN / "python"), "-c", code, str(remote))
            assert r.returncode == 0, r.stderr
            assert r.stdout == b"2\n"  # two of the four were closed at once, two served
            assert "socket connection refused: 2 open (--max-connections)" in lab.log_text()
        finally:
            server.kill()
            server.wait()


CONNECT_LOOP = """
import socket, sys
def connect(n):
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        s.recv(1)  # the far end closes it
        s.close()
for n in (300, 2000):
    connect(n)
    print(n, flush=True)
    sys.stdin.readline()
"""


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))


@needs_root
@pytest.mark.timeout(120)
def test_socket_connections_that_ended_hold_nothing_in_netplumbd() -> None:
    """A session's command connects to its replicated socket over and over, each connection closed at
    once, under --max-connections: netplumbd forgets each connection's channel and threads when it is
    over both ways (it kept them until the session's end: about 8 KiB a connection, without bound)."""
    with running_lab([]) as lab:
        alice = lab.client("alice")
        local = alice.config / "local.sock"
        remote = lab.root / "remote.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(local))
        listener.listen(64)

        def closing() -> None:
            with contextlib.suppress(OSError):
                while True:
                    listener.accept()[0].close()

        threading.Thread(target=closing, daemon=True).start()
        assert lab.proc is not None
        p = lab.popen_plumb(alice, f"-socket={local}:{remote}", str(BIN / "python"), "-c", CONNECT_LOOP, str(remote))
        try:
            assert p.stdin is not None and p.stdout is not None
            assert p.stdout.readline() == b"300\n"  # warm: threads' stacks and allocators at their size
            warm = _rss_kib(lab.proc.pid)
            p.stdin.write(b"\n")
            p.stdin.flush()
            assert p.stdout.readline() == b"2000\n"
            grown = _rss_kib(lab.proc.pid) - warm
            p.stdin.close()
            assert p.wait(30) == 0
        finally:
            p.kill()
            p.wait()
            listener.close()
        assert grown < 3 * 1024, f"netplumbd grew {grown} KiB over 2000 closed connections"


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--max-startups", "0"], "every limit must be positive"),
        (["--per-key-buffer", "2097152", "--max-buffer", "1048576"], "--max-buffer must be at least --per-key-buffer"),
    ],
)
def test_limit_options_must_be_positive_and_agree(args: list[str], why: str) -> None:
    with lab_dir() as d:
        r = subprocess.run(
            [str(BIN / "netplumbd"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "HOME": str(d)},
        )
        assert r.returncode == 2 and why in r.stderr


# -- the runner and the job: what the client's session reaches, and what it holds ------------------

# An authenticated client whose own command stops the session's runner (same uid: it may), then sends
# SIGNALs until netplumbd's control socket to that runner is full, and goes away.
STOPS_ITS_RUNNER = r"""
import sys, time
from flowlib import FlowTimeout, flow_alloc, qos
from apps.netplumb.channels import Link, Reader
from apps.netplumb.connection import ClientConnection
from apps.netplumb.keys import Identity
from apps.netplumb.messages import Data, Start, Started
command = "sleep 1; kill -STOP $PPID; echo up; exec sleep 40"
flow = flow_alloc("host2", qos=qos.data, timeout=10)
key = Identity.load(sys.argv[1])
core = ClientConnection(key, lambda _key: None, Start((command,)), time.monotonic(), 30, flow.mtu)
link, reader = Link(flow, core), Reader(flow, core)
link.send(core.connect)
up = False
while not up:
    events = reader.events()
    link.flush()
    for ev in events:
        if isinstance(ev, Started):
            core.add_channel(0, receives=False, sends=True)
            for ch in (1, 2):
                core.add_channel(ch, receives=True, sends=False)
        up = up or (isinstance(ev, Data) and b"up" in ev.data)
flow.set_timeout(5)
sent = 0
try:  # until netplumbd stops reading (then the flow's window closes), or all are sent
    for _ in range(int(sys.argv[2])):
        link.send(lambda: core.signal("WINCH"))
        sent += 1
except FlowTimeout:
    pass
print("sent", sent, flush=True)
"""


def test_a_runner_its_command_stopped_holds_no_slot_once_the_client_left() -> None:
    """netplumbd never blocks on a runner (which runs as the user, who may stop it): a SIGNAL the runner
    does not take is dropped, and the end of a session reaches a stopped runner all the same, so a
    client that wedged its runner and left frees its key's slot."""
    with running_lab(["--per-key-sessions", "1"]) as lab:
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        r = lab.py(NOBODY, STOPS_ITS_RUNNER, str(mallory.key), "3000", timeout=60)
        assert r.returncode == 0 and r.stdout.startswith("sent"), r.stderr
        # Its session ends (the flow is gone), and the key's one slot is free again.
        wait_for(lambda: lab.plumb(mallory, "echo", "again").stdout == b"again\n", 30, "the slot to free up")
        log = lab.log_text()
        assert "takes no signals: dropping them" in log and "the client went away: stopping its command" in log


def _pids_running(argv: list[str]) -> list[int]:
    """The live processes whose command line is exactly `argv`."""
    want, found = "\0".join(argv) + "\0", []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/cmdline").read_text() == want and pid_alive(int(entry)):
                found.append(int(entry))
        except OSError:
            pass
    return found


def _runner_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.mark.parametrize("how", ["command", "recipe", "background"])
def test_a_job_does_not_outlive_its_runner_killed(lab: Lab, how: str) -> None:
    """The runner of a session is killed outright (SIGKILL: by its user, the OOM killer, or netplumbd
    giving up on it): nothing of the job it started goes on running, a process it left in the
    background included; the client learns its session is over."""
    mallory = lab.client("mallory", NOBODY, 'allow="sleep,sh",users="nobody"')
    # Seconds no other test's job sleeps (the suite runs in parallel): the job's processes are found by them.
    n = secrets.randbelow(10**6) + 10**6
    marker, other = ["sleep", str(n)], ["sleep", str(n + 1)]
    if how == "command":
        p = lab.popen_plumb(mallory, *marker)
    elif how == "recipe":
        p = lab.popen_plumb(mallory, _recipe(lab, "long", f"sleep {n} &\nsleep {n + 1}\n"))
    else:
        p = lab.popen_plumb(mallory, "sh", "-c", f"sleep {n} & exec sleep {n + 1}")
    try:
        (job,) = wait_for(lambda: _pids_running(marker), 30, "the job to start")
        runner = _runner_of(job) if how != "background" else _runner_of(_runner_of(job))
        assert runner in children_of(lab.proc.pid if lab.proc else 0)
        os.kill(runner, signal.SIGKILL)
        wait_for(lambda: not _pids_running(marker) and not _pids_running(other), 10, "the job to end")
        assert p.wait(30) != 0
    finally:
        p.kill()
        p.wait()
        for pid in _pids_running(marker) + _pids_running(other):
            os.kill(pid, signal.SIGKILL)
    r = lab.plumb(mallory, "sleep", "0")  # and the next session runs as ever
    assert r.returncode == 0, r.stderr


def test_a_signal_reaches_no_process_that_took_the_pid_of_a_finished_command(lab: Lab) -> None:
    """A recipe's first command ended; a process of another session (here root's, as the recipe's
    account is) is started with that pid as its own process group. The client's Ctrl-C reaches the
    recipe's running command, not that process: the pids of a job's commands stay the job's until
    the job has ended."""
    alice = lab.client("alice")  # runs as root, netplumbd's own account
    p = lab.popen_plumb(alice, _recipe(lab, "sig", "sh -c 'echo $$'\nsleep 30\n"))
    victims: list[subprocess.Popen[bytes]] = []
    try:
        assert p.stdout is not None
        pid = int(p.stdout.readline())
        for _ in range(50):  # others on the machine may take the pid first: try again
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
            victims.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
            if victims[-1].pid == pid:
                break
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)  # plumb forwards it to the recipe
        assert p.wait(30) == 130  # the recipe's sleep got it
        assert [v.pid for v in victims if v.poll() is not None] == []  # and nothing else did
    finally:
        p.kill()
        p.wait()
        for v in victims:
            v.kill()
            v.wait()


def _started_under_umask_0(lab: Lab) -> Path:
    """netplumbd started with umask 0, as some service managers start daemons; the shared directory."""
    old = os.umask(0)
    try:
        lab.start()
    finally:
        os.umask(old)
    return _files(lab)[3]


def test_a_sessions_files_get_a_logins_umask_not_the_daemons() -> None:
    """netplumbd started with umask 0 (as some service managers start daemons): the files a
    session's command makes are not world-writable; they get the umask a login gets (022)."""
    with running_lab(args=None) as lab:
        shared = _started_under_umask_0(lab)
        alice = lab.client("alice", NOBODY, 'users="nobody"')
        made = shared / "made.txt"
        r = lab.plumb(alice, "sh", "-c", f"umask; echo words > {made}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == "0022"
        assert stat.S_IMODE(os.stat(made).st_mode) == 0o644 and os.stat(made).st_uid == NOBODY


def test_the_login_umask_is_login_defs_umask_else_022(tmp_path: Path) -> None:
    from proto.login import login_umask

    defs = tmp_path / "login.defs"
    defs.write_text("# UMASK 002 in a comment\nUMASK\t\t027\n")
    assert login_umask(defs) == 0o027
    defs.write_text("UMASK 9x\n")  # not octal: the default, not a guess
    assert login_umask(defs) == 0o022
    assert login_umask(tmp_path / "missing") == 0o022


def test_a_replicated_socket_admits_its_owner_only_whatever_the_umask() -> None:
    """The socket netplumbd listens on for the client is made 0600 (as sshd's StreamLocalBindMask): a
    daemon started with a loose umask lets no other local user through to the client's socket."""
    with running_lab(args=None) as lab:
        shared = _started_under_umask_0(lab)
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        local, remote = mallory.config / "local.sock", shared / "remote.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(local))
        os.chmod(local, 0o777)
        listener.listen()
        listener.settimeout(20)
        connect = "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); print('in')"
        p = lab.popen_plumb(mallory, f"-socket={local}:{remote}", "sh", "-c", "echo up; exec sleep 20")
        try:
            assert p.stdout is not None and p.stdout.readline() == b"up\n"
            assert stat.S_IMODE(os.stat(remote).st_mode) == 0o600
            r = lab.py(NOBODY - 1, connect, str(remote))  # another local user
            assert r.returncode != 0 and "Permission denied" in r.stderr, (r.stdout, r.stderr)
            r = lab.py(NOBODY, connect, str(remote))  # the session's account gets through
            assert r.stdout == "in\n", r.stderr
            conn, _ = listener.accept()
            conn.close()
        finally:
            p.kill()
            p.wait()
            listener.close()


def test_authorized_keys_reached_through_another_users_link_is_refused(tmp_path: Path) -> None:
    """authorized_keys was checked in the directories its real path lies in, not in those of the links
    on the way: a link of uid 65534's (in its own directory, or its own link in a sticky one) leading
    to root's file passed, and the user could turn it to another file between the check and a later
    read. Refused now; root's own links to the file are followed."""
    from apps.netplumb.keys import AuthorizedKeys, Identity, KeyFileError, public_line

    key = Identity.generate().public
    public = Path(tempfile.mkdtemp(prefix="netplumb-trust-", dir="/tmp"))
    try:
        public.chmod(0o1777)  # as /tmp
        etc = public / "etc"  # root's, holding the file and root's links
        etc.mkdir(mode=0o755)
        (etc / "ak").write_text(public_line(key) + "\n")
        theirs = public / "theirs"
        theirs.mkdir(mode=0o755)
        os.symlink(etc / "ak", theirs / "link")
        os.lchown(theirs / "link", NOBODY, NOBODY)
        os.chown(theirs, NOBODY, NOBODY)
        os.symlink(theirs / "link", etc / "through-theirs")
        with pytest.raises(KeyFileError, match=f"{theirs} belongs to uid {NOBODY}"):
            AuthorizedKeys.load(etc / "through-theirs")
        os.symlink(etc / "ak", public / "their-link")
        os.lchown(public / "their-link", NOBODY, NOBODY)
        with pytest.raises(KeyFileError, match=f"their-link belongs to uid {NOBODY}"):
            AuthorizedKeys.load(public / "their-link")
        os.symlink("ak", etc / "roots")  # the legitimate use: root's own link, in root's directory
        assert AuthorizedKeys.load(etc / "roots").find(key)
    finally:
        shutil.rmtree(public, ignore_errors=True)


def _fds_of(pid: int) -> set[str]:
    """What the open files of `pid` are (paths, pipe:[inode]...)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return found


HOLD = "import os, sys, time\nfd = os.open(sys.argv[1], os.O_WRONLY)\nprint('open', flush=True)\n{}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("held", ["named pipe", "stdout"])
def test_a_session_gone_holds_nothing_in_netplumbd_whoever_holds_its_other_ends(lab: Lab, held: str) -> None:
    """A process the session does not end keeps the other end of a session's pipe open and idle: a
    process of the user's holding a replicated named pipe, or one of the job's that left its session
    (setsid) holding its stdout. The command's EXIT waits for that output's end, as ssh's does; but
    once the client has gone, netplumbd lets go of the pipe: nothing of the session stays in it, its
    threads blocked on a pipe included. The legitimate use beside: the pipe's writer writes and
    closes, and the client gets what it wrote and the command's status."""
    assert lab.proc is not None
    shared = _files(lab)[3]
    mallory = lab.client("mallory", NOBODY, 'users="nobody"')
    fifo = shared / "held.fifo"
    os.mkfifo(fifo, 0o600)
    os.chown(fifo, NOBODY, NOBODY)
    got = mallory.config / "got"
    writer = lab.popen_py(NOBODY, HOLD.format("os.write(fd, b'hello\\n')"), str(fifo))
    try:
        r = lab.plumb(mallory, f"-outfifo={got}:{fifo}", "true", timeout=60)
        assert r.returncode == 0, r.stderr
        assert writer.wait(30) == 0 and got.read_bytes() == b"hello\n"
    finally:
        writer.kill()
        writer.wait()
    n = secrets.randbelow(10**6) + 10**6
    marker = ["sleep", str(n)]
    holder: subprocess.Popen[str] | None = None
    if held == "named pipe":
        holder = lab.popen_py(NOBODY, HOLD.format("time.sleep(100)"), str(fifo))
        p = lab.popen_plumb(mallory, f"-outfifo={got}:{fifo}", "true")
    else:
        # The job ends only once its child has left the job's session (setsid; its sid is then its pid):
        # the runner ends what is left of the job when the command ends, and one still on its way out
        # would be ended with it (then nothing holds the stdout).
        escape = f"setsid sleep {n} & while [ \"$(cut -d' ' -f6 /proc/$!/stat)\" != $! ]; do sleep 0.01; done"
        p = lab.popen_plumb(mallory, "sh", "-c", escape)
    try:
        if holder is not None:
            assert holder.stdout is not None and holder.stdout.readline() == "open\n"
            end = str(fifo)
        else:
            (escaped,) = wait_for(lambda: _pids_running(marker), 30, "the job's escaped process")
            end = os.readlink(f"/proc/{escaped}/fd/1")
            assert end.startswith("pipe:")
        wait_for(lambda: end in _fds_of(lab.proc.pid), 30, "netplumbd to take the pipe")  # type: ignore[union-attr]
        time.sleep(1)
        assert p.poll() is None  # EXIT waits for the output's end
        p.kill()  # the client gives up
        p.wait()
        wait_for(lambda: end not in _fds_of(lab.proc.pid), 15, "netplumbd to let go of the pipe")  # type: ignore[union-attr]
        assert "unexpected error" not in lab.log_text()
    finally:
        p.kill()
        p.wait()
        if holder is not None:
            holder.kill()
            holder.wait()
        for pid in _pids_running(marker):
            os.kill(pid, signal.SIGKILL)
    r = lab.plumb(mallory, "echo", "still-served")
    assert r.returncode == 0 and r.stdout == b"still-served\n", r.stderr


# -- what a client makes netplumbd hold ---------------------------------------------------------

# An authenticated client asks for named pipes its command never opens (and a command that reads no
# stdin), then sends every byte each channel's window allows on each of them, and reports how its
# session ended.
SENDS_AHEAD = r"""
import sys, threading, time
from flowlib import FlowError, flow_alloc, qos
from apps.netplumb.channels import Link, Reader
from apps.netplumb.connection import ClientConnection, Closed, LocalProtocolError
from apps.netplumb.keys import Identity
from apps.netplumb.messages import Start, Started
from apps.netplumb.wire import FIRST_CLIENT_CHANNEL, INITIAL_WINDOW
pipes = tuple((FIRST_CLIENT_CHANNEL + i, f"{sys.argv[3]}/ahead-{i}") for i in range(int(sys.argv[2])))
flow = flow_alloc("host2", qos=qos.data, timeout=10)
start = Start(("sleep 60",), infifos=pipes)
core = ClientConnection(Identity.load(sys.argv[1]), lambda _key: None, start, time.monotonic(), 30, flow.mtu)
link, reader = Link(flow, core), Reader(flow, core)
link.send(core.connect)
started = False
while not started:
    events = reader.events()
    link.flush()
    for ev in events:
        if isinstance(ev, Started):
            assert ev.ok, ev
            core.add_channel(0, receives=False, sends=True)
            for ch in (1, 2):
                core.add_channel(ch, receives=True, sends=False)
            for ch, _ in pipes:
                core.add_channel(ch, receives=False, sends=True)
            started = True
closed = []
def read():
    try:
        while not closed:
            closed.extend(ev.reason for ev in reader.events() if isinstance(ev, Closed))
    except FlowError as e:
        closed.append(f"flow: {e}")
threading.Thread(target=read, daemon=True).start()
flow.set_timeout(10)
sent = 0
try:
    for ch in (0, *(c for c, _ in pipes)):
        for _ in range(INITIAL_WINDOW // 65536):
            link.data(ch, bytes(65536))
            sent += 65536
except (FlowError, LocalProtocolError):  # the session is over
    pass
deadline = time.monotonic() + 20
while not closed and time.monotonic() < deadline:
    time.sleep(0.05)
print(sent, closed[0] if closed else "still open", flush=True)
"""


def _vm_kib(pid: int, what: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(what + ":"))


@pytest.mark.timeout(180)
def test_data_sent_ahead_of_what_commands_read_is_bounded_per_key() -> None:
    """A client sends a window's worth (1 MiB) on each of 32 named pipes its command never opens, and
    on the stdin it never reads: netplumbd held all of it (33 MiB here; 0.5 GiB and more per key with
    the default limits). Now a key's sessions hold at most --per-key-buffer: past it, the session is
    ended with an ERROR naming the option. The legitimate use beside: another key's `cat` of 24 MB
    meanwhile, and the same key's, after, with every byte back (never near the limit: one channel's
    window is all a command that reads holds)."""
    budget = 4 * 1024 * 1024
    with running_lab(["--per-key-buffer", str(budget)]) as lab:
        assert lab.proc is not None
        shared = _files(lab)[3]
        alice = lab.client("alice")
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        big = secrets.token_bytes(24 * 1024 * 1024)
        assert lab.plumb(alice, "echo", "warm").stdout == b"warm\n"
        before = _vm_kib(lab.proc.pid, "VmRSS")
        legit: list[subprocess.CompletedProcess[bytes]] = []
        meanwhile = threading.Thread(target=lambda: legit.append(lab.plumb(alice, "cat", input=big, timeout=120)))
        meanwhile.start()
        r = lab.py(NOBODY, SENDS_AHEAD, str(mallory.key), "32", str(shared), timeout=120)
        meanwhile.join(120)
        grown = _vm_kib(lab.proc.pid, "VmHWM") - before
        assert r.returncode == 0, r.stderr
        sent, _, how = r.stdout.strip().partition(" ")
        assert int(sent) > budget
        assert f"more than {budget} bytes sent ahead" in how and "(--per-key-buffer)" in how, r.stdout
        assert grown < 16 * 1024, f"netplumbd grew {grown} KiB"
        assert legit and legit[0].returncode == 0 and legit[0].stdout == big, legit
        r2 = lab.plumb(mallory, "cat", input=big, timeout=120)
        assert r2.returncode == 0 and r2.stdout == big, r2.stderr
        assert "unexpected error" not in lab.log_text()


# A job that holds one connection to its replicated socket (and talks on it), then connects again and
# again past --max-connections: each extra one is closed at once.
CONNECTS_PAST_THE_LIMIT = """
import socket, sys
held = socket.socket(socket.AF_UNIX)
held.connect(sys.argv[1])
held.sendall(b"ping")
assert held.recv(4) == b"pong"
refused = 0
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    refused += s.recv(1) == b""
    s.close()
held.sendall(b"ping")
print(refused, held.recv(4).decode(), flush=True)
"""


@pytest.mark.timeout(120)
def test_connections_refused_past_the_limit_do_not_fill_netplumbds_log() -> None:
    """A session's job connects to its replicated socket in a loop past --max-connections: netplumbd
    wrote a line for each refusal (thousands a second, as fast as the job connects: root's log, or
    the journal, grew at the client's will). Now one line per session and the count at its end. The
    legitimate use beside: the connection held within the limit carries its data both ways."""
    python = "/usr/bin/python3"  # the job runs as nobody, who may not reach the venv's interpreter
    if not os.access(python, os.X_OK):
        pytest.skip(f"no {python} for the job")
    with running_lab(["--max-connections", "1"]) as lab:
        shared = _files(lab)[3]
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        local, remote = mallory.config / "local.sock", shared / "remote.sock"
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(local))
        os.chmod(local, 0o777)
        listener.listen(8)

        def pong(conn: socket.socket) -> None:
            with conn, contextlib.suppress(OSError):
                while conn.recv(4):
                    conn.sendall(b"pong")

        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    threading.Thread(target=pong, args=(listener.accept()[0],), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        try:
            r = lab.plumb(
                mallory,
                f"-socket={local}:{remote}",
                python,
                "-c",
                CONNECTS_PAST_THE_LIMIT,
                str(remote),
                "2000",
                timeout=90,
            )
        finally:
            listener.close()
        assert r.returncode == 0 and r.stdout == b"2000 pong\n", r.stderr
        counted = "2000 socket connections refused (--max-connections)"
        wait_for(lambda: counted in lab.log_text(), 15, "the session's count of refusals")
        assert lab.log_text().count("socket connection refused") == 1


ALLOCATES_IN_A_LOOP = r"""
import sys
from flowlib import flow_alloc, qos
for _ in range(int(sys.argv[1])):
    flow_alloc("host2", qos=qos.data, timeout=10).close()
print("done", flush=True)
"""


@pytest.mark.timeout(120)
def test_flows_refused_for_a_limit_do_not_fill_netplumbds_log() -> None:
    """A local user holds its unauthenticated connections and allocates flows in a loop: netplumbd
    wrote a line for each refusal, as fast as the user allocates. Now at most 10 a second (bursts of
    20), the rest counted. The legitimate use beside: another user's session meanwhile."""
    with running_lab(["--per-peer-startups", "1", "--login-grace-time", "60"]) as lab:
        alice = lab.client("alice")
        hold = _hold(lab, NOBODY, 1, 60)
        try:
            r = lab.py(NOBODY, ALLOCATES_IN_A_LOOP, "400", timeout=100)
            assert r.returncode == 0 and r.stdout == "done\n", r.stderr
            assert lab.plumb(alice, "echo", "served").stdout == b"served\n"
        finally:
            hold.kill()
            hold.wait()
        lines = lab.log_text().count("(at most 1: --per-peer-startups)")
        assert 0 < lines < 100, f"{lines} lines for 400 refusals"
        assert "more lines not logged" in lab.log_text()


@pytest.mark.timeout(120)
def test_one_keys_sessions_leave_netplumbd_descriptors_for_others() -> None:
    """netplumbd started with a service manager's small soft descriptor limit (systemd gives 1024,
    less than one key's 8 sessions may take with 64 sockets and 64 connections each; 400 here):
    a key's sessions asking for 60 replicated sockets each, well within its limits, took them all:
    the later sessions hung or failed to start (`the session runner failed to start the command`:
    netplumbd could not take the runner's descriptors), and so did anyone else's until they ended.
    Now netplumbd raises its soft limit to what --max-sessions sessions at their limits need (or, if
    the hard limit is lower, serves fewer sessions). The legitimate use beside: another key's
    session meanwhile; jobs keep the limit netplumbd was given."""
    prlimit = shutil.which("prlimit")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if prlimit is None or (hard != resource.RLIM_INFINITY and hard < 64 * (16 + 64 + 64) + 64):
        pytest.skip("no prlimit, or a hard descriptor limit below what netplumbd needs")
    with running_lab(None) as lab:
        argv = lab.daemon_argv
        lab.daemon_argv = lambda recipes=None: [prlimit, f"--nofile=400:{hard}", *argv(recipes)]  # type: ignore[method-assign]
        lab.start()
        shared = _files(lab)[3]
        alice = lab.client("alice")
        mallory = lab.client("mallory", NOBODY, 'users="nobody"')
        sessions = []
        try:
            for i in range(8):
                socks = [f"-socket={mallory.config}/l{i}-{j}:{shared}/r{i}-{j}" for j in range(60)]
                p = lab.popen_plumb(mallory, *socks, "sh", "-c", "echo up; exec sleep 60")
                sessions.append(p)
                assert p.stdout is not None
                assert select.select([p.stdout], [], [], 30)[0], f"session {i} did not start within 30 s"
                assert p.stdout.readline() == b"up\n", p.communicate()[1]
            r = lab.plumb(alice, "sh", "-c", "ulimit -n")
            assert r.returncode == 0 and r.stdout == b"400\n", r.stderr
        finally:
            for p in sessions:
                p.kill()
                p.wait()
