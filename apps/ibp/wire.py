"""The IBP v1.4 text protocol, defined once: command codes, status codes, requests and replies.

Each request is one line `version command args... timeout\\n`; each reply starts with a status line.
"""

from __future__ import annotations

import dataclasses
import re

from transports.records import FrozenRecord, frozen_record

DEFAULT_PORT = 6714  # a depot's TCP port, as the LoCI depot's

# Versions. IBPv031, the older protocol (IBP 1.x clients, LoRS of that era), differs only in ALLOCATE and
# STATUS, which name no resource, and in ST_INQ's reply; any other version is -27, as the LoCI depot has it.
IBPv031 = 0
IBPv040 = 1
VERSIONS = (IBPv031, IBPv040)

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
IBP_ALIAS_ALLOCATE = 14  # 14-19 (but 17) and 22-36: L-Store's, not served here (-25)
IBP_ALIAS_MANAGE = 15
IBP_RENAME = 16
IBP_PHOEBUS_SEND = 17  # a SEND through Phoebus gateways: refused after its checks (-22), as without Phoebus
IBP_SPLIT_ALLOCATE = 18
IBP_MERGE_ALLOCATE = 19
IBP_PUSH = 20  # L-Store's depot-to-depot copies: PUSH sends local bytes, PULL fetches remote ones
IBP_PULL = 21
IBP_PUSH_CHKSUM = 22
IBP_WRITE_CHKSUM = 27  # 27, 28, 33 and 34 carry data behind their line, as STORE and WRITE do
IBP_STORE_CHKSUM = 28
IBP_VEC_WRITE = 33  # what L-Store's client sends for writes to one capability it coalesced
IBP_VEC_WRITE_CHKSUM = 34
IBP_VEC_READ_CHKSUM = 36
# L-Store's depot's private commands (ibp_server.h INTERNAL_*, 90-99): its admin tools get_config,
# get_corrupt, ibp_rescan, ibp_rid_mode ... send them, and its default ACL ("open") lets anyone in.
INTERNAL_RID_SET_MODE = 90
INTERNAL_GET_ALLOC = 99
# Commands L-Store's depot has and ours does not serve: -25. Any other number is -43, as L-Store's
# read_command answers a command without a handler.
UNSERVED = (
    (frozenset(range(IBP_ALIAS_ALLOCATE, IBP_PUSH)) - {IBP_PHOEBUS_SEND})
    | frozenset(range(IBP_PUSH_CHKSUM, IBP_VEC_READ_CHKSUM + 1))
    | frozenset(range(INTERNAL_RID_SET_MODE, INTERNAL_GET_ALLOC + 1))
)
# Commands whose client sends bytes right behind the line without waiting for a reply (L-Store's
# write_send): once such a line is refused, nothing more on the connection can be read as requests.
CARRIES_DATA = frozenset(
    (IBP_STORE, IBP_WRITE, IBP_WRITE_CHKSUM, IBP_STORE_CHKSUM, IBP_VEC_WRITE, IBP_VEC_WRITE_CHKSUM)
)

# PUSH/PULL connection types (L-Store): plain TCP, or through Phoebus gateways (not served).
IBP_TCP = 1
IBP_PHOEBUS = 2

# MANAGE sub-commands.
IBP_PROBE = 40
IBP_INCR = 41
IBP_DECR = 42
IBP_CHNG = 43
IBP_TRUNCATE = 45  # L-Store: a new maximum size, cutting the data back to it

# STATUS sub-commands (ST_VERSION is L-Store's).
IBP_ST_INQ = 1
IBP_ST_CHANGE = 2
IBP_ST_RES = 3
IBP_ST_STATS = 4  # L-Store's depot statistics since a time ("not standard IBP"): not served, -25
IBP_ST_VERSION = 5

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
TYPES = (IBP_BYTEARRAY, IBP_BUFFER, IBP_FIFO, IBP_CIRQ)

