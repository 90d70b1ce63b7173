"""Boot an IRMd from a TOML file with the tables and keys of Ouroboros 0.23's irmd.conf.

[name.N] binds programs; [local.X], [udp4.X], [eth-dix.X], [unicast.X] ...
create IPCPs that bootstrap=, enrol= or join= (enrol, or bootstrap if no member answers),
then conn= neighbours and reg= names; [limits] sets the IRMd's limits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shutil
import socket
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from irmd.limits import LimitError, Limits
from irmd.secfiles import SEC_KEYS
from proto import messages as m
from proto.errors import AlreadyExists, FlowError, NotFound
from proto.names import LB_POLICIES
from proto.options import OptionError, bootstrap_conf, did_you_mean
from transports.unix import TrustError, read_trusted
from transports.wire import Message

if TYPE_CHECKING:
    from irmd.core import Irmd

log = logging.getLogger("irmd.config")

DEFAULT_PATH = Path("/etc/ouroboros/irmd.conf")  # read at start when there, as Ouroboros's irmd service does
# irmd.conf spells some options differently from the irm command line (dht_t_expiry: its example's
# spelling of what its parser reads as dht_t_expire).
ALIASES = {
    "addr_size": "addr",
    "eid_size": "eid",
    "max_ttl": "ttl",
    "device": "dev",
    "addr-auth": "addr_auth",
    "dht_t_expiry": "dht_t_expire",
}
# irmd.conf's spellings of values; 0.23's parser reads congestion "lfa" as mb-ecn (and refuses "mb-ecn"),
# so a file that boots there says "lfa" for it
VALUES = {"routing": {"link-state": "link_state"}, "directory": {"dht": "DHT"}, "congestion": {"lfa": "mb-ecn"}}
IPCP_KEYS = {"bootstrap", "enrol", "enroll", "join", "autobind", "reg", "conn"}
NAME_KEYS = {"prog", "args", "lb", "auto", *SEC_KEYS}
# Shims first, so the layers above find the layers they run over.
ENROL_PATIENCE = 300.0  # seconds an enrollment keeps looking for a member to enrol with
ENROL_RETRY = 2.0
JOIN_PATIENCE = 10.0  # seconds a join= looks for a member before it bootstraps the layer itself,
JOIN_TRIES = 4  # ... and at least this many tries: a loaded host's slow answers are no empty LAN
ORDER = ("local", "eth-dix", "eth-llc", "udp4", "udp6", "udp", "broadcast", "unicast")


VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")  # ${NAME}, ${NAME:-default}


class ConfigError(Exception):
    """A config file that cannot be applied; the message names the file and key."""


@dataclasses.dataclass
class Plan:
    """What a config file asks for: the IRMd's limits, and the steps to boot it."""

    steps: list[Step]
    limits: Limits = dataclasses.field(default_factory=Limits)

    @property
    def ipcps(self) -> set[str]:
        """The IPCPs the file makes."""
        return {
            (msg.enroll if isinstance(msg, _Join) else msg).name
            for _, msg in self.steps
            if isinstance(msg, m.IpcpCreate | m.IpcpBootstrap | m.IpcpEnroll | _Join)
        }

    @property
    def names(self) -> set[str]:
        """The names it makes ([name.N] tables)."""
        return {msg.name for _, msg in self.steps if isinstance(msg, m.NameCreate)}


def _expand(value: Any, path: Path, key: str = "") -> Any:
    """${VAR} in keys and strings, from the environment (HOSTNAME: this host's name), so one
    file serves every member of a LAN; ${VAR:-default} when VAR is unset or empty, as in a shell."""
    if isinstance(value, dict):
        return {_expand(k, path, key): _expand(v, path, f"{key}.{k}" if key else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, path, key) for v in value]
    if not isinstance(value, str):
        return value

    def var(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name) or (socket.gethostname() if name == "HOSTNAME" else default)
        if found is None:
            raise ConfigError(f"{path}: {key or 'a table name'}: ${{{name}}} is not set in the environment")
        return found

    return VAR.sub(var, value)


def _words(value: Any, where: str) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str | int | bool) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{where}: expected a string, a number or a list of them")
    return [str(v) for v in values]


def _arg_lists(value: Any, where: str) -> list[list[str]]:
    """Each program's arguments: a string split at spaces (irmd.conf's form), or a list of words, kept
    as they are (what `irm dump config` writes for words with spaces)."""
    values = value if isinstance(value, list) else [value]
    return [_words(v, where) if isinstance(v, list) else _words(v, where)[0].split() for v in values]


