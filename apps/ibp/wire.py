"""The IBP v1.4 text protocol, defined once: command codes, status codes, requests and replies.

Each request is one line `version command args... timeout\\n`; each reply starts with a status line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Versions (IBPv031 is the older protocol; we speak IBPv040 only).
IBPv031 = 0
IBPv040 = 1

# Commands.
IBP_ALLOCATE = 1
IBP_STORE = 2
IBP_DELIVER = 3
IBP_STATUS = 4
IBP_SEND = 5
IBP_MCOPY = 6
IBP_LOAD = 8
IBP_MANAGE = 9
IBP_WRITE = 13

# MANAGE sub-commands.
IBP_PROBE = 40
IBP_INCR = 41
IBP_DECR = 42
IBP_CHNG = 43

# STATUS sub-commands.
IBP_ST_INQ = 1
IBP_ST_CHANGE = 2

# Capability types (MANAGE's captype).
IBP_READCAP = 1
IBP_WRITECAP = 2
IBP_MANAGECAP = 3

# Reliability and storage types.
IBP_SOFT = 1
IBP_HARD = 2
IBP_BYTEARRAY = 1
IBP_BUFFER = 2
IBP_FIFO = 3
IBP_CIRQ = 4

# Status codes.
IBP_OK = 1
IBP_E_GENERIC = -1
IBP_E_SOCK_READ = -2
IBP_E_SOCK_WRITE = -3
IBP_E_CAP_NOT_FOUND = -4
IBP_E_CAP_NOT_WRITE = -5
IBP_E_CAP_NOT_READ = -6
IBP_E_CAP_NOT_MANAGE = -7
IBP_E_INVALID_WRITE_CAP = -8
IBP_E_INVALID_READ_CAP = -9
IBP_E_INVALID_MANAGE_CAP = -10
IBP_E_WRONG_CAP_FORMAT = -11
IBP_E_CAP_ACCESS_DENIED = -12
IBP_E_CONNECTION = -13
IBP_E_FILE_OPEN = -14
IBP_E_FILE_WRITE = -16
IBP_E_WOULD_EXCEED_LIMIT = -19
IBP_E_WOULD_DAMAGE_DATA = -20
IBP_E_BAD_FORMAT = -21
IBP_E_TYPE_NOT_SUPPORTED = -22
IBP_E_RSRC_UNAVAIL = -23
IBP_E_INTERNAL = -24
IBP_E_INVALID_CMD = -25
IBP_E_PROT_VERS = -27
IBP_E_LONG_DURATION = -28
IBP_E_WRONG_PASSWD = -29
IBP_E_INVALID_PARAMETER = -30
IBP_E_INV_PAR_SIZE = -36
IBP_E_CLIENT_TIMEOUT = -42
IBP_E_WOULD_EXCEED_POLICY = -45
IBP_E_SERVER_TIMEOUT = -46
IBP_E_INVALID_RID = -50

STATUS_NAMES = {
    IBP_OK: "ok",
    IBP_E_GENERIC: "generic error",
    IBP_E_SOCK_READ: "socket read error",
    IBP_E_SOCK_WRITE: "socket write error",
    IBP_E_CAP_NOT_FOUND: "capability not found",
    IBP_E_CAP_NOT_WRITE: "not a write capability",
    IBP_E_CAP_NOT_READ: "not a read capability",
    IBP_E_CAP_NOT_MANAGE: "not a manage capability",
    IBP_E_INVALID_WRITE_CAP: "invalid write capability",
    IBP_E_INVALID_READ_CAP: "invalid read capability",
    IBP_E_INVALID_MANAGE_CAP: "invalid manage capability",
    IBP_E_WRONG_CAP_FORMAT: "wrong capability format",
    IBP_E_CAP_ACCESS_DENIED: "capability access denied",
    IBP_E_CONNECTION: "connection error",
    IBP_E_FILE_OPEN: "file open error",
    IBP_E_FILE_WRITE: "file write error",
    IBP_E_WOULD_EXCEED_LIMIT: "would exceed limit",
    IBP_E_WOULD_DAMAGE_DATA: "would damage data",
    IBP_E_BAD_FORMAT: "bad format",
    IBP_E_TYPE_NOT_SUPPORTED: "type not supported",
    IBP_E_RSRC_UNAVAIL: "resource unavailable",
    IBP_E_INTERNAL: "internal error",
    IBP_E_INVALID_CMD: "invalid command",
    IBP_E_PROT_VERS: "protocol version not supported",
    IBP_E_LONG_DURATION: "duration too long",
    IBP_E_WRONG_PASSWD: "wrong password",
    IBP_E_INVALID_PARAMETER: "invalid parameter",
    IBP_E_INV_PAR_SIZE: "invalid size",
    IBP_E_CLIENT_TIMEOUT: "client timeout",
    IBP_E_WOULD_EXCEED_POLICY: "would exceed policy",
    IBP_E_SERVER_TIMEOUT: "server timeout",
    IBP_E_INVALID_RID: "invalid resource id",
}

# Limits on what we accept.
MAX_LINE = 4096          # one request or reply line, newline included
MAX_TOKEN = 1024         # a capability string
MAX_KEY = 128            # an allocation or right key
MAX_TARGETS = 16         # MCOPY destinations
MAX_INT = 2**63 - 1      # sizes and offsets
MAX_TIMEOUT = 86_400     # seconds
MAX_DURATION = 10 * 365 * 86_400

_KEY_RE = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_KEY}}}")
_TOKEN_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN}}}")


class BadRequest(ValueError):
    """A request line we cannot accept; `status` is the IBP error to reply with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class IbpError(Exception):
    """A refused or failed operation: the IBP status and a reason for humans."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{reason} ({status_text(status)}, {status})")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Allocate:
    rid: str
    reliability: int
    type: int
    duration: int
    size: int
    timeout: int


@dataclass(frozen=True)
class Store:
    """Append `length` bytes, sent after the depot's first status line."""

    key: str
    typekey: str
    length: int
    timeout: int