# Status codes: the IBP/L-Store table (ibp_protocol.h), -1 to -66.
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
IBP_E_FILE_READ = -15
IBP_E_FILE_WRITE = -16
IBP_E_FILE_ACCESS = -17
IBP_E_FILE_SEEK_ERROR = -18
IBP_E_WOULD_EXCEED_LIMIT = -19
IBP_E_WOULD_DAMAGE_DATA = -20
IBP_E_BAD_FORMAT = -21
IBP_E_TYPE_NOT_SUPPORTED = -22
IBP_E_RSRC_UNAVAIL = -23
IBP_E_INTERNAL = -24
IBP_E_INVALID_CMD = -25
IBP_E_WOULD_BLOCK = -26
IBP_E_PROT_VERS = -27
IBP_E_LONG_DURATION = -28
IBP_E_WRONG_PASSWD = -29
IBP_E_INVALID_PARAMETER = -30
IBP_E_INV_PAR_HOST = -31
IBP_E_INV_PAR_PORT = -32
IBP_E_INV_PAR_ATDR = -33
IBP_E_INV_PAR_ATRL = -34
IBP_E_INV_PAR_ATTP = -35
IBP_E_INV_PAR_SIZE = -36
IBP_E_INV_PAR_PTR = -37
IBP_E_ALLOC_FAILED = -38
IBP_E_TOO_MANY_UNITS = -39
IBP_E_SET_SOCK_ATTR = -40
IBP_E_GET_SOCK_ATTR = -41
IBP_E_CLIENT_TIMEOUT = -42
IBP_E_UNKNOWN_FUNCTION = -43
IBP_E_INV_IP_ADDR = -44
IBP_E_WOULD_EXCEED_POLICY = -45
IBP_E_SERVER_TIMEOUT = -46
IBP_E_SERVER_RECOVERING = -47
IBP_E_CAP_DELETING = -48
IBP_E_UNKNOWN_RS = -49
IBP_E_INVALID_RID = -50
IBP_E_NFU_UNKNOWN = -51
IBP_E_NFU_DUP_PARA = -52
IBP_E_QUEUE_FULL = -53
IBP_E_CRT_AUTH_FAIL = -54
IBP_E_INVALID_CERT_FILE = -55
IBP_E_INVALID_PRIVATE_KEY_PASSWD = -56
IBP_E_INVALID_PRIVATE_KEY_FILE = -57
IBP_AUTHENTICATION_REQ = -58
IBP_E_AUTHEN_NOT_SUPPORT = -59
IBP_E_AUTHENTICATION_FAILED = -60
IBP_E_INVALID_HOST = -61
IBP_E_CANT_CONNECT = -62
IBP_E_CHKSUM = -63
IBP_E_CHKSUM_TYPE = -64
IBP_E_CHKSUM_BLOCKSIZE = -65
IBP_E_OUT_OF_SOCKETS = -66  # "retry after N s": the depot turned the connection away

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
    IBP_E_FILE_READ: "file read error",
    IBP_E_FILE_WRITE: "file write error",
    IBP_E_FILE_ACCESS: "file access error",
    IBP_E_FILE_SEEK_ERROR: "file seek error",
    IBP_E_WOULD_EXCEED_LIMIT: "would exceed limit",
    IBP_E_WOULD_DAMAGE_DATA: "would damage data",
    IBP_E_BAD_FORMAT: "bad format",
    IBP_E_TYPE_NOT_SUPPORTED: "type not supported",
    IBP_E_RSRC_UNAVAIL: "resource unavailable",
    IBP_E_INTERNAL: "internal error",
    IBP_E_INVALID_CMD: "invalid command",
    IBP_E_WOULD_BLOCK: "would block",
    IBP_E_PROT_VERS: "protocol version not supported",
    IBP_E_LONG_DURATION: "duration too long",
    IBP_E_WRONG_PASSWD: "wrong password",
    IBP_E_INVALID_PARAMETER: "invalid parameter",
    IBP_E_INV_PAR_HOST: "invalid host",
    IBP_E_INV_PAR_PORT: "invalid port",
    IBP_E_INV_PAR_ATDR: "invalid duration attribute",
    IBP_E_INV_PAR_ATRL: "invalid reliability attribute",
    IBP_E_INV_PAR_ATTP: "invalid type attribute",
    IBP_E_INV_PAR_SIZE: "invalid size",
    IBP_E_INV_PAR_PTR: "invalid pointer",
    IBP_E_ALLOC_FAILED: "allocation failed",
    IBP_E_TOO_MANY_UNITS: "too many units",
    IBP_E_SET_SOCK_ATTR: "cannot set socket attribute",
    IBP_E_GET_SOCK_ATTR: "cannot get socket attribute",
    IBP_E_CLIENT_TIMEOUT: "client timeout",
    IBP_E_UNKNOWN_FUNCTION: "unknown function",
    IBP_E_INV_IP_ADDR: "invalid IP address",
    IBP_E_WOULD_EXCEED_POLICY: "would exceed policy",
    IBP_E_SERVER_TIMEOUT: "server timeout",
    IBP_E_SERVER_RECOVERING: "server recovering",
    IBP_E_CAP_DELETING: "capability being deleted",
    IBP_E_UNKNOWN_RS: "unknown resource",
    IBP_E_INVALID_RID: "invalid resource id",
    IBP_E_NFU_UNKNOWN: "unknown NFU operation",
    IBP_E_NFU_DUP_PARA: "duplicate NFU parameter",
    IBP_E_QUEUE_FULL: "queue full",
    IBP_E_CRT_AUTH_FAIL: "certificate authentication failed",
    IBP_E_INVALID_CERT_FILE: "invalid certificate file",
    IBP_E_INVALID_PRIVATE_KEY_PASSWD: "invalid private key password",
    IBP_E_INVALID_PRIVATE_KEY_FILE: "invalid private key file",
    IBP_AUTHENTICATION_REQ: "authentication required",
    IBP_E_AUTHEN_NOT_SUPPORT: "authentication not supported",
    IBP_E_AUTHENTICATION_FAILED: "authentication failed",
    IBP_E_INVALID_HOST: "invalid host",
    IBP_E_CANT_CONNECT: "cannot connect",
    IBP_E_CHKSUM: "checksum error",
    IBP_E_CHKSUM_TYPE: "unknown checksum type",
    IBP_E_CHKSUM_BLOCKSIZE: "bad checksum block size",
    IBP_E_OUT_OF_SOCKETS: "out of sockets, retry later",
}

# Limits on what we accept.
MAX_LINE = 4096  # one request or reply line, newline included
MAX_TOKEN = 1024  # a capability string
MAX_KEY = 128  # an allocation or right key
MAX_RID = 64  # a resource id
MAX_TARGETS = 16  # MCOPY destinations
MAX_INT = 2**63 - 1  # sizes, offsets, timeouts
FOREVER = -1  # ALLOCATE's duration -1: as long as the depot allows (L-Store)
KEEP = -1  # CHNG's size, duration or reliability -1: leave it as it is (L-Store)
DEFAULT_PASSWORD = "IBPch@ngem3"  # ST_INQ's password, L-Store's default (ibp_server.h)

