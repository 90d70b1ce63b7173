"""`python -m bench.profile TARGET...`: where the time goes on the paths that miss their goals.

Each target builds its path as its suite does, drives a steady load, and measures every process
on it in three passes: CPU time and context switches per unit of work from /proc (unperturbed),
system calls per unit (strace -c), and where the CPU goes (py-spy, native frames included).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from bench import hosts, ibp, netns
from bench.harness import BenchError, ops_per_second
from bench.stack import Stack, tool
from flowlib import QosSpec, flow_alloc, qos
from flowlib.irm import IrmClient
from transports.unix import check_dirs

log = logging.getLogger("bench.profile")

SIZE = 1400
RATE = 100  # py-spy samples per second
CLK_TCK = os.sysconf("SC_CLK_TCK")
OUT_PREFIX = "ouroboros-bench-profiles-"  # a fresh private directory per run, in the temporary directory

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Load:
    """A path ready for work: `run(seconds)` drives it for about that long; units of work done."""

    unit: str
    run: Callable[[float], float]


Build = Callable[[contextlib.ExitStack], Load]


# -- the paths ---------------------------------------------------------------------------------


def _flood(irm: IrmClient, spec: QosSpec = qos.raw, encrypt: bool = False, name: str = hosts.NAME) -> Load:
    """1,400-byte SDUs from this process to the flow server, counted where they arrive."""

    def run(seconds: float) -> float:
        flow = hosts.alloc(irm, spec, encrypt, name)
        return hosts.on_flow(flow, lambda s, r, t: hosts.sink(s, r, t, seconds, SIZE))[0]

    return Load("SDU", run)


def _eth(ex: contextlib.ExitStack) -> Load:
    pair = ex.enter_context(netns.VethPair("opf"))
    a, b = (ex.enter_context(Stack(ns)) for ns in pair.ns)
    for st, dev in ((a, pair.dev[0]), (b, pair.dev[1])):
        hosts.irm_at(st, "ipcp", "bootstrap", "type", "eth-dix", "name", "e", "layer", "ethprof", "dev", dev)
    hosts.flow_server(a, "ethprof")
    return _flood(_client(ex, b))


def _unicast(ex: contextlib.ExitStack, members: int) -> Load:
    """A line of `members` hosts on loopback, each a udp4 shim and a unicast member; the flow end to end."""
    ips = [f"127.0.0.{i + 1}" for i in range(members)]
    port = hosts.free_port(tuple(ips))
    stacks = [ex.enter_context(Stack()) for _ in ips]
    for i, (st, ip) in enumerate(zip(stacks, ips, strict=True)):
        hosts.udp_shim(st, ip, port, None if i == 0 else ips[0])
        if i == 0:
            hosts.irm_at(st, "ipcp", "bootstrap", "type", "unicast", "name", "n1", "layer", "net", "autobind")
        else:
            hosts.irm_at(st, "ipcp", "enroll", "type", "unicast", "name", f"n{i + 1}", "layer", "net",
                         "dst", f"n{i}", "autobind")  # fmt: skip
            hosts.irm_at(st, "ipcp", "connect", "name", f"n{i + 1}", "dst", f"n{i}")
    hosts.flow_server(stacks[-1], "net")
    return _flood(_client(ex, stacks[0]))


def _udp(ex: contextlib.ExitStack, spec: QosSpec, encrypt: bool = False, loss: int = 0) -> Load:
    opts = ("impair", f"loss={loss}") if loss else ()
    _, _, irm = hosts.udp_pair(ex, "127.0.0.1", "127.0.0.2", *opts)
    return _flood(irm, spec, encrypt)


def _client(ex: contextlib.ExitStack, st: Stack) -> IrmClient:
    irm = IrmClient(st.sock)
    ex.callback(irm.close)
    hosts.wait_route(irm)
    return irm


def _local(ex: contextlib.ExitStack) -> Stack:
    st = ex.enter_context(Stack())
    st.irm("ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local")
    return st


def _alloc(ex: contextlib.ExitStack) -> Load:
    st = _local(ex)
    hosts.flow_server(st, "local")

    def run(seconds: float) -> float:
        return ops_per_second(lambda: flow_alloc(hosts.NAME, timeout=10).close(), seconds) * seconds

    return Load("alloc+dealloc", run)


def _styx(ex: contextlib.ExitStack, write: bool) -> Load:
    from apps.styx.client import Client
    from apps.styx.transport import dial

    st = _local(ex)
    export = st.dir / "export"
    export.mkdir()
    data = os.urandom(64 * 1024 * 1024)
    (export / "big.bin").write_bytes(data)
    st.spawn([tool("styx"), "serve", "--name", "prof-styx", "--root", str(export), "--layer", "local"], "styx")
    client = ex.enter_context(Client(_retry(lambda: dial("prof-styx"))))

    def run(seconds: float) -> float:
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            if write:
                client.put("copy.bin", data)
            else:
                client.cat("big.bin")
            done += len(data)
        return done / 1e6

    return Load("MB", run)


def _ibp(ex: contextlib.ExitStack) -> Load:
    st = _local(ex)
    for d in ibp.DEPOTS:
        st.spawn([tool("ibp"), "depot", "--name", d, "--dir", str(st.dir / d), "--layer", "local",
                  "--capacity", "8G"], d)  # fmt: skip
    for d in ibp.DEPOTS:
        ibp._wait_depot(d)
    data, buf = os.urandom(ibp.PAYLOAD), bytearray(ibp.PAYLOAD)

    def run(seconds: float) -> float:
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            ibp._ibp(data, buf)  # a store, a load and a depot-to-depot copy
            done += 3 * len(data)
        return done / 1e6

    return Load("MB", run)


def _netplumb(ex: contextlib.ExitStack) -> Load:
    st = _local(ex)
    env = dict(os.environ, HOME=str(st.dir / "home"))
    subprocess.run([tool("plumb-keygen")], env=env, check=True, capture_output=True, timeout=30)
    auth = st.dir / "authorized_keys"
    auth.write_text((st.dir / "home" / ".config" / "netplumb" / "id.pub").read_text())
    st.spawn([tool("netplumbd"), "--name", "prof-plumb", "--authorized-keys", str(auth),
              "--host-key", str(st.dir / "host_key")], "netplumbd")  # fmt: skip
    st.irm("name", "register", "prof-plumb", "layer", "local")
    plumb = [tool("plumb"), "prof-plumb"]
    _retry(lambda: subprocess.run([*plumb, "true"], env=env, capture_output=True, timeout=30, check=True))
    data = os.urandom(20_000_000)

    def run(seconds: float) -> float:
        done, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            done += len(subprocess.run([*plumb, "cat"], env=env, input=data, capture_output=True, timeout=120).stdout)
        return done / 1e6

    return Load("MB", run)


def _retry(make: Callable[[], T], tries: int = 50) -> T:
    """`make()` until it works: a server just spawned binds itself a moment later."""
    for _ in range(tries - 1):
        try:
            return make()
        except Exception:  # whatever the server's absence looks like to this client
            time.sleep(0.2)
    return make()


TARGETS: dict[str, tuple[str, Build]] = {
    "eth": ("raw flow across a veth pair, eth-dix", _eth),
    "unicast1": ("raw flow over a 2-member unicast layer over loopback udp4", lambda ex: _unicast(ex, 2)),
    "unicast3": ("raw flow over a 4-member line (3 hops)", lambda ex: _unicast(ex, 4)),
    "udp": ("raw flow over loopback udp4: the reference for frct0, frct5 and encrypted", lambda ex: _udp(ex, qos.raw)),
    "frct0": ("reliable flow (qos.data) over loopback udp4", lambda ex: _udp(ex, qos.data)),
    "frct5": ("reliable flow over loopback udp4 dropping 5%", lambda ex: _udp(ex, qos.data, loss=5)),
    "encrypted": ("encrypted raw flow over loopback udp4", lambda ex: _udp(ex, qos.raw, encrypt=True)),
    "alloc": ("flow_alloc + close on the local layer", _alloc),
    "styx-read": ("9P read (cat) of 64 MB over a local flow", lambda ex: _styx(ex, write=False)),
    "styx-write": ("9P write (put) of 64 MB over a local flow", lambda ex: _styx(ex, write=True)),
    "ibp": ("IBP store, load and depot copy of 32 MiB over local flows", _ibp),
    "netplumb": ("plumb HOST cat of 20 MB over a local flow", _netplumb),
}


# -- the processes on a path -------------------------------------------------------------------


def processes() -> dict[int, str]:
    """This process and all its descendants, each with a short label."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children[ppid].append(int(entry.name))
    out: dict[int, str] = {}
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            out[pid] = "client (bench)" if pid == os.getpid() else _label(pid)
        todo += children.get(pid, [])
    return {pid: label for pid, label in out.items() if not label.startswith(("py-spy", "strace"))}