Step = tuple[str, Message]  # where in the file, what to ask the IRMd


def plan(path: Path) -> Plan:
    """The admin messages the file asks for, in the order to apply them, and its [limits].

    Registrations come last, once every IPCP has joined its layer: a table's reg= registers
    with that table's IPCP (as Ouroboros registers with the IPCP's pid).
    """
    try:  # what it says the IRMd does as its own user (it starts programs): only admins may have written it
        doc = tomllib.loads(read_trusted(path, os.geteuid()))
    except TrustError as e:
        raise ConfigError(f"{path}: will not boot from it: {e.strerror}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    doc = _expand(doc, path)
    steps: list[Step] = []
    regs: list[Step] = []
    for top, table in doc.items():
        if top not in ("name", "limits") and top not in ORDER:
            raise ConfigError(
                f"{path}: unknown table [{top}]: expected [name.N], [limits] or one of "
                f"{', '.join(f'[{t}.X]' for t in ORDER if t != 'udp')}" + did_you_mean(top, ["name", "limits", *ORDER])
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {top} = ...: expected a table [{top}]")
    try:
        limits = Limits().with_values(doc.get("limits", {}), f"{path}: [limits]")
    except LimitError as e:
        raise ConfigError(str(e)) from None
    for name, table in doc.get("name", {}).items():
        steps += _name_steps(path, name, table)
    for kind in ORDER:
        for ipcp, table in doc.get(kind, {}).items():
            ipcp_steps, ipcp_regs = _ipcp_steps(path, "udp4" if kind == "udp" else kind, ipcp, table)
            steps += ipcp_steps
            regs += ipcp_regs
    return Plan(steps + regs, limits)


def _name_steps(path: Path, name: str, table: Any) -> list[Step]:
    where = f"{path}: [name.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    if unknown := set(table) - NAME_KEYS:
        hints = "".join(did_you_mean(k, NAME_KEYS) for k in sorted(unknown))
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}: expected {sorted(NAME_KEYS)}{hints}")
    lb = table.get("lb", "spill")  # irmd.conf's default: spill
    lb = {"spill": "spillover"}.get(lb, lb)
    if lb not in LB_POLICIES:
        raise ConfigError(f"{where}: lb = {lb!r}: expected one of {', '.join(LB_POLICIES)} (or spill)")
    sec = {}
    for key in SEC_KEYS:
        if key in table:
            value = table[key]
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where} {key}: expected a path")
            sec[key] = os.path.abspath(os.path.join(path.parent, os.path.expanduser(value)))
    steps: list[Step] = [(where, m.NameCreate(name, lb, sec))]
    progs = _words(table.get("prog", []), f"{where} prog")
    args = _arg_lists(table.get("args", []), f"{where} args")
    for i, prog in enumerate(progs):
        found = shutil.which(prog)
        if found is None:  # irmd.conf binds by path: a program not installed here runs nowhere
            log.warning("%s prog: program %r not found (not executable or not in PATH): not bound", where, prog)
            continue
        prog_args = args[i] if i < len(args) else []
        auto = bool(table.get("auto", i < len(args)))  # as in irmd.conf, args imply auto
        steps.append((where, m.Bind("program", os.path.abspath(found), name, auto, prog_args)))
    return steps


