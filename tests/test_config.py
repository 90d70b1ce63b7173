"""irmd --config: a TOML file with the tables of Ouroboros's irmd.conf boots a working IRMd,
and a bad file stops the boot with a message naming the file and the table.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BIN, IrmdProc, free_port, irmd_env, start_irmd, stop_irmd, udp4_bootstrap, wait_for

from proto import messages as m

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(180)
def test_make_demo_boots_the_demo_config_and_every_step_works() -> None:
    """`make demo`'s runner: local, udp and unicast layers, oping, Styx, IBP and netplumb, a clean stop;
    and it reads no input (what a user types ahead is the shell's next command, not a step's)."""
    typed, ahead = os.pipe()
    os.write(ahead, b"echo typed ahead\n")
    os.close(ahead)
    try:
        r = subprocess.run(
            [sys.executable, "-m", "apps.demo", str(ROOT / "configs" / "demo.toml")],
            cwd=ROOT,
            stdin=typed,
            capture_output=True,
            text=True,
            timeout=150,
        )
        left = os.read(typed, 100)
    finally:
        os.close(typed)
    out = r.stdout
    assert r.returncode == 0 and "demo done." in out and "irmd stopped (cleanly)" in out, out[-3000:] + r.stderr[-3000:]
    for seen in (
        "3 packets transmitted, 3 received",
        "Hello from a Styx service over a flow.",
        "written over 9P",
        "300000 bytes stored in depot1 and loaded back intact",
        "PIPED THROUGH NETPLUMB",
        "net (unicast ipcp n1)  names: depot1, files, host1",
    ):
        assert seen in out, f"missing {seen!r} in:\n{out[-3000:]}"
    assert left == b"echo typed ahead\n", "a step of the demo read its input"


@pytest.mark.timeout(120)
def test_an_irmd_conf_style_pair_of_files_builds_a_unicast_layer(tmp_path: Path) -> None:
    port = free_port(["127.0.0.1"])
    first = tmp_path / "first.toml"
    first.write_text(f"""
[name.pong]
prog = ["oping"]
args = ["-l"]
lb = "spill"

[udp4.u1]
bootstrap = "lan"
ip = "127.0.0.1"
port = {port}

[unicast.n1]
bootstrap = "net"
autobind = true
routing = "link-state"
addr_size = 4
max_ttl = 30
reg = ["pong"]
""")
    member = tmp_path / "member.toml"
    member.write_text(f"""
[udp4.u2]
bootstrap = "lan"
ip = "127.0.0.2"
port = {port}
peer = "127.0.0.1"

[unicast.n2]
enrol = "net"
conn = ["n1"]
autobind = true
""")
    a = start_irmd(tmp_path, "a", ["--config", str(first)])
    b = None
    try:
        wait_for(lambda: any(r["layer"] == "net" for r in a.table("ipcp", "list")), 20, "layer net at a")
        b = start_irmd(tmp_path, "b", ["--config", str(member)])
        wait_for(lambda: any(r["layer"] == "net" for r in b.table("ipcp", "list")), 30, "layer net at b")

        def pong_reachable() -> bool:
            out = b.run("oping", "-n", "pong", "-c", "2", "-i", "10", timeout=20)
            return out.returncode == 0 and "2 received" in out.stdout

        wait_for(pong_reachable, 40, "pong over the unicast layer", interval=1.0)
        assert [r["lb"] for r in a.table("name", "list") if r["name"] == "pong"] == ["spillover"]
    finally:
        if b is not None:
            stop_irmd(b)
        stop_irmd(a)


@pytest.mark.timeout(180)
def test_join_bootstraps_a_layer_no_one_answers_for_and_rejoins_it_after_a_reboot(tmp_path: Path) -> None:
    port = free_port(["127.0.0.1", "127.0.0.2"])

    def host(i: int) -> Path:
        conf = tmp_path / f"h{i}.toml"
        conf.write_text(f"""
[name.pong{i}]
prog = ["oping"]
args = ["-l"]

[udp4.u{i}]
bootstrap = "lan"
ip = "127.0.0.{i}"
port = {port}
peer = "127.0.0.{3 - i}"