# A key's characters: ours are hex; L-Store's are base64 with '-' for '/' (db_resource.c), so '+'
# (and base64's '=') too. None of them is a separator of a capability or a request line.
KEY_CHARS = r"A-Za-z0-9_.+=\-"
_KEY_RE = re.compile(rf"(?:(?P<rid>[A-Za-z0-9_.\-]{{1,{MAX_RID}}})#)?(?P<key>[{KEY_CHARS}]{{1,{MAX_KEY}}})")
_WORD_RE = re.compile(rf"[A-Za-z0-9_.\-]{{1,{MAX_KEY}}}")
_TYPEKEY_RE = re.compile(rf"[{KEY_CHARS}]{{1,{MAX_KEY}}}")
_TOKEN_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_TOKEN}}}")
_PASSWORD_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_KEY}}}")  # any printable word: L-Store's default has an @
_UNPRINTABLE = re.compile(r"[^\x21-\x7e]+")


class BadRequest(ValueError):
    """A request line we cannot accept; `status` is the IBP error to reply with. `closes`: the
    connection ends with the refusal, as what the client sends behind the line cannot be read."""

    def __init__(self, status: int, reason: str, closes: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.closes = closes


class IbpError(Exception):
    """A refused or failed operation: the IBP status and a reason for humans."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{reason} ({status_text(status)}, {status})")
        self.status = status
        self.reason = reason


# Keys travel as `RID#key` (L-Store's parse_key splits them) or bare; `rid` "" is "this depot's".


@frozen_record
class Allocate(FrozenRecord):
    """`rid` "": none named (IBPv031's form): the depot's own, as L-Store's depot picks one."""

    rid: str
    reliability: int
    type: int
    duration: int  # seconds; FOREVER: the depot's maximum
    size: int
    timeout: int


@frozen_record
class Store(FrozenRecord):
    """Append `length` bytes, sent after (or, as L-Store clients do, right behind) the request."""

    key: str
    typekey: str
    length: int
    timeout: int
    rid: str = ""


@frozen_record
class Write(FrozenRecord):
    """Write `length` bytes at `offset`, sent after the request; past the end leaves a hole of zeros."""

    key: str
    typekey: str
    offset: int
    length: int
    timeout: int
    rid: str = ""


@frozen_record
class Load(FrozenRecord):
    """Read `length` (at least 1, as L-Store) bytes at `offset`."""

    key: str
    typekey: str
    offset: int
    length: int
    timeout: int
    rid: str = ""


@frozen_record
class Send(FrozenRecord):
    """Depot-to-depot copy: the depot appends the bytes to `dest_cap` itself. `path`: through these
    Phoebus gateways (L-Store's PHOEBUS_SEND; "auto" its default path), None: directly."""

    key: str
    typekey: str
    dest_cap: str
    offset: int
    length: int
    timeout: int
    dest_timeout: int
    dest_client_timeout: int
    rid: str = ""
    path: str | None = None


@frozen_record
class Transfer(FrozenRecord):
    """L-Store's PUSH (our bytes to the remote write capability `remote_cap`) or PULL (the remote
    read capability's bytes into ours). An offset None appends: PUSH's remote one, PULL's local one."""

    pull: bool
    key: str
    typekey: str
    remote_cap: str
    offset: int | None
    remote_offset: int | None
    length: int
    timeout: int
    dest_timeout: int
    dest_client_timeout: int
    rid: str = ""
    path: str | None = None  # Phoebus gateways (connection type 2), as Send's


@frozen_record
class Mcopy(FrozenRecord):
    """One source, several destinations (our simplified MCOPY, see docs/ibp.md)."""

    key: str
    typekey: str
    offset: int
    length: int
    dest_caps: tuple[str, ...]
    timeout: int
    rid: str = ""


@frozen_record
class Manage(FrozenRecord):
    """IBP_MANAGE with the manage capability's key: PROBE, INCR or DECR a reference count, or CHNG
    the allocation's size, duration and reliability."""

    key: str
    typekey: str
    subcmd: int
    captype: int
    timeout: int
    size: int = KEEP  # CHNG: new maximum size, KEEP keeps it; TRUNCATE: the new maximum size
    duration: int = KEEP  # CHNG only: new duration from now, KEEP keeps it
    reliability: int = KEEP  # CHNG only
    rid: str = ""


@frozen_record
class Status(FrozenRecord):
    """IBP_STATUS of the resource `rid`, with the depot's password: ST_INQ asks, ST_CHANGE sets its
    limits, ST_RES names its resources, ST_VERSION describes the depot."""

    rid: str
    subcmd: int
    password: str
    timeout: int
    capacity: int = 0  # ST_CHANGE in one line (ours)
    max_duration: int = 0  # ST_CHANGE in one line (ours)
    follows: bool = False  # ST_CHANGE as IBP sends it: `max_hard max_soft max_duration` on the next line
    version: int = IBPv040  # IBPv031's has no RID, and its ST_INQ another reply


Request = Allocate | Store | Write | Load | Send | Transfer | Mcopy | Manage | Status
KeyedRequest = Store | Write | Load | Send | Transfer | Mcopy | Manage


def _int(tok: str, what: str, lo: int = 0, hi: int = MAX_INT) -> int:
    if not tok or len(tok) > 20 or not (tok.isascii() and (tok.isdigit() or (tok[0] == "-" and tok[1:].isdigit()))):
        raise BadRequest(IBP_E_BAD_FORMAT, f"{what}: expected an integer, got {reason_fields(tok[:24])!r}")
    value = int(tok)
    if not lo <= value <= hi:
        raise BadRequest(IBP_E_INVALID_PARAMETER, f"{what} {value} out of range [{lo}, {hi}]")
    return value


# L-Store's depot reads its numbers with sscanf: %llu for sizes and lengths, a signed 64-bit one for
# offsets. glibc's scanf saturates a number too large for its type (ERANGE) and %llu reads a negative
# one modulo 2**64, so a huge or negative size is simply more than any depot holds (-19, once the
# capability is checked), never a malformed request. A field that is no number at all stays 0 there:
# where 0 is refused we give that refusal (`zero`); where L-Store would go on with 0 (an offset) we
# refuse the line as malformed (-21) rather than act on a number the client never sent.
U64_MAX = 2**64 - 1
I64_MIN = -(2**63)


def _digits(tok: str) -> int | None:
    """The value of an optionally signed decimal token of any length, or None if it is not one."""
    body = tok[1:] if tok[:1] == "-" else tok
    if not body or not (body.isascii() and body.isdigit()):
        return None
    body = body.lstrip("0") or "0"
    value = U64_MAX + 1 if len(body) > 20 else int(body)  # past any 64-bit number: saturates alike
    return -value if tok[:1] == "-" else value


def _u64(tok: str, what: str, zero: int = IBP_E_BAD_FORMAT) -> int:
    """A size or length as L-Store's %llu reads it: negative ones modulo 2**64, huge ones U64_MAX;
    not a number: the `zero` refusal (0's)."""
    value = _digits(tok)
    if value is None:
        raise BadRequest(zero, f"{what}: expected an integer, got {reason_fields(tok[:24])!r}")
    if value < 0:
        return U64_MAX + 1 + value if -value <= U64_MAX else U64_MAX
    return min(value, U64_MAX)


def _i64(tok: str, what: str, zero: int = IBP_E_BAD_FORMAT) -> int:
    """An offset or duration as a signed 64-bit scanf reads it: saturated at both ends."""
    value = _digits(tok)
    if value is None:
        raise BadRequest(zero, f"{what}: expected an integer, got {reason_fields(tok[:24])!r}")
    return max(I64_MIN, min(value, MAX_INT))


def _key(tok: str, what: str) -> tuple[str, str]:
    """(rid, key) of `RID#key` or a bare key (rid "")."""
    m = _KEY_RE.fullmatch(tok)
    if m is None:
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, f"malformed {what}")
    return m["rid"] or "", m["key"]


def _word(tok: str, what: str) -> str:
    if not _WORD_RE.fullmatch(tok):
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, f"malformed {what}")
    return tok