def _label(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    words = [Path(argv[0]).name, *argv[1:]]
    if len(words) > 2 and words[1] == "-m":  # python -m ipcp TYPE NAME SOCK, python -m bench.peer MODE ...
        words = words[2:5] if words[2] == "ipcp" else words[2:4]
    elif words[0].startswith("python"):
        words = [Path(w).name for w in words[1:3]]
    return " ".join(words)[:40]


@dataclasses.dataclass(frozen=True)
class Usage:
    cpu_s: float
    sys_s: float  # of cpu_s, in the kernel: on loopback a sender's system call also does the receiver's side
    children_s: float  # of its children that have exited (a plumb client, a remote cat)
    voluntary: int
    involuntary: int


def usage(pid: int) -> Usage:
    """CPU seconds and context switches of every thread of `pid` so far."""
    fields = (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]).split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: the whole thread group
    children = (int(fields[13]) + int(fields[14])) / CLK_TCK  # cutime, cstime: its reaped children
    vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
            vol += int(status["voluntary_ctxt_switches"])
            invol += int(status["nonvoluntary_ctxt_switches"])
    return Usage(cpu, int(fields[12]) / CLK_TCK, children, vol, invol)


# -- the three passes --------------------------------------------------------------------------


def _usages(procs: dict[int, str]) -> dict[int, Usage]:
    """usage() of each process that is still there (a job's short-lived helpers come and go)."""
    out = {}
    for pid in procs:
        with contextlib.suppress(OSError):
            out[pid] = usage(pid)
    return out