[unicast.n{i}]
join = "net"
autobind = true
conn = ["auto"]
reg = ["pong{i}"]
""")
        return conf

    def in_net(irmd: IrmdProc) -> bool:
        return any(r["layer"] == "net" for r in irmd.table("ipcp", "list"))

    def pings(irmd: IrmdProc, name: str) -> bool:
        out = irmd.run("oping", "-n", name, "-c", "2", "-i", "10", timeout=20)
        return out.returncode == 0 and "2 received" in out.stdout

    a = start_irmd(tmp_path, "a", ["--config", str(host(1))])
    b = None
    try:
        wait_for(lambda: in_net(a), 30, "layer net at a")
        wait_for(lambda: "no member of layer net answered: bootstrapping it" in a.log_text(), 10, "a's bootstrap")
        b = start_irmd(tmp_path, "b", ["--config", str(host(2))])
        wait_for(lambda: in_net(b), 30, "layer net at b")
        wait_for(lambda: "joined layer net through a member" in b.log_text(), 10, "b's join to be logged")
        wait_for(lambda: pings(b, "pong1"), 40, "pong1 from b", interval=1.0)
        stop_irmd(a)  # the first host reboots with the same file: it joins b's layer, not a new one
        # a reboot keeps the IPCPs' member keys (/var/lib/ouroboros): n1 proves it is n1 again
        keys = {"OUROBOROS_STATE_DIR": str(a.sock.with_suffix(".state"))}
        a = start_irmd(tmp_path, "a2", ["--config", str(host(1))], env=keys)
        wait_for(lambda: in_net(a), 40, "layer net at a again")
        # logged once the config step ends, just after the IPCP lists the layer
        wait_for(lambda: "joined layer net through a member" in a.log_text(), 10, "a's join to be logged")
        wait_for(lambda: pings(a, "pong2") and pings(b, "pong1"), 60, "pongs both ways", interval=1.0)
    finally:
        if b is not None:
            stop_irmd(b)
        stop_irmd(a)


def _boot(tmp_path: Path, file: str, config: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """An irmd started on `config` (a TOML text, in `file`), run to its end: how it ended, and its
    socket's path."""
    conf = tmp_path / file
    conf.write_text(config)
    sock = tmp_path / "irmd.sock"
    r = subprocess.run(
        [str(BIN / "irmd"), "--sock", str(sock), "--config", str(conf)],
        env=irmd_env(sock),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return r, sock


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[frobnicate.x]\nbootstrap = 'l'\n", ["unknown table [frobnicate]"]),
        ("[local.lo]\nbootstrap = 'l'\ncolour = 'red'\n", ["[local.lo]", "colour"]),
        ("[name.x]\nlb = 'random'\n", ["[name.x]", "lb = 'random'"]),
        ("[unicast.n]\nbootstrap = 'net'\ndht_k = 21\n", ["[unicast.n]", "dht_k", "from 1 to 20"]),
        ("[limits]\nflows_per_uid = 0\n", ["[limits]", "flows_per_uid"]),
        ("limits = 3\n", ["expected a table [limits]"]),
        ("[local.lo\n", ["bad.toml"]),
        ("[udp4.u]\nbootstrap = 'l'\nip = 'not an ip'\n", ["[udp4.u]", "IPv4"]),
    ],
)
def test_a_bad_config_stops_the_boot_naming_file_and_table(tmp_path: Path, text: str, words: list[str]) -> None:
    r, sock = _boot(tmp_path, "bad.toml", text)
    assert r.returncode == 1
    for word in words:
        assert word in r.stderr, r.stderr
    assert not sock.exists()  # checked before anything started


@pytest.mark.timeout(60)
def test_a_config_that_fails_when_applied_stops_the_irmd_and_its_ipcps(tmp_path: Path) -> None:
    # Only running it shows that this host has no such address to bind.
    r, sock = _boot(
        tmp_path, "late.toml", "[local.lo]\nbootstrap = 'l'\n\n[udp4.u]\nbootstrap = 'u'\nip = '192.0.2.1'\n"
    )
    assert r.returncode == 1
    assert "[udp4.u]" in r.stderr and "cannot bind 192.0.2.1" in r.stderr, r.stderr
    assert not sock.exists()