def _typekey(tok: str) -> str:
    if not _TYPEKEY_RE.fullmatch(tok):
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, "malformed typekey")
    return tok


def _cap(tok: str) -> str:
    if not (tok.startswith("ibp://") and _TOKEN_RE.fullmatch(tok)):
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, "malformed capability")
    return tok


def _want(args: list[str], n: int, form: str) -> None:
    if len(args) != n:
        raise BadRequest(IBP_E_BAD_FORMAT, f"expected {form}")


def _timeout(tok: str) -> int:
    return _int(tok, "timeout")


def _length(tok: str) -> int:
    """A transfer's length: at least 1, as L-Store's depot has it (read_read, read_write: -36); read
    unsigned, so a negative or huge one goes past any allocation (-19 at the depot)."""
    n = _u64(tok, "length", IBP_E_INV_PAR_SIZE)
    if n < 1:
        raise BadRequest(IBP_E_INV_PAR_SIZE, "length must be at least 1")
    return n


def _duration(tok: str) -> int:
    """An allocation's duration: seconds, or -1 (FOREVER: the longest allowed); 0 or no number is
    -30 as in L-Store's read_allocate, one past any depot's maximum its -28 at the depot."""
    n = _i64(tok, "duration", IBP_E_INVALID_PARAMETER)
    if n < FOREVER:
        raise BadRequest(IBP_E_INVALID_PARAMETER, f"duration {n} (-1: the longest allowed)")
    return n


def _remote_timeout(tok: str, what: str) -> int:
    """A copy's timeout towards the target depot: 0 is refused, as L-Store's read_read does."""
    n = _int(tok, what)
    if n == 0:
        raise BadRequest(IBP_E_INVALID_PARAMETER, f"{what} must be positive")
    return n


def _append_or(tok: str, what: str) -> int | None:
    """An offset where a negative one (L-Store sends -1) means append: None."""
    n = _i64(tok, what)
    return None if n < 0 else n


def parse_request(line: bytes) -> Request:
    """One request line (with or without its newline) -> a Request, or BadRequest; one that `closes`
    the connection where the client may have sent more than requests behind the line."""
    try:
        return _parse(line)
    except BadRequest as e:
        if _carries_data(line):
            e.closes = True
        raise


