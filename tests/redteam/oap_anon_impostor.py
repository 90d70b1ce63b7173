"""OAP: an impostor that presents no certificate takes an encrypted flow meant for a CA-certified name.

A client whose IRMd trusts a CA expects `files` to prove itself with a certificate from it, but
nothing records that expectation: a response without any certificate is taken as an anonymous
peer for every name the user has not pinned (flowlib.identity.server_identity), and the key
exchange is completed with whoever answered. A hostile host in the layer registers `files`,
answers without a certificate, and reads what the client sends over its "encrypted" flow.
(Pins protect only users who pinned; CA users have nothing to pin, so they are never protected.)
"""

from __future__ import annotations

import subprocess
import sys

from lab import BIN, PY, irmd, lab, main, stop, wait_for

sys.path.insert(0, str(__import__("lab").CHECKOUT / "tests"))
from helpers import free_port
from pki import Pki

IMPOSTOR = r"""
import json, os
from flowlib import flow_accept
from flowlib.irm import IrmClient, call
from proto import messages as m
irm = IrmClient()
call(irm.channel, m.Bind("process", str(os.getpid()), "files"), 10)
call(irm.channel, m.NameRegister("files", ["lan"]), 10)
print("ready", flush=True)
f = flow_accept(timeout=60, irm=irm)
data = f.read()
f.write(b"impostor got: " + bytes(data))
print(json.dumps({"read": data.decode(), "cipher": f.qos.cypher_s}), flush=True)
"""

CLIENT = r"""
import json
from flowlib import flow_alloc
f = flow_alloc("files", encrypt=True, timeout=15)
f.write(b"the password is hunter2")
f.set_timeout(10)
print(json.dumps({"peer": None if f.peer is None else f.peer.verified, "cypher_s": f.qos.cypher_s,
                  "answer": f.read().decode()}))
"""


def attack() -> bool:
    with lab("anonimpostor") as d:
        port = str(free_port(["127.0.0.1", "127.0.0.2"]))
        pki = Pki(d / "sec-a")  # host A's IRMd trusts this CA; the real `files` has a certificate from it
        pki.trust()
        pki.issue("files")  # the real server's identity, on a host that is down or slower than the impostor
        home = d / "home"
        home.mkdir()
        with (
            irmd(d, "a", env={"OUROBOROS_SECURITY_DIR": str(pki.base)}, local=False) as a,
            irmd(d, "b", env={"OUROBOROS_SECURITY_DIR": str(d / "sec-b")}, local=False) as b,
        ):
            a.irm_ok(
                "ipcp",
                "bootstrap",
                "type",
                "udp4",
                "name",
                "u",
                "layer",
                "lan",
                "ip",
                "127.0.0.1",
                "port",
                port,
                "peer",
                "127.0.0.2",
            )
            b.irm_ok(
                "ipcp",
                "bootstrap",
                "type",
                "udp4",
                "name",
                "u",
                "layer",
                "lan",
                "ip",
                "127.0.0.2",
                "port",
                port,
                "peer",
                "127.0.0.1",
            )
            imp = subprocess.Popen(
                [PY, "-c", IMPOSTOR],
                env=dict(b.env, PYTHONPATH=str(BIN.parent.parent)),
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            try:
                assert imp.stdout is not None
                wait_for(lambda: imp.stdout.readline().startswith("ready"), 30, "the impostor")  # type: ignore[union-attr]
                r = subprocess.run(
                    [PY, "-c", CLIENT],
                    env=dict(a.env, HOME=str(home), XDG_CONFIG_HOME=str(home)),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                print("client on A (CA store has the CA of `files`):", r.stdout.strip() or r.stderr.strip()[-400:])
                imp.wait(20)
            finally:
                stop(imp)
            out = imp.stdout.read() if imp.stdout else ""
            print("impostor on B (no certificate):", out.strip())
            return "hunter2" in out and r.returncode == 0


if __name__ == "__main__":
    main(attack, 200)