def pass_usage(load: Load, procs: dict[int, str], seconds: float) -> tuple[float, list[str]]:
    before = _usages(procs)
    start = time.monotonic()
    units = load.run(seconds)
    wall = time.monotonic() - start
    after = _usages(procs)
    lines = [f"  {units / wall:,.1f} {load.unit}/s; per {load.unit}: CPU µs, voluntary + involuntary switches"]
    for pid, label in procs.items():
        if pid not in before or pid not in after:
            continue
        d_cpu = after[pid].cpu_s - before[pid].cpu_s
        d_children = after[pid].children_s - before[pid].children_s
        if d_cpu <= 0 and d_children <= 0:
            continue
        vol = after[pid].voluntary - before[pid].voluntary
        invol = after[pid].involuntary - before[pid].involuntary
        kernel = (after[pid].sys_s - before[pid].sys_s) / d_cpu if d_cpu > 0 else 0.0
        lines.append(f"    {label:40} {d_cpu / units * 1e6:9.1f} µs  {vol / units:7.3f} + {invol / units:.3f}"
                     f"   ({d_cpu / wall:.0%} of a CPU, {kernel:.0%} in the kernel)")  # fmt: skip
        if d_children > 0:
            lines.append(f"    {'  its children, exited':40} {d_children / units * 1e6:9.1f} µs")
    return units, lines


def pass_strace(load: Load, procs: dict[int, str], seconds: float, out: Path) -> list[str]:
    files = {pid: out / f"strace.{pid}.txt" for pid in procs}
    traced = [pid for pid in procs if pid != os.getpid()]  # strace on this process would trace itself
    tracers = [subprocess.Popen(["strace", "-c", "-f", "-q", "-o", str(files[pid]), "-p", str(pid)],
                                stderr=subprocess.DEVNULL) for pid in traced]  # fmt: skip
    _wait_traced(traced)
    units = load.run(seconds)
    for t in tracers:
        t.send_signal(signal.SIGINT)
    for t in tracers:
        t.wait(10)
    lines = [f"  system calls per {load.unit} ({units:,.0f} {load.unit} under strace)"]
    for pid, label in procs.items():
        calls = _strace_counts(files[pid])
        if calls:
            top = ", ".join(f"{name} {n / units:.2f}" for name, n in calls.most_common(6))
            lines.append(f"    {label:40} {sum(calls.values()) / units:6.2f}: {top}")
    return lines