def _parse(line: bytes) -> Request:
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
    if version not in VERSIONS:
        raise BadRequest(IBP_E_PROT_VERS, f"protocol version {version} not supported (want {IBPv031} or {IBPv040})")
    cmd = _int(toks[1], "command", -MAX_INT, MAX_INT)
    a = toks[2:]
    if cmd == IBP_ALLOCATE:
        if version == IBPv031:  # no RID: L-Store's read_allocate takes the first field as the reliability
            _want(a, 5, "ALLOCATE reliability type duration size timeout (IBPv031)")
            a = ["", *a]
        else:
            _want(a, 6, "ALLOCATE rid reliability type duration size timeout")
        return Allocate(
            "" if version == IBPv031 else _word(a[0], "rid"),
            _int(a[1], "reliability", -MAX_INT, MAX_INT),
            _int(a[2], "type", -MAX_INT, MAX_INT),
            _duration(a[3]),
            _u64(a[4], "size", IBP_E_INVALID_PARAMETER),  # read unsigned: huge or negative, the depot's -19
            _timeout(a[5]),
        )
    if cmd in (IBP_STORE, IBP_WRITE, IBP_LOAD):
        return _parse_rw(cmd, a)
    if cmd in (IBP_SEND, IBP_PHOEBUS_SEND):
        path = None
        if cmd == IBP_PHOEBUS_SEND:  # L-Store's read_read: the gateways' path first, then SEND's fields
            if not a:
                raise BadRequest(IBP_E_BAD_FORMAT, "expected PHOEBUS_SEND path key destcap typekey ...")
            path, a = _path(a[0]), a[1:]
        _want(a, 8, "SEND key destcap typekey offset length timeout dest_timeout dest_client_timeout")
        # L-Store sends `key destcap typekey`; older clients `key typekey destcap`: the cap tells which.
        dest, typekey = (a[2], a[1]) if a[2].startswith("ibp://") else (a[1], a[2])
        rid, key = _key(a[0], "key")
        return Send(
            key,
            _typekey(typekey),
            _cap(dest),
            _offset(a[3], "offset"),
            _length(a[4]),
            _timeout(a[5]),
            _remote_timeout(a[6], "destination timeout"),
            _remote_timeout(a[7], "destination client timeout"),
            rid,
            path,
        )
    if cmd in (IBP_PUSH, IBP_PULL):
        return _parse_transfer(cmd == IBP_PULL, a)
    if cmd == IBP_MCOPY:
        if len(a) < 5:
            raise BadRequest(IBP_E_BAD_FORMAT, "expected MCOPY key typekey offset length n cap... timeout")
        n = _int(a[4], "target count", 1, MAX_TARGETS)
        _want(a, 6 + n, "MCOPY key typekey offset length n cap... timeout")
        rid, key = _key(a[0], "key")
        return Mcopy(
            key,
            _typekey(a[1]),
            _offset(a[2], "offset"),
            _u64(a[3], "length"),  # 0: up to the end of the data
            tuple(_cap(c) for c in a[5 : 5 + n]),
            _timeout(a[5 + n]),
            rid,
        )
    if cmd == IBP_MANAGE:
        return _parse_manage(a)
    if cmd == IBP_STATUS:
        return _parse_status(a) if version == IBPv040 else _parse_status_v031(a)
    if cmd in UNSERVED:
        raise BadRequest(IBP_E_INVALID_CMD, f"command {cmd} is not served here")
    raise BadRequest(IBP_E_UNKNOWN_FUNCTION, f"unknown command {cmd}")


def more_follows(req: Request) -> bool:
    """Whether a client may send more than requests right behind `req`, unasked: a STORE's or
    WRITE's data (L-Store's clients do), ST_CHANGE's limits line (IBP's clients do)."""
    return isinstance(req, (Store, Write)) or (isinstance(req, Status) and req.follows)


def _carries_data(line: bytes) -> bool:
    """Whether `line` is a request that carries data (STORE, WRITE, or one of L-Store's vectored or
    checksummed writes, which we refuse), parsed or not: bytes may follow it unasked (L-Store's
    clients send the data right behind the line), so after refusing it nothing more can be read."""
    toks = line.split(maxsplit=2)
    return len(toks) >= 2 and toks[1].isdigit() and len(toks[1]) <= 20 and int(toks[1]) in CARRIES_DATA


def _parse_transfer(pull: bool, a: list[str]) -> Transfer:
    """PUSH/PULL as L-Store's pushpull_command sends them (its TCP form: an empty path field)."""
    form = "PUSH|PULL ctype key remote_cap typekey offset remote_offset length timeout dest_timeout client_timeout"
    if not a:
        raise BadRequest(IBP_E_BAD_FORMAT, f"expected {form}")
    ctype = _int(a[0], "connection type", -MAX_INT, MAX_INT)
    if ctype not in (IBP_TCP, IBP_PHOEBUS):  # L-Store's read_read
        raise BadRequest(IBP_E_TYPE_NOT_SUPPORTED, f"connection type {ctype} (1 TCP, 2 Phoebus)")
    path = None
    if ctype == IBP_PHOEBUS:  # the gateways' path follows; refused after the checks (the depot's)
        if len(a) < 2:
            raise BadRequest(IBP_E_BAD_FORMAT, f"expected {form}, a Phoebus path after the type")
        path, a = _path(a[1]), [a[0], *a[2:]]
    _want(a, 10, form)
    rid, key = _key(a[1], "key")
    offset: int | None
    remote: int | None
    if pull:  # our bytes may be appended; the remote ones are read from an offset (-1: 0)
        offset, remote = _append_or(a[4], "offset"), max(0, _i64(a[5], "remote offset"))
    else:
        offset, remote = _offset(a[4], "offset"), _append_or(a[5], "remote offset")
    return Transfer(
        pull,
        key,
        _typekey(a[3]),
        _cap(a[2]),
        offset,
        remote,
        _length(a[6]),
        _timeout(a[7]),
        _remote_timeout(a[8], "destination timeout"),
        _remote_timeout(a[9], "destination client timeout"),
        rid,
        path,
    )


def _path(tok: str) -> str:
    """A Phoebus gateways' path (`auto`, or `host/port,...`): only kept, never used here."""
    if not _TOKEN_RE.fullmatch(tok):
        raise BadRequest(IBP_E_BAD_FORMAT, "malformed Phoebus path")
    return tok