def _ipcp_steps(path: Path, kind: str, name: str, table: Any) -> tuple[list[Step], list[Step]]:
    where = f"{path}: [{kind}.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    options = {ALIASES.get(str(k), str(k)): v for k, v in table.items() if k not in IPCP_KEYS}
    spelled = {ALIASES[str(k)]: str(k) for k in table if str(k) in ALIASES}  # errors name the file's key
    for key, spellings in VALUES.items():
        if isinstance(options.get(key), str):
            options[key] = spellings.get(options[key], options[key])
    if isinstance(options.get("ethertype"), int):
        options["ethertype"] = hex(options["ethertype"])
    autobind = table.get("autobind", False)
    if not isinstance(autobind, bool):
        raise ConfigError(f"{where} autobind: expected true or false")
    enrol = table.get("enrol", table.get("enroll"))
    join = table.get("join")
    if "bootstrap" in table and enrol is not None and join is None:
        log.warning("%s: ignoring bootstrap= beside enrol=, as 0.23 does", where)
        table = {k: v for k, v in table.items() if k != "bootstrap"}
    if sum(k in table for k in ("bootstrap", "join")) + (enrol is not None) > 1:
        raise ConfigError(f"{where}: give one of bootstrap=, enrol= and join=")
    try:
        words = {k: _words(v, f"{where} {spelled.get(k, k)}") for k, v in options.items()}
        conf = bootstrap_conf(kind, words, IPCP_KEYS, spelled)
    except OptionError as e:
        raise ConfigError(f"{where}: {e}") from None
    steps: list[Step] = []
    if enrol is not None:
        steps.append((where, m.IpcpEnroll(name, "", str(enrol), kind, autobind, conf.get("key", ""))))
    elif join is not None:
        steps.append(
            (
                where,
                _Join(
                    m.IpcpEnroll(name, "", str(join), kind, autobind, conf.get("key", "")),
                    m.IpcpBootstrap(name, str(join), kind, autobind, conf),
                ),
            )
        )
    elif "bootstrap" in table:
        steps.append((where, m.IpcpBootstrap(name, str(table["bootstrap"]), kind, autobind, conf)))
    else:
        steps.append((where, m.IpcpCreate(name, kind)))
    if "conn" in table and enrol is None and join is None and "bootstrap" not in table:
        raise ConfigError(f"{where} conn: an IPCP connects once it is in a layer: add bootstrap=, enrol= or join=")
    steps += [(where, m.IpcpConnect(name, dst)) for dst in _words(table.get("conn", []), f"{where} conn")]
    regs: list[Step] = [
        (where, m.NameRegister(n, [], True, [name])) for n in _words(table.get("reg", []), f"{where} reg")
    ]
    return steps, regs


class _Join(Message):
    """Enroll into a layer through whichever member answers to its name; none within
    JOIN_PATIENCE: bootstrap it. So one file serves the first host, and it when it reboots."""

    def __init__(self, enroll: m.IpcpEnroll, bootstrap: m.IpcpBootstrap) -> None:
        self.enroll, self.bootstrap = enroll, bootstrap


async def _join(irmd: Irmd, msg: _Join, where: str) -> None:
    try:
        await _admin(irmd, msg.enroll, where, JOIN_PATIENCE, JOIN_TRIES)
        log.info("%s: joined layer %s through a member", where, msg.enroll.dst)
    except NotFound:
        log.info("%s: no member of layer %s answered: bootstrapping it", where, msg.enroll.dst)
        await irmd.admin(msg.bootstrap)


async def _admin(irmd: Irmd, msg: Message, where: str, patience: float = ENROL_PATIENCE, tries: int = 1) -> None:
    """One step; an enrollment waits for a member to answer, as hosts of a LAN boot in any order."""
    if isinstance(msg, _Join):
        await _join(irmd, msg, where)
        return
    if isinstance(msg, m.IpcpEnroll) and msg.name not in irmd.reg.ipcps:  # one IPCP for all the tries
        await irmd.admin(m.IpcpCreate(msg.name, msg.type or "unicast"))
    deadline = time.monotonic() + patience
    waited = False
    while True:
        tries -= 1
        try:
            await irmd.admin(msg)
            return
        except NotFound as e:  # no member answers yet: LAN hosts boot in any order
            if not isinstance(msg, m.IpcpEnroll) or (time.monotonic() > deadline and tries <= 0):
                raise
            # Expected while the hosts of a LAN boot: said once, then only when debugging.
            log.log(
                logging.DEBUG if waited else logging.INFO,
                "%s: %s; trying again every %.0f s for up to %.0f s",
                where,
                e,
                ENROL_RETRY,
                patience,
            )
            waited = True
        await asyncio.sleep(ENROL_RETRY)


async def apply_config(irmd: Irmd, steps: list[Step], path: Path) -> None:
    """Carry out planned steps in order; the first failure raises ConfigError."""
    for where, msg in steps:
        if isinstance(msg, m.NameRegister):
            ipcp = irmd.reg.ipcps.get(msg.ipcps[0])
            if ipcp is None or not ipcp.layer:
                raise ConfigError(f"{where} reg: ipcp {msg.ipcps[0]!r} is in no layer to register {msg.name!r} in")
        try:
            await _admin(irmd, msg, where)
        except FlowError as e:
            if isinstance(e, AlreadyExists) and isinstance(msg, m.NameCreate):
                continue  # [name.N] for a name a reg= or bind made already
            raise ConfigError(f"{where}: {e}") from None
        log.info("%s: %s done", where, type(msg).__name__)
    log.info("config %s applied", path)
