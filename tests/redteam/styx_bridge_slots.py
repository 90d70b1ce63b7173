"""Styx: an anonymous TCP client of the bridge locks root (and every TCP client) out of the server.

The bridge allocates the flows of its TCP clients with its own IRMd connection, so the server
counts every one of them as the bridge's user (root) against --max-conns-per-user (16), and an
attached connection has no idle limit. uid 65534 opens 16 TCP connections, attaches as none and
says nothing more: root's own `styx cat files:/hello.txt` (a local flow, as root) is refused, as
is any other TCP client, for as long as the attacker likes.
"""

from __future__ import annotations

import socket
import subprocess
import time

from lab import BIN, as_nobody, irmd, lab, main, nobody_popen, spawn, stop, wait_for
from test_styx_trust import TCP_HOLDER as HOLDER


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def attack() -> bool:
    with lab("styxslots") as d, irmd(d) as ir:
        export = d / "export"
        export.mkdir()
        (export / "hello.txt").write_text("hello\n")
        port = free_port()
        serve = spawn(
            [str(BIN / "styx"), "serve", "--name", "files", "--layer", "local", "--root", str(export)],
            ir.env,
            d / "serve.log",
        )
        procs = [serve]
        holder = None
        try:
            wait_for(lambda: "files" in ir.irm("name", "list").stdout, 30, "styx serve")
            procs.append(
                spawn(
                    [str(BIN / "styx"), "bridge", "--name", "files", "--listen", f"tcp!127.0.0.1!{port}"],
                    ir.env,
                    d / "bridge.log",
                )
            )

            def bridge_up() -> bool:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return True
                except OSError:
                    return False

            wait_for(bridge_up, 30, "styx bridge")
            before = subprocess.run(
                [str(BIN / "styx"), "cat", "files:/hello.txt"], env=ir.env, capture_output=True, text=True, timeout=60
            )
            print("root's styx cat before:", before.returncode, before.stdout.strip(), before.stderr.strip()[-200:])
            holder = nobody_popen(ir, HOLDER, str(port), "16", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert holder.stdout is not None
            print("attacker (uid 65534, over TCP):", holder.stdout.readline().strip())
            time.sleep(1)
            after = subprocess.run(
                [str(BIN / "styx"), "cat", "files:/hello.txt"], env=ir.env, capture_output=True, text=True, timeout=60
            )
            print("root's styx cat during:", after.returncode, after.stdout.strip(), after.stderr.strip()[-200:])
            other = as_nobody(ir, HOLDER.replace("time.sleep(120)", ""), str(port), "1")
            print("another TCP client during:", (other.stdout + other.stderr).strip()[-300:])
            return before.returncode == 0 and after.returncode != 0
        finally:
            if holder is not None:
                stop(holder)
            for p in procs:
                stop(p)


if __name__ == "__main__":
    main(attack, 240)