def _parse_rw(cmd: int, a: list[str]) -> Store | Write | Load:
    if cmd == IBP_STORE:
        _want(a, 4, "STORE key typekey length timeout")
        rid, key = _key(a[0], "key")
        return Store(key, _typekey(a[1]), _length(a[2]), _timeout(a[3]), rid)
    name = "WRITE" if cmd == IBP_WRITE else "LOAD"
    _want(a, 5, f"{name} key typekey offset length timeout")
    rid, key = _key(a[0], "key")
    if cmd == IBP_WRITE and _i64(a[2], "offset") < 0:  # L-Store's read_write: -18
        raise BadRequest(IBP_E_FILE_SEEK_ERROR, "a WRITE's offset must not be negative")
    kind = Write if cmd == IBP_WRITE else Load
    return kind(key, _typekey(a[1]), _offset(a[2], "offset"), _length(a[3]), _timeout(a[4]), rid)


def _offset(tok: str, what: str) -> int:
    """An offset into an allocation: not negative; a huge one is past any data (-19 at the depot)."""
    n = _i64(tok, what)
    if n < 0:
        raise BadRequest(IBP_E_INVALID_PARAMETER, f"{what} {n} must not be negative")
    return n


def _parse_manage(a: list[str]) -> Manage:
    if len(a) < 3:
        raise BadRequest(IBP_E_BAD_FORMAT, "expected MANAGE key typekey subcmd captype ... timeout")
    rid, key = _key(a[0], "key")
    typekey = _typekey(a[1])
    sub = _int(a[2], "manage sub-command", -MAX_INT, MAX_INT)
    if sub in (IBP_INCR, IBP_DECR) or (sub == IBP_PROBE and len(a) == 5):
        _want(a, 5, "MANAGE key typekey subcmd captype timeout")
        captype = _int(a[3], "captype", -MAX_INT, MAX_INT)
        if sub != IBP_PROBE and captype not in (IBP_READCAP, IBP_WRITECAP, IBP_MANAGECAP):
            raise BadRequest(IBP_E_BAD_FORMAT, f"captype {captype} (want 1 read or 2 write)")
        return Manage(key, typekey, sub, captype, _timeout(a[4]), rid=rid)
    if sub == IBP_TRUNCATE:
        _want(a, 5, "MANAGE key typekey 45 size timeout")
        return Manage(key, typekey, sub, 0, _timeout(a[4]), _u64(a[3], "size"), rid=rid)  # read unsigned
    if sub in (IBP_CHNG, IBP_PROBE):  # PROBE as L-Store sends it: with three unused fields
        _want(a, 8, f"MANAGE key typekey {sub} captype size duration reliability timeout")
        captype = _int(a[3], "captype", -MAX_INT, MAX_INT)  # unused, as in L-Store
        if sub == IBP_PROBE:
            return Manage(key, typekey, sub, captype, _timeout(a[7]), rid=rid)
        size, duration, reliability = _change_fields(a[4], a[5], a[6])
        return Manage(key, typekey, sub, captype, _timeout(a[7]), size, duration, reliability, rid)
    raise BadRequest(IBP_E_BAD_FORMAT, f"unknown MANAGE sub-command {sub}")  # L-Store's read_manage: -21


def _change_fields(size_tok: str, duration_tok: str, reliability_tok: str) -> tuple[int, int, int]:
    """CHNG's size, duration and reliability, checked in the order and with the answers of L-Store's
    read_manage: a negative value keeps the field, a size of 0 is -20, a duration of 0 is -30."""
    size = _i64(size_tok, "size", IBP_E_WOULD_DAMAGE_DATA)
    if size == 0:
        raise BadRequest(IBP_E_WOULD_DAMAGE_DATA, "size 0 (-1 keeps the size)")
    duration = _i64(duration_tok, "duration", IBP_E_INVALID_PARAMETER)
    if duration == 0:
        raise BadRequest(IBP_E_INVALID_PARAMETER, "duration 0 (-1 keeps the duration)")
    reliability = _int(reliability_tok, "reliability", -MAX_INT)
    if reliability >= 0 and reliability not in (IBP_SOFT, IBP_HARD):
        raise BadRequest(IBP_E_BAD_FORMAT, f"reliability {reliability} (want 1 soft or 2 hard)")
    return _keep(size), _keep(duration), _keep(reliability)


def _keep(value: int) -> int:
    """CHNG's negative size, duration or reliability: no change (L-Store sends -1)."""
    return KEEP if value < 0 else value


def _parse_status(a: list[str]) -> Status:
    # As L-Store's read_status: the number of fields tells the forms apart.
    if len(a) == 2:  # STATUS subcmd timeout: ST_RES or ST_VERSION, without a RID
        sub = _int(a[0], "status sub-command", -MAX_INT, MAX_INT)
        _not_stats(sub)
        if sub not in (IBP_ST_RES, IBP_ST_VERSION):
            raise BadRequest(IBP_E_BAD_FORMAT, f"unknown STATUS sub-command {sub}")
        return Status("", sub, "", _timeout(a[1]))
    if len(a) < 4:
        raise BadRequest(IBP_E_BAD_FORMAT, "expected STATUS rid subcmd password ... timeout")
    rid = _word(a[0], "rid")
    sub = _int(a[1], "status sub-command", -MAX_INT, MAX_INT)
    _not_stats(sub)
    password = a[2]
    if not _PASSWORD_RE.fullmatch(password):
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, "malformed password")
    if sub == IBP_ST_INQ:
        _want(a, 4, "STATUS rid 1 password timeout")
        return Status(rid, sub, password, _timeout(a[3]))
    if sub == IBP_ST_CHANGE:
        if len(a) == 4:  # the new limits follow on a line of their own
            return Status(rid, sub, password, _timeout(a[3]), follows=True)
        _want(a, 6, "STATUS rid 2 password capacity max_duration timeout")
        return Status(rid, sub, password, _timeout(a[5]), _int(a[3], "capacity"), _int(a[4], "max_duration", 1))
    raise BadRequest(IBP_E_BAD_FORMAT, f"unknown STATUS sub-command {sub}")  # L-Store's read_status: -21


