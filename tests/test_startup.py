"""What a process of the stack loads as it starts: the tools and daemons leave out what they may never
use (cryptography without a secured name or an encrypted flow; asyncio and TOML in `irm`; the servers'
modules in the clients of the same tool)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import IrmdProc


def loaded(code: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules starting with one of `prefixes` that a fresh interpreter has after `code`."""
    probe = f"import json, sys; {code}; print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names: list[str] = json.loads(r.stdout)
    return names


def test_irm_loads_no_event_loop_toml_metadata_or_cryptography() -> None:
    heavy = ("asyncio", "tomllib", "importlib.metadata", "cryptography", "nacl", "irmd.reg")
    assert loaded("import irmd.cli", heavy) == []


def test_irm_loads_no_key_files_code_or_openssl() -> None:
    heavy = ("irmd.identity", "proto.oap", "shutil", "difflib", "argparse")
    assert loaded("import irmd.cli", heavy) == []


def test_plumb_loads_no_event_loop_openssl_argparse_or_server_modules() -> None:
    heavy = ("asyncio", "hashlib", "_hashlib", "argparse", "apps.netplumb.limits", "apps.netplumb.policy")
    assert loaded("import apps.netplumb.client", heavy) == []


def test_flow_tools_load_no_openssl_flow_stats_or_oap() -> None:
    heavy = ("asyncio", "hashlib", "_hashlib", "flowlib.stats", "proto.oap")
    assert loaded("import apps.oping, apps.operf, apps.oecho", heavy) == []


def test_the_styx_and_ibp_clients_load_no_server_modules() -> None:
    servers = {"apps.styx.serve", "apps.styx.bridge", "apps.ibp.depot", "apps.ibp.server", "apps.ibp.storage"}
    names = loaded("import apps.styx.cli, apps.ibp.cli", ("apps.styx.", "apps.ibp.", "asyncio", "hashlib"))
    assert [n for n in names if n in servers or not n.startswith("apps.")] == []


def test_the_daemons_and_flowlib_load_no_cryptography_at_start() -> None:
    assert loaded("import irmd.daemon, flowlib, ipcp.udp, ipcp.local, apps.oping", ("cryptography",)) == []


def mapped(pid: int, library: str) -> bool:
    """Whether the process has `library` mapped, as the kernel says (/proc/PID/maps)."""
    return library in Path(f"/proc/{pid}/maps").read_text()


def test_an_irmd_serving_plain_flows_never_loads_cryptography(irmd: IrmdProc, local_layer: str) -> None:
    irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
    irmd.irm_ok("name", "register", "pong", "layer", local_layer)
    r = irmd.run("oping", "-n", "pong", "-c", "2", "-i", "10")
    assert "2 received" in r.stdout, r.stdout + r.stderr
    assert not mapped(irmd.pid, "cryptography")
    # and an encrypted flow loads it where it is needed
    r = irmd.run("oping", "-n", "pong", "-c", "1", "--encrypt")
    assert "1 received" in r.stdout, r.stdout + r.stderr
    assert mapped(irmd.pid, "cryptography")