def _wait_traced(pids: list[int], within: float = 20.0) -> None:
    """Until every thread of `pids` has its tracer: units counted before would count for nothing."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        tracers = []
        for pid in pids:
            try:
                tasks = list(Path(f"/proc/{pid}/task").iterdir())
            except OSError:
                continue  # it has exited since (a job's short-lived helper): nothing to wait for
            for task in tasks:
                with contextlib.suppress(OSError):
                    tracers.append(re.search(r"^TracerPid:\s+(\d+)", (task / "status").read_text(), re.M))
        if all(m is not None and m[1] != "0" for m in tracers):
            return
        time.sleep(0.05)
    raise BenchError(f"strace did not attach to every thread within {within:.0f} s")


def _strace_counts(path: Path) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            f = line.split()
            if len(f) >= 5 and f[-1] != "total" and f[0][0].isdigit() and f[3].isdigit():
                counts[f[-1]] += int(f[3])
    return counts


def pass_pyspy(load: Load, procs: dict[int, str], seconds: float, out: Path, name: str) -> list[str]:
    spy = str(Path(sys.executable).with_name("py-spy"))
    recorders = {
        pid: subprocess.Popen([spy, "record", "--native", "--rate", str(RATE), "--duration", str(int(seconds) + 1),
                               "--format", "raw", "--output", str(out / f"{name}.{pid}.txt"), "--pid", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for pid, label in procs.items() if label.startswith(("client", "python", "ipcp", "bench.peer", "irmd", "styx",
                                                            "ibp", "plumb", "netplumbd", "apps"))
    }  # fmt: skip
    time.sleep(0.5)
    load.run(seconds)
    lines = [
        "  py-spy: each process's CPU samples (waits in epoll/futex/poll left out) by leaf frame,"
        " then by the innermost Python frame (with what it calls)"
    ]
    for pid, rec in recorders.items():
        with contextlib.suppress(subprocess.TimeoutExpired):
            rec.wait(seconds + 10)
        stacks = {st: n for st, n in _collapsed(out / f"{name}.{pid}.txt").items() if not _idle(st)}
        total = sum(stacks.values())
        if not total:
            continue
        leaves: collections.Counter[str] = collections.Counter()
        pyframes: collections.Counter[str] = collections.Counter()
        for stack, n in stacks.items():
            frames = stack.split(";")
            leaves["(waiting for the GIL)" if "take_gil" in stack else _frame(frames[-1])] += n
            pyframes[next((_frame(f) for f in reversed(frames) if ".py:" in f), "(no Python frame)")] += n
        lines.append(f"    {procs[pid]:40} {total / RATE / (seconds + 1):.0%} of a CPU in samples")
        lines.append("      leaf:   " + "; ".join(f"{f} {n / total:.0%}" for f, n in leaves.most_common(6)))
        lines.append("      Python: " + "; ".join(f"{f} {n / total:.0%}" for f, n in pyframes.most_common(6)))
    return lines


IDLE = ("epoll_wait", "wait4", "futex", "pthread_cond", "clock_nanosleep", "poll (", "select (", "sem_", "accept")


def _idle(stack: str) -> bool:
    """A sample of a thread waiting for something to do (not for the GIL: that is contention):
    in a wait call, in libc's unnamed syscall stub (futex waits), or in a blocking control read."""
    if "take_gil" in stack:
        return False
    leaf = stack.rsplit(";", 1)[-1]
    return (
        leaf.startswith(IDLE)
        or re.match(r"0x[0-9a-f]+ \(libc", leaf) is not None
        or (leaf.startswith("recvmsg (") and "recv_frame (" in stack)
    )


def _collapsed(path: Path) -> collections.Counter[str]:
    stacks: collections.Counter[str] = collections.Counter()
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if n.isdigit():
                stacks[stack] += int(n)
    return stacks


def _frame(frame: str) -> str:
    """`fn (path/to/file.py:12)` as `fn (file.py)`."""
    m = re.match(r"(.*) \((?:.*/)?([^/:]+)(?::\d+)?\)$", frame)
    return f"{m[1]} ({m[2]})" if m else frame


# -- main --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _target(name: str) -> Iterator[Load]:
    with contextlib.ExitStack() as ex:
        yield TARGETS[name][1](ex)


def profile(name: str, seconds: float, out: Path) -> list[str]:
    with _target(name) as load:
        load.run(1.0)  # warm-up: first flows, caches
        procs = processes()
        _, lines = pass_usage(load, procs, seconds)
        if shutil.which("strace"):
            lines += pass_strace(load, procs, seconds, out)
        lines += pass_pyspy(load, procs, seconds, out, name)
    return [f"{name}: {TARGETS[name][0]}", *lines]


def output_dir(path: Path | None) -> Path:
    """Where strace and py-spy write (as root, following links): a fresh 0700 directory of ours, or
    `path` if only we (or root) could have put anything in it: it and every directory above it ours
    or root's and not writable by others (sticky ones such as /tmp allowed above it). A directory of a
    fixed name in /tmp that another user made first would have them write through that user's links."""
    if path is None:
        return Path(tempfile.mkdtemp(prefix=OUT_PREFIX))
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        check_dirs(path, os.geteuid(), strict_leaf=True)
    except OSError as e:
        raise BenchError(f"will not write profiles in {path}: {e.strerror or e}") from None
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("targets", nargs="*", metavar="TARGET", help=f"of: {', '.join(TARGETS)} (default all)")
    p.add_argument("--seconds", type=float, default=4.0, help="load per pass (default 4)")
    p.add_argument(
        "--out", type=Path, help="py-spy and strace output: a directory only we may write (default: a new one)"
    )
    args = p.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target {', '.join(unknown)}: expected some of {', '.join(TARGETS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        args.out = output_dir(args.out)
    except BenchError as e:
        p.error(str(e))
    log.info("py-spy and strace output in %s", args.out)
    status = 0
    for name in args.targets or list(TARGETS):
        try:
            print("\n".join(profile(name, args.seconds, args.out)), flush=True)
        except (BenchError, OSError, subprocess.SubprocessError) as e:
            log.error("%s: %s", name, e)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