@dataclass(frozen=True)
class Write:
    """Write `length` bytes at `offset` (no holes), sent after the first status line."""

    key: str
    typekey: str
    offset: int
    length: int
    timeout: int


@dataclass(frozen=True)
class Load:
    """Read `length` bytes at `offset`; length 0 means up to the current end (our extension)."""

    key: str
    typekey: str
    offset: int
    length: int
    timeout: int


@dataclass(frozen=True)
class Send:
    """Depot-to-depot copy: the depot stores the bytes into `dest_cap` itself."""

    key: str
    typekey: str
    dest_cap: str
    offset: int
    length: int
    timeout: int
    dest_timeout: int
    dest_client_timeout: int


@dataclass(frozen=True)
class Mcopy:
    """One source, several destinations (our simplified MCOPY, see docs/ibp.md)."""

    key: str
    typekey: str
    offset: int
    length: int
    dest_caps: tuple[str, ...]
    timeout: int


@dataclass(frozen=True)
class Manage:
    key: str
    typekey: str
    subcmd: int
    captype: int
    timeout: int
    size: int = 0         # CHNG only: new maximum size
    duration: int = 0     # CHNG only: new duration from now, seconds
    reliability: int = 0  # CHNG only


@dataclass(frozen=True)
class Status:
    rid: str
    subcmd: int
    password: str
    timeout: int
    capacity: int = 0      # ST_CHANGE only
    max_duration: int = 0  # ST_CHANGE only


Request = Allocate | Store | Write | Load | Send | Mcopy | Manage | Status


def _int(tok: str, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if not tok or len(tok) > 20 or not (tok.isascii() and (tok.isdigit() or (tok[0] == "-" and tok[1:].isdigit()))):
        raise BadRequest(IBP_E_BAD_FORMAT, f"{what}: expected an integer, got {tok[:24]!r}")
    value = int(tok)
    if not lo <= value <= hi:
        raise BadRequest(IBP_E_INVALID_PARAMETER, f"{what} {value} out of range [{lo}, {hi}]")
    return value


def _key(tok: str, what: str) -> str:
    if not _KEY_RE.fullmatch(tok):
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, f"malformed {what}")
    return tok


def _cap(tok: str) -> str:
    if not _TOKEN_RE.fullmatch(tok):
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, "malformed capability")
    return tok


def _want(args: list[str], n: int, form: str) -> None:
    if len(args) != n:
        raise BadRequest(IBP_E_BAD_FORMAT, f"expected {form}")