@pytest.mark.timeout(60)
def test_config_variables_come_from_the_environment_and_a_missing_one_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "vars.toml"
    conf.write_text('[local."lo-${HOST_TAG}"]\nbootstrap = "local-${HOST_TAG}"\nreg = ["${NOT_SET_ANYWHERE}"]\n')
    sock = tmp_path / "irmd.sock"
    env = {**irmd_env(sock), "HOST_TAG": "x1"}
    env.pop("NOT_SET_ANYWHERE", None)
    r = subprocess.run(
        [str(BIN / "irmd"), "--sock", str(sock), "--config", str(conf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "local.lo-${HOST_TAG}.reg" in r.stderr and "${NOT_SET_ANYWHERE} is not set" in r.stderr
    conf.write_text('[local."lo-${HOST_TAG}"]\nbootstrap = "local-${HOST_TAG}"\n')
    irmd = start_irmd(tmp_path, "v", ["--config", str(conf)], env={"HOST_TAG": "x1"})
    try:
        wait_for(
            lambda: [(r["name"], r["layer"]) for r in irmd.table("ipcp", "list")] == [("lo-x1", "local-x1")],
            15,
            "the IPCP named from the environment",
        )
    finally:
        stop_irmd(irmd)


@pytest.mark.timeout(120)
def test_irm_dump_config_boots_an_irmd_into_the_same_state(tmp_path: Path) -> None:
    port = free_port(["127.0.0.1"])
    a = start_irmd(tmp_path, "a")
    try:
        for words in (["ipcp", "bootstrap", "name", "lo", "type", "local", "layer", "local"],
                      ["ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", "lan", "ip", "127.0.0.1",
                       "port", str(port)],
                      ["ipcp", "bootstrap", "name", "n1", "type", "unicast", "layer", "net", "autobind",
                       "routing", "ecmp"],
                      ["ipcp", "connect", "name", "n1", "dst", "auto"],
                      ["bind", "program", "oping", "name", "pong", "auto", "--", "-l"],
                      ["bind", "program", "oecho", "name", "spaced", "auto", "--", "-m", "two words", "-l"],
                      ["name", "create", "spare", "lb", "spillover"],
                      ["name", "create", "plain"],  # round-robin, which a file without lb = would not give
                      ["name", "register", "pong", "layer", "net", "layer", "local"]):  # fmt: skip
            a.irm_ok(*words)
        dumped = a.irm_ok("dump", "config").stdout
        before = {
            "ipcps": sorted((r["name"], r["type"], r["layer"]) for r in a.table("ipcp", "list")),
            "names": sorted((r["name"], r["lb"], r["layers"], r["programs"]) for r in a.table("name", "list")),
        }
    finally:
        stop_irmd(a)
    assert 'conn = [\n    "auto",\n]' in dumped and 'routing = "ecmp"' in dumped and '"two words"' in dumped
    conf = tmp_path / "dumped.toml"
    conf.write_text(dumped)
    check = subprocess.run([str(BIN / "irmd"), "--check-config", str(conf)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    b = start_irmd(tmp_path, "b", ["--config", str(conf)])
    try:
        wait_for(lambda: "applied" in b.log_text(), 30, "the dumped config applied")
        after = {
            "ipcps": sorted((r["name"], r["type"], r["layer"]) for r in b.table("ipcp", "list")),
            "names": sorted((r["name"], r["lb"], r["layers"], r["programs"]) for r in b.table("name", "list")),
        }
        assert after == before
        assert b.irm_ok("dump", "config").stdout == dumped  # dump, boot from the dump, dump again: the same
        out = b.run("oping", "-n", "pong", "-c", "2", "-i", "10", timeout=20)
        assert out.returncode == 0 and "2 received" in out.stdout, out.stdout + out.stderr
    finally:
        stop_irmd(b)


@pytest.mark.timeout(60)
def test_irm_dump_graph_shows_what_runs_over_what_as_text_and_dot(tmp_path: Path) -> None:
    port = free_port(["127.0.0.1"])
    irmd = start_irmd(tmp_path)
    try:
        irmd.irm_ok(
            "ipcp", "bootstrap", "name", "u", "type", "udp4", "layer", "lan", "ip", "127.0.0.1", "port", str(port)
        )
        irmd.irm_ok("ipcp", "bootstrap", "name", "n1", "type", "unicast", "layer", "net", "autobind")
        irmd.irm_ok("bind", "program", "oping", "name", "pong", "auto", "--", "-l")
        irmd.irm_ok("name", "register", "pong", "layer", "net")
        # a flow to a name of this very member crosses the unicast layer and comes back
        out = irmd.run("oping", "-n", "pong", "-c", "2", "-i", "10", timeout=20)
        assert out.returncode == 0 and "2 received" in out.stdout, out.stdout + out.stderr
        text = irmd.irm_ok("dump", "graph").stdout.splitlines()
        assert text[0] == "net (unicast ipcp n1)  names: pong" and text[1].strip() == "└── lan (udp4 ipcp u)"
        dot = irmd.irm_ok("dump", "graph", "dot").stdout
        assert dot.startswith("digraph layers {") and '"layer net" -> "layer lan";' in dot
        assert "rankdir=BT" not in dot  # edges point down: the upper layer is drawn above the lower
        assert '"pong" -> "layer net";' in dot
        bad = irmd.irm("dump", "graph", "svg")
        assert bad.returncode == 1 and "svg" in bad.stderr  # a grammar error, as 0.23
    finally:
        stop_irmd(irmd)


EXAMPLE = ROOT / "configs" / "irmd.conf.example"


@pytest.mark.timeout(60)
def test_a_program_the_config_binds_that_is_not_installed_is_left_unbound_with_a_warning(tmp_path: Path) -> None:
    conf = tmp_path / "progs.toml"
    conf.write_text("[name.x]\nprog = ['nosuchprogram', 'oping']\n")
    irmd = start_irmd(tmp_path, args=["--config", str(conf)])
    try:
        wait_for(lambda: "applied" in irmd.log_text(), 20, "the config to be applied")
        assert "[name.x] prog: program 'nosuchprogram' not found" in irmd.log_text()
        row = next(r for r in irmd.table("name", "list") if r["name"] == "x")
        assert row["programs"].endswith("/oping") and row["lb"] == "spillover"  # irmd.conf's default lb
    finally:
        stop_irmd(irmd)


@pytest.mark.timeout(60)
def test_irmd_conf_spellings_and_0_23_keys_are_taken(tmp_path: Path) -> None:
    from irmd.config import plan

    conf = tmp_path / "keys.toml"
    conf.write_text("""
[udp4.u]
bootstrap = "udp"
ip = "127.0.0.1"
port = 3435
dns = "127.0.0.1"

[unicast.n]
bootstrap = "net"
addr_size = 4
eid_size = 8
max_ttl = 60
addr-auth = "flat"
routing = "link-state"
ls_t_recalc = 4
ls_t_update = 15
ls_t_timeo = 60
congestion = "none"
directory = "dht"
hash = "SHA3_256"
dht_alpha = 3
dht_k = 8
dht_t_expiry = 86400
dht_t_refresh = 900
dht_t_replicate = 900

[limits]
flows_per_uid = 99
""")
    boot = plan(conf)
    by_ipcp = {msg.name: msg for _, msg in boot.steps if isinstance(msg, m.IpcpBootstrap)}
    assert by_ipcp["u"].conf == {"ip": "127.0.0.1", "port": "3435", "dns": "127.0.0.1"}
    assert by_ipcp["n"].conf == {
        "addr": "4",
        "eid": "8",
        "ttl": "60",
        "addr_auth": "flat",
        "routing": "link_state",
        "ls_t_recalc": "4",
        "ls_t_update": "15",
        "ls_t_timeo": "60",
        "congestion": "none",
        "directory": "DHT",
        "hash": "SHA3_256",
        "dht_alpha": "3",
        "dht_k": "8",
        "dht_t_expire": "86400",
        "dht_t_refresh": "900",
        "dht_t_replicate": "900",
    }
    assert boot.limits.flows_per_uid == 99


def test_congestion_lfa_is_0_23s_config_word_for_mb_ecn(tmp_path: Path) -> None:
    """0.23's irmd.conf parser reads congestion = "lfa" as multi-bit ECN (and refuses "mb-ecn"): a
    file that boots there asks for mb-ecn here."""
    from irmd.config import plan

    conf = tmp_path / "ca.toml"
    conf.write_text('[unicast.n]\nbootstrap = "net"\ncongestion = "lfa"\n')
    (boot,) = [msg for _, msg in plan(conf).steps if isinstance(msg, m.IpcpBootstrap)]
    assert boot.conf == {"congestion": "mb-ecn"}


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("addr_size = 3", 'bad addr_size "3"'),
        ("max_ttl = 0", 'bad max_ttl "0"'),
        ("eid_size = 4", 'bad eid_size "4"'),
        ('addr-auth = "random"', 'bad addr-auth "random"'),
        ("dht_t_expiry = 5", 'bad dht_t_expiry "5"'),
    ],
)
def test_a_bad_value_is_named_by_the_key_the_file_spells(tmp_path: Path, line: str, said: str) -> None:
    from irmd.config import ConfigError, plan

    conf = tmp_path / "bad.toml"
    conf.write_text(f'[unicast.n]\nbootstrap = "net"\n{line}\n')
    with pytest.raises(ConfigError, match=re.escape(said)):
        plan(conf)


@pytest.mark.timeout(60)
def test_bootstrap_beside_enrol_is_ignored_with_a_warning_as_0_23_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from irmd.config import ConfigError, plan

    conf = tmp_path / "both.toml"
    conf.write_text('[unicast.n]\nbootstrap = "net"\nenrol = "n1"\n')
    with caplog.at_level(logging.WARNING, logger="irmd.config"):
        steps = [msg for _, msg in plan(conf).steps]
    assert any(isinstance(s, m.IpcpEnroll) and s.dst == "n1" for s in steps)
    assert not any(isinstance(s, m.IpcpBootstrap) for s in steps)
    assert "ignoring bootstrap= beside enrol=" in caplog.text
    conf.write_text('[unicast.n]\nbootstrap = "net"\njoin = "net"\n')  # join is ours: no guessing
    with pytest.raises(ConfigError, match="give one of bootstrap=, enrol= and join="):
        plan(conf)


@pytest.mark.timeout(60)
def test_dns_is_accepted_with_a_warning_as_there_is_no_ddns(irmd: IrmdProc) -> None:
    port = free_port(["127.0.0.1"])
    irmd.irm_ok(*udp4_bootstrap("udp", "127.0.0.1", "port", str(port), "dns", "127.0.0.1"))
    irmd.note_children()
    assert "no dynamic DNS here" in irmd.log_text()  # the udp IPCP says so
    assert irmd.table("ipcp", "list")[0]["state"] == "operational"


@pytest.mark.timeout(180)
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="the example's Ethernet IPCPs and its fixed UDP port need root and a network namespace",
)
def test_the_ouroboros_example_config_boots_whole(tmp_path: Path) -> None:
    ns = f"irmdconf{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    proc: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        conf = tmp_path / "irmd.conf"
        conf.write_text(EXAMPLE.read_text())  # as it is: its Ethernet IPCPs on lo
        sock = tmp_path / "irmd.sock"
        log = tmp_path / "irmd.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, str(BIN / "irmd"), "--sock", str(sock), "--config", str(conf)],
                env=irmd_env(sock),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(lambda: proc.poll() is not None or "applied" in log.read_text(), 150, "the example to boot")
        assert proc.poll() is None, log.read_text()[-3000:]
        irm = IrmdProc(sock, log, proc, irmd_env(sock))
        ipcps = {r["name"]: r for r in irm.table("ipcp", "list")}
        assert {n: (r["type"], r["layer"], r["state"]) for n, r in ipcps.items()} == {
            "local1": ("local", "local1", "operational"),
            "lan1": ("unicast", "LAN", "operational"),
            "lan2": ("unicast", "LAN", "operational"),
            "bc1": ("broadcast", "broadcast", "operational"),
            "bc2": ("broadcast", "broadcast", "operational"),
            "ethl": ("eth-llc", "ethl1", "operational"),
            "eth1": ("eth-dix", "eth1", "operational"),
            "udp1": ("udp4", "udp", "operational"),
            "udp2": ("udp6", "udp2", "operational"),
        }
        names = {r["name"]: r for r in irm.table("name", "list")}
        assert {"oping", "oecho", "ocbr", "ovpn", "oping.secure", "bc1", "LAN", "lan1", "lan2"} <= set(names)
        assert "LAN" in names["oping"]["layers"] and "local1" in names["bc1"]["layers"]
        assert "eth1" in names["lan1"]["layers"] and names["ocbr"]["programs"].endswith("/ocbr")
        assert names["ovpn"]["programs"].endswith("/ovpn")  # both programs are installed beside oping
        r = subprocess.run(
            ["ip", "netns", "exec", ns, str(BIN / "oping"), "-n", "oping", "-c", "2", "-i", "100"],
            env=irmd_env(sock),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "2 packets transmitted, 2 received" in r.stdout, r.stdout + r.stderr  # started on demand
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_a_mistyped_key_or_table_gets_a_suggestion_and_check_config_says_so_before_starting(tmp_path: Path) -> None:
    for text, hint in [
        ('[unicast.n1]\nbootstrp = "net"\n', 'unknown key "bootstrp"; did you mean "bootstrap"?'),
        ('[unicst.n1]\nbootstrap = "net"\n', 'did you mean "unicast"?'),
        ('[name.pong]\nprgo = ["oping"]\n', 'did you mean "prog"?'),
        ('[udp4.u]\nbootstrap = "lan"\nip = "127.0.0.1"\npeers = "127.0.0.2"\n', 'did you mean "peer"?'),
    ]:
        conf = tmp_path / "typo.toml"
        conf.write_text(text)
        r = subprocess.run([str(BIN / "irmd"), "--check-config", str(conf)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and hint in r.stderr, (text, r.stderr)
    conf.write_text('[local.lo]\nbootstrap = "local"\n[name.pong]\nprog = ["oping"]\nargs = ["-l"]\n')
    r = subprocess.run([str(BIN / "irmd"), "--check-config", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout == f"{conf}: fine (1 IPCP, 1 name)\n", r.stderr


@pytest.mark.timeout(120)
def test_the_demos_layer_admits_no_other_irmd_of_the_host(tmp_path: Path) -> None:
    """Every user of the host reaches the demo's udp layer on 127.0.0.1: another IRMd (run by root
    here: a UDP port above 1023 and an IRMd of one's own need no privilege, but the interpreter is
    beyond uid 65534's reach on some hosts) enrolled in its open unicast layer and registered depot1
    there. The demo gives its layer a key of its own: without it the enrollment fails, with it it works."""
    from apps.demo import demo_vars

    demo = demo_vars(tmp_path / "scratch")
    demo["DEMO_PORT"] = str(free_port(["127.0.0.1", "127.0.0.2"]))
    host = start_irmd(tmp_path, "demo", args=["--config", str(ROOT / "configs" / "demo.toml")], env=demo)
    other = start_irmd(tmp_path, "other")
    try:
        wait_for(lambda: "applied" in host.log_text(), 60, "the demo's config to be applied")
        host.note_children()
        other.irm_ok(*udp4_bootstrap("lan", "127.0.0.2", "port", demo["DEMO_PORT"], "peer", "127.0.0.1"))
        r = other.irm("ipcp", "enroll", "type", "unicast", "name", "evil", "layer", "net", "dst", "n1", "autobind")
        assert r.returncode != 0, r.stdout + r.stderr
        assert not [row for row in other.table("ipcp", "list") if row["layer"] == "net"]
        r = other.irm(
            "ipcp", "enroll", "type", "unicast", "name", "n2", "layer", "net", "dst", "n1", "key", demo["DEMO_KEY"]
        )
        assert r.returncode == 0, r.stdout + r.stderr  # who was given the key joins
        other.note_children()
    finally:
        stop_irmd(other, check=False)
        stop_irmd(host, check=False)
