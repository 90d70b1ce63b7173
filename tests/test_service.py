"""A daemon's stop: SIGTERM ends it whichever of its threads the kernel hands the signal to, and
what its serving thread raises reaches the main thread."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# A daemon whose main thread would, without serve_until_stopped, sit in a lock: its server thread
# waits forever, and another thread takes SIGTERM (pthread_kill), as the kernel may choose to.
DAEMON = textwrap.dedent(
    """
    import signal, sys, threading
    sys.path.insert(0, {root!r})
    from proto.service import serve_until_stopped, stop_on_signals

    def serve():
        how = sys.argv[1]
        if how == "raise":
            raise RuntimeError("the IRMd went away")
        if how == "return":
            return
        ready = threading.Event()

        def other():
            ready.wait()
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
            threading.Event().wait()

        threading.Thread(target=other, daemon=True).start()
        print("serving", flush=True)
        if how == "other-thread":
            ready.set()
        threading.Event().wait()

    # What the test's own process may have left (an ignored or blocked SIGINT is inherited) is not the
    # program's: it starts with Python's SIGINT handler and nothing blocked, as from a shell.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT, signal.SIGTERM}})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[1] != "own-handlers":
        stop_on_signals()
    try:
        serve_until_stopped(serve)
        print("returned", flush=True)
    except KeyboardInterrupt:  # Python's own SIGINT handler: the caller's, left in place
        print("interrupted", flush=True)
        sys.exit(130)
    finally:
        print("cleaned up", flush=True)
    """
)


def _daemon(how: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DAEMON.format(root=str(ROOT)), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(30)
def test_a_signal_taken_by_another_thread_stops_the_daemon_and_runs_its_cleanup() -> None:
    p = _daemon("other-thread")
    out, err = p.communicate(timeout=20)
    assert (p.returncode, out) == (0, "serving\ncleaned up\n"), err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_stops_it(sig: signal.Signals) -> None:
    p = _daemon("wait")
    try:
        assert p.stdout is not None and p.stdout.readline() == "serving\n"
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
        p.wait()
    assert (p.returncode, out) == (0, "cleaned up\n"), err


@pytest.mark.timeout(30)
def test_what_the_server_thread_raises_reaches_the_main_thread() -> None:
    p = _daemon("raise")
    out, err = p.communicate(timeout=20)
    assert p.returncode == 1 and out == "cleaned up\n"
    assert "RuntimeError: the IRMd went away" in err


@pytest.mark.timeout(30)
def test_a_server_that_returns_returns() -> None:
    p = _daemon("return")
    out, _ = p.communicate(timeout=20)
    assert (p.returncode, out) == (0, "returned\ncleaned up\n")


@pytest.mark.timeout(30)
def test_the_callers_signal_handlers_are_left_in_place() -> None:
    """A program that keeps Python's SIGINT handler (a foreground `styx serve`) still gets
    KeyboardInterrupt, in its main thread, and exits 130."""
    p = _daemon("own-handlers")
    try:
        assert p.stdout is not None and p.stdout.readline() == "serving\n"
        signals = _signal_state(p.pid)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
        p.wait()
    assert (p.returncode, out) == (130, "interrupted\ncleaned up\n"), err + signals


def _signal_state(pid: int) -> str:
    """The signal masks of a process's threads (ignored, blocked, caught), for a failure to show."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        status = (task / "status").read_text().splitlines()
        lines.append(
            f"{task.name}: " + " ".join(line for line in status if line.startswith(("SigIgn", "SigBlk", "SigCgt")))
        )
    return "\n".join(lines)