def parse_request(line: bytes) -> Request:
    """One request line (with or without its newline) -> a Request, or BadRequest."""
    if len(line) > MAX_LINE:
        raise BadRequest(IBP_E_BAD_FORMAT, "request line too long")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(IBP_E_BAD_FORMAT, "request line is not ASCII") from None
    toks = text.split()
    if len(toks) < 2:
        raise BadRequest(IBP_E_BAD_FORMAT, "expected 'version command args... timeout'")
    version = _int(toks[0], "version", -MAX_INT, MAX_INT)
    if version != IBPv040:
        raise BadRequest(IBP_E_PROT_VERS, f"protocol version {version} not supported (want {IBPv040})")
    cmd = _int(toks[1], "command", -MAX_INT, MAX_INT)
    a = toks[2:]
    t = "timeout"
    if cmd == IBP_ALLOCATE:
        _want(a, 6, "ALLOCATE rid reliability type duration size timeout")
        return Allocate(_key(a[0], "rid"), _int(a[1], "reliability", 0, 99), _int(a[2], "type", 0, 99),
                        _int(a[3], "duration", 0, MAX_DURATION), _int(a[4], "size"), _int(a[5], t, 0, MAX_TIMEOUT))
    if cmd == IBP_STORE:
        _want(a, 4, "STORE key typekey length timeout")
        return Store(_key(a[0], "key"), _key(a[1], "typekey"), _int(a[2], "length"), _int(a[3], t, 0, MAX_TIMEOUT))
    if cmd == IBP_WRITE:
        _want(a, 5, "WRITE key typekey offset length timeout")
        return Write(_key(a[0], "key"), _key(a[1], "typekey"), _int(a[2], "offset"), _int(a[3], "length"),
                     _int(a[4], t, 0, MAX_TIMEOUT))
    if cmd == IBP_LOAD:
        _want(a, 5, "LOAD key typekey offset length timeout")
        return Load(_key(a[0], "key"), _key(a[1], "typekey"), _int(a[2], "offset"), _int(a[3], "length"),
                    _int(a[4], t, 0, MAX_TIMEOUT))
    if cmd == IBP_SEND:
        _want(a, 8, "SEND key typekey destcap offset length timeout dest_timeout dest_client_timeout")
        return Send(_key(a[0], "key"), _key(a[1], "typekey"), _cap(a[2]), _int(a[3], "offset"),
                    _int(a[4], "length"), _int(a[5], t, 0, MAX_TIMEOUT), _int(a[6], t, 0, MAX_TIMEOUT),
                    _int(a[7], t, 0, MAX_TIMEOUT))
    if cmd == IBP_MCOPY:
        if len(a) < 5:
            raise BadRequest(IBP_E_BAD_FORMAT, "expected MCOPY key typekey offset length n cap... timeout")
        n = _int(a[4], "target count", 1, MAX_TARGETS)
        _want(a, 6 + n, "MCOPY key typekey offset length n cap... timeout")
        return Mcopy(_key(a[0], "key"), _key(a[1], "typekey"), _int(a[2], "offset"), _int(a[3], "length"),
                     tuple(_cap(c) for c in a[5:5 + n]), _int(a[5 + n], t, 0, MAX_TIMEOUT))
    if cmd == IBP_MANAGE:
        if len(a) < 3:
            raise BadRequest(IBP_E_BAD_FORMAT, "expected MANAGE key typekey subcmd captype ... timeout")
        sub = _int(a[2], "manage sub-command", -MAX_INT, MAX_INT)
        if sub in (IBP_PROBE, IBP_INCR, IBP_DECR):
            _want(a, 5, "MANAGE key typekey subcmd captype timeout")
            return Manage(_key(a[0], "key"), _key(a[1], "typekey"), sub, _int(a[3], "captype", 0, 99),
                          _int(a[4], t, 0, MAX_TIMEOUT))
        if sub == IBP_CHNG:
            _want(a, 8, "MANAGE key typekey 43 captype size duration reliability timeout")
            return Manage(_key(a[0], "key"), _key(a[1], "typekey"), sub, _int(a[3], "captype", 0, 99),
                          _int(a[7], t, 0, MAX_TIMEOUT), _int(a[4], "size"),
                          _int(a[5], "duration", 0, MAX_DURATION), _int(a[6], "reliability", 0, 99))
        raise BadRequest(IBP_E_INVALID_CMD, f"unknown MANAGE sub-command {sub}")
    if cmd == IBP_STATUS:
        if len(a) < 2:
            raise BadRequest(IBP_E_BAD_FORMAT, "expected STATUS rid subcmd password ... timeout")
        sub = _int(a[1], "status sub-command", -MAX_INT, MAX_INT)
        if sub == IBP_ST_INQ:
            _want(a, 4, "STATUS rid 1 password timeout")
            return Status(_key(a[0], "rid"), sub, _key(a[2], "password"), _int(a[3], t, 0, MAX_TIMEOUT))
        if sub == IBP_ST_CHANGE:
            _want(a, 6, "STATUS rid 2 password capacity max_duration timeout")
            return Status(_key(a[0], "rid"), sub, _key(a[2], "password"), _int(a[5], t, 0, MAX_TIMEOUT),
                          _int(a[3], "capacity"), _int(a[4], "max_duration", 1, MAX_DURATION))
        raise BadRequest(IBP_E_INVALID_CMD, f"unknown STATUS sub-command {sub}")
    if cmd == IBP_DELIVER:
        raise BadRequest(IBP_E_INVALID_CMD, "DELIVER is not implemented")
    raise BadRequest(IBP_E_INVALID_CMD, f"unknown command {cmd}")