def _not_stats(sub: int) -> None:
    """ST_STATS is a sub-command L-Store's depot serves (read_status) and ours does not: -25, as its
    commands we do not serve, not the -21 of one no depot knows."""
    if sub == IBP_ST_STATS:
        raise BadRequest(IBP_E_INVALID_CMD, "STATUS ST_STATS (L-Store's depot statistics) is not served here")


def _parse_status_v031(a: list[str]) -> Status:
    """IBPv031's STATUS, as L-Store's read_status takes it: the sub-command first, no RID. Its
    ST_CHANGE is refused and the connection closed there, as L-Store refuses every ST_CHANGE."""
    if not a:
        raise BadRequest(IBP_E_BAD_FORMAT, "expected STATUS subcmd ... timeout")
    sub = _int(a[0], "status sub-command", -MAX_INT, MAX_INT)
    _not_stats(sub)
    if sub in (IBP_ST_RES, IBP_ST_VERSION):
        _want(a, 2, "STATUS subcmd timeout")
        return Status("", sub, "", _timeout(a[1]), version=IBPv031)
    if sub == IBP_ST_CHANGE:  # its limits follow: not to be read as requests
        raise BadRequest(IBP_E_INVALID_CMD, "IBPv031's ST_CHANGE is not served", closes=True)
    if sub != IBP_ST_INQ:
        raise BadRequest(IBP_E_BAD_FORMAT, f"unknown STATUS sub-command {sub}")
    _want(a, 3, "STATUS 1 password timeout")
    if not _PASSWORD_RE.fullmatch(a[1]):
        raise BadRequest(IBP_E_WRONG_CAP_FORMAT, "malformed password")
    return Status("", sub, a[1], _timeout(a[2]), version=IBPv031)


def parse_change(line: bytes, req: Status) -> Status:
    """ST_CHANGE's second line `max_hard max_soft max_duration`: one capacity (hard + soft) here."""
    try:
        toks = line.decode("ascii").split()
    except UnicodeDecodeError:
        raise BadRequest(IBP_E_BAD_FORMAT, "ST_CHANGE limits are not ASCII") from None
    if len(toks) != 3:
        raise BadRequest(IBP_E_BAD_FORMAT, "expected max_hard max_soft max_duration")
    hard, soft = _int(toks[0], "max_hard"), _int(toks[1], "max_soft")
    return dataclasses.replace(
        req, capacity=min(MAX_INT, hard + soft), max_duration=_int(toks[2], "max_duration", 1), follows=False
    )


def _k(rid: str, key: str) -> str:
    return f"{rid}#{key}" if rid else key


def format_request(req: Request) -> bytes:
    """The request line for `req`, newline included (ST_CHANGE's limits on a second line)."""
    v = IBPv040
    f: list[object]
    if isinstance(req, Allocate) and not req.rid:
        f = [IBPv031, IBP_ALLOCATE, req.reliability, req.type, req.duration, req.size, req.timeout]
    elif isinstance(req, Allocate):
        f = [v, IBP_ALLOCATE, req.rid, req.reliability, req.type, req.duration, req.size, req.timeout]
    elif isinstance(req, Store):
        f = [v, IBP_STORE, _k(req.rid, req.key), req.typekey, req.length, req.timeout]
    elif isinstance(req, Write):
        f = [v, IBP_WRITE, _k(req.rid, req.key), req.typekey, req.offset, req.length, req.timeout]
    elif isinstance(req, Load):
        f = [v, IBP_LOAD, _k(req.rid, req.key), req.typekey, req.offset, req.length, req.timeout]
    elif isinstance(req, Send):
        f = [
            v,
            *([IBP_SEND] if req.path is None else [IBP_PHOEBUS_SEND, req.path]),
            _k(req.rid, req.key),
            req.dest_cap,
            req.typekey,
            req.offset,
            req.length,
            req.timeout,
            req.dest_timeout,
            req.dest_client_timeout,
        ]
    elif isinstance(req, Transfer):
        f = [
            v,
            IBP_PULL if req.pull else IBP_PUSH,
            *([IBP_TCP] if req.path is None else [IBP_PHOEBUS, req.path]),
            _k(req.rid, req.key),
            req.remote_cap,
            req.typekey,
            -1 if req.offset is None else req.offset,
            -1 if req.remote_offset is None else req.remote_offset,
            req.length,
            req.timeout,
            req.dest_timeout,
            req.dest_client_timeout,
        ]
    elif isinstance(req, Mcopy):
        f = [
            v,
            IBP_MCOPY,
            _k(req.rid, req.key),
            req.typekey,
            req.offset,
            req.length,
            len(req.dest_caps),
            *req.dest_caps,
            req.timeout,
        ]
    elif isinstance(req, Manage):
        f = [v, IBP_MANAGE, _k(req.rid, req.key), req.typekey, req.subcmd]
        if req.subcmd == IBP_TRUNCATE:
            f.append(req.size)
        else:
            f.append(req.captype)
        if req.subcmd == IBP_CHNG:
            f += [req.size, req.duration, req.reliability]
        elif req.subcmd == IBP_PROBE:  # L-Store's probe_command: its depot skips three fields here
            f += [0, 0, 0]
        f.append(req.timeout)
    elif req.version == IBPv031:
        f = [IBPv031, IBP_STATUS, req.subcmd, *([req.password] if req.subcmd == IBP_ST_INQ else []), req.timeout]
    elif req.subcmd in (IBP_ST_RES, IBP_ST_VERSION):
        f = [v, IBP_STATUS, req.subcmd, req.timeout]
    elif req.subcmd == IBP_ST_CHANGE and req.follows:
        return (
            f"{v} {IBP_STATUS} {req.rid} {req.subcmd} {req.password} {req.timeout}\n"
            f"{req.capacity} 0 {req.max_duration}\n"
        ).encode("ascii")
    elif req.subcmd == IBP_ST_CHANGE:
        f = [v, IBP_STATUS, req.rid, req.subcmd, req.password, req.capacity, req.max_duration, req.timeout]
    else:
        f = [v, IBP_STATUS, req.rid, req.subcmd, req.password, req.timeout]
    return (" ".join(str(x) for x in f) + "\n").encode("ascii")