def format_request(req: Request) -> bytes:
    """The request line for `req`, newline included."""
    v = IBPv040
    if isinstance(req, Allocate):
        f = [v, IBP_ALLOCATE, req.rid, req.reliability, req.type, req.duration, req.size, req.timeout]
    elif isinstance(req, Store):
        f = [v, IBP_STORE, req.key, req.typekey, req.length, req.timeout]
    elif isinstance(req, Write):
        f = [v, IBP_WRITE, req.key, req.typekey, req.offset, req.length, req.timeout]
    elif isinstance(req, Load):
        f = [v, IBP_LOAD, req.key, req.typekey, req.offset, req.length, req.timeout]
    elif isinstance(req, Send):
        f = [v, IBP_SEND, req.key, req.typekey, req.dest_cap, req.offset, req.length, req.timeout,
             req.dest_timeout, req.dest_client_timeout]
    elif isinstance(req, Mcopy):
        f = [v, IBP_MCOPY, req.key, req.typekey, req.offset, req.length, len(req.dest_caps), *req.dest_caps,
             req.timeout]
    elif isinstance(req, Manage):
        if req.subcmd == IBP_CHNG:
            f = [v, IBP_MANAGE, req.key, req.typekey, req.subcmd, req.captype, req.size, req.duration,
                 req.reliability, req.timeout]
        else:
            f = [v, IBP_MANAGE, req.key, req.typekey, req.subcmd, req.captype, req.timeout]
    else:
        if req.subcmd == IBP_ST_CHANGE:
            f = [v, IBP_STATUS, req.rid, req.subcmd, req.password, req.capacity, req.max_duration, req.timeout]
        else:
            f = [v, IBP_STATUS, req.rid, req.subcmd, req.password, req.timeout]
    return (" ".join(str(x) for x in f) + "\n").encode("ascii")


@dataclass(frozen=True)
class Reply:
    """A reply line: the status, then its fields."""

    status: int
    fields: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.status == IBP_OK


def parse_reply(line: bytes) -> Reply:
    if len(line) > MAX_LINE:
        raise BadRequest(IBP_E_BAD_FORMAT, "reply line too long")
    try:
        toks = line.decode("ascii").split()
    except UnicodeDecodeError:
        raise BadRequest(IBP_E_BAD_FORMAT, "reply line is not ASCII") from None
    if not toks:
        raise BadRequest(IBP_E_BAD_FORMAT, "empty reply line")
    return Reply(_int(toks[0], "status", -MAX_INT, MAX_INT), tuple(toks[1:]))


def format_reply(status: int, *fields: object) -> bytes:
    return (" ".join(str(x) for x in (status, *fields)) + "\n").encode("ascii")


def reply_int(reply: Reply, index: int, what: str) -> int:
    """Field `index` of a reply as a non-negative integer, or BadRequest."""
    if index >= len(reply.fields):
        raise BadRequest(IBP_E_BAD_FORMAT, f"reply lacks {what}")
    return _int(reply.fields[index], what)


def reply_status(reply: Reply, index: int) -> int:
    """Field `index` of a reply as an IBP status (MCOPY's per-target results)."""
    if index >= len(reply.fields):
        raise BadRequest(IBP_E_BAD_FORMAT, "reply lacks a status")
    return _int(reply.fields[index], "status", -MAX_INT, MAX_INT)


def status_text(status: int) -> str:
    return STATUS_NAMES.get(status, "unknown status")