@frozen_record
class Reply(FrozenRecord):
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


def format_refusal(status: int, reason: str) -> bytes:
    """An error status line with a reason in words, which IBP clients skip (they read the number).

    -66 is followed by the seconds to wait before a retry, as L-Store's clients parse it.
    """
    if status == IBP_E_OUT_OF_SOCKETS:
        return format_reply(status, "1.0", reason_fields(reason))
    return format_reply(status, reason_fields(reason))


def reason_fields(reason: str) -> str:
    """`reason` as printable words only, bounded: safe on a status line and in a log."""
    return _UNPRINTABLE.sub(" ", reason).strip()[:200]


def reply_int(reply: Reply, index: int, what: str) -> int:
    """Field `index` of a reply as a non-negative integer, or IbpError(IBP_E_BAD_FORMAT): a depot's
    reply that says no number where one belongs is a bad reply, as one that does not parse."""
    return _reply_field(reply, index, what, 0)


def reply_status(reply: Reply, index: int) -> int:
    """Field `index` of a reply as an IBP status (MCOPY's per-target results), or IbpError."""
    return _reply_field(reply, index, "status", -MAX_INT)


def _reply_field(reply: Reply, index: int, what: str, lo: int) -> int:
    if index >= len(reply.fields):
        raise IbpError(IBP_E_BAD_FORMAT, f"bad reply: it lacks {what}")
    try:
        return _int(reply.fields[index], what, lo, MAX_INT)
    except BadRequest as e:
        raise IbpError(IBP_E_BAD_FORMAT, f"bad reply: {e.reason}") from None


def status_text(status: int) -> str:
    return STATUS_NAMES.get(status, "unknown status")


def known_error(status: int) -> int:
    """`status` if it is an IBP error we know, else IBP_E_GENERIC (a peer's number is not echoed)."""
    return status if status < 0 and status in STATUS_NAMES else IBP_E_GENERIC


# ST_INQ's reply for v1.4 clients: `1 N` then one line of TAG:value tokens, as L-Store's depot sends
# and its process_inq reads (it stops at RE; our own figures follow RE, where it does not look).

INQ_TAGS = (  # (tag, our name); the order L-Store's depot writes them in
    ("VS", "version"),
    ("DT", "data_mover"),
    ("RID", "rid"),
    ("RT", "resource_type"),
    ("CT", "capacity"),
    ("ST", "served"),
    ("UT", "reserved"),
    ("UH", "hard_reserved"),
    ("SH", "hard_served"),
    ("CH", "hard_capacity"),
    ("AT", "free"),
    ("AH", "hard_free"),
    ("DR", "max_duration"),
)
INQ_END = "RE"
INQ_VERSION = "1.4:1.0"
DM_TCP = 1
RS_DISK = 1
_INQ_NAME = dict(INQ_TAGS)


def format_inq(values: dict[str, object], extras: dict[str, int]) -> bytes:
    """The ST_INQ reply: status line with the byte count, then the tag line."""
    tags = " ".join(f"{tag}:{values[name]}" for tag, name in INQ_TAGS)
    more = "".join(f" {name}:{value}" for name, value in extras.items())
    body = f"{tags} {INQ_END}{more} \n".encode("ascii")
    return format_reply(IBP_OK, len(body)) + body


def format_inq_v031(hard: int, hard_used: int, soft: int, soft_used: int, max_duration: int) -> bytes:
    """IBPv031's ST_INQ reply, as L-Store's and the LoCI depot's handle_status send it: no status
    line, only the hard and soft capacities and what is reserved of each, in MiB, and the maximum
    duration (the LoCI client library reads these five numbers first)."""
    mib = (hard >> 20, hard_used >> 20, soft >> 20, soft_used >> 20)
    return (" ".join(str(x) for x in (*mib, max_duration)) + " \n").encode("ascii")


def parse_inq(line: bytes) -> dict[str, str]:
    """Our names -> values from an ST_INQ tag line (ours or any v1.4 depot's)."""
    out: dict[str, str] = {}
    for tok in line.decode("ascii", "replace").split():
        tag, _, value = tok.partition(":")
        if tag == INQ_END:
            continue
        name = _INQ_NAME.get(tag, tag)
        if _WORD_RE.fullmatch(name) and value:
            out[name] = reason_fields(value)
    return out
