"""The options each IPCP type takes at bootstrap, declared once: irm, config files and the
IPCPs check them against this schema (keyword -> value check)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping

from proto.names import HASHES


class OptionError(ValueError):
    """A command line, option or value that does not follow the grammar."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean "X"?` for the choice closest to a mistyped word, or nothing when none is close."""
    import difflib  # here: only a mistyped word needs it

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f'; did you mean "{close[0]}"?' if close else ""


def choice(*options: str) -> Callable[[str, str], str]:
    def check(key: str, value: str) -> str:
        if value not in options:
            raise OptionError(
                f'bad {key} "{value}": expected one of {{{" ".join(options)}}}' + did_you_mean(value, options)
            )
        return value

    return check


def _int(lo: int, hi: int) -> Callable[[str, str], str]:
    def check(key: str, value: str) -> str:
        try:
            n = int(value, 0)
        except ValueError:
            raise OptionError(f'bad {key} "{value}": expected a number from {lo} to {hi}') from None
        if not lo <= n <= hi:
            raise OptionError(f'bad {key} "{value}": expected a number from {lo} to {hi}')
        return str(n)

    return check


def _ethertype(key: str, value: str) -> str:
    try:
        n = int(value, 16)
    except ValueError:
        n = -1
    if not 0x0600 <= n <= 0xFFFE:
        raise OptionError(f'bad ethertype "{value}": expected hex 0x0600-0xFFFE (recommended 0xA000-0xEFFF)')
    return hex(n)


def _ip(version: int, any_ok: bool = True) -> Callable[[str, str], str]:
    """An IPv4/6 address; unless `any_ok`, not the unspecified one (0.0.0.0, ::), which names no host:
    0.23's irm refuses it for a udp IPCP's own address in these words."""

    def check(key: str, value: str) -> str:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            addr = None
        if addr is None or addr.version != version:
            raise OptionError(f'bad {key} "{value}": expected an IPv{version} address')
        if addr.is_unspecified and not any_ok:
            raise OptionError(f'Cannot use IPv{version} address: "{value}".')
        return str(addr)

    return check


def text(key: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise OptionError(f'bad {key} "{value}": expected a word without spaces')
    return value


# Bootstrap options per IPCP type: keyword -> value check. Ranges are Ouroboros 0.23's (ipcp.h,
# configfile.c), with upper bounds where it has none.
TYPE_OPTIONS: dict[str, dict[str, Callable[[str, str], str]]] = {
    "local": {"hash": choice(*HASHES)},
    "broadcast": {"hash": choice(*HASHES)},  # the hash of the layer name that flow_join looks for
    # udp: `hash` and `dns` as Ouroboros takes them (a udp layer hashes with MD5 all the same, and
    # resolves without DDNS); `peer`, `members` and `impair` are ours.
    "udp4": {"ip": _ip(4, False), "port": _int(1, 65535), "dns": _ip(4), "hash": choice(*HASHES), "peer": _ip(4, False),
             "members": _int(1, 65536), "impair": text},
    "udp6": {"ip": _ip(6, False), "port": _int(1, 65535), "dns": _ip(6), "hash": choice(*HASHES), "peer": _ip(6, False),
             "members": _int(1, 65536), "impair": text},
    "eth-dix": {"dev": text, "ethertype": _ethertype, "hash": choice(*HASHES), "impair": text},
    "eth-llc": {"dev": text, "hash": choice(*HASHES), "impair": text},
    "unicast": {
        "addr": choice("1", "2", "4", "8"), "eid": _int(8, 8), "ttl": _int(1, 255),
        "routing": choice("link_state", "lfa", "ecmp"), "congestion": choice("none", "mb-ecn"),
        "hash": choice(*HASHES), "directory": choice("DHT"), "addr_auth": choice("flat"),
        "key": text,
        # link state (seconds): pff recalculation, LSU refresh, LSU/link timeout (which must exceed
        # the refresh: 0.23 checks only that each is at least 1)
        "ls_t_recalc": _int(1, 3600), "ls_t_update": _int(1, 3600), "ls_t_timeo": _int(2, 86400),
        # the DHT directory: lookup parallelism, replicas, entry expiry, refresh, replication (s)
        "dht_alpha": _int(1, 10), "dht_k": _int(1, 20), "dht_t_expire": _int(10, 86400),
        "dht_t_refresh": _int(3, 3600), "dht_t_replicate": _int(3, 3600),
    },
}  # fmt: skip
# What an IPCP takes when an option is not given (ours: congestion none, where Ouroboros has mb-ecn).
DEFAULTS: dict[str, dict[str, str]] = {
    "local": {"hash": "SHA3_256"},
    "udp4": {"port": "3435", "members": "1024"},
    "udp6": {"port": "3435", "members": "1024"},
    "eth-dix": {"ethertype": "0xa000", "hash": "SHA3_256"},
    "eth-llc": {"hash": "SHA3_256"},
    "unicast": {
        "addr": "4", "eid": "8", "ttl": "60", "routing": "link_state", "congestion": "none",
        "hash": "SHA3_256", "directory": "DHT", "addr_auth": "flat",
        "ls_t_recalc": "4", "ls_t_update": "15", "ls_t_timeo": "60",
        "dht_alpha": "3", "dht_k": "8", "dht_t_expire": "86400", "dht_t_refresh": "900", "dht_t_replicate": "900",
    },
}  # fmt: skip
MULTI = {"peer"}  # options that may repeat


def bootstrap_conf(
    kind: str, options: dict[str, list[str]], also: Iterable[str] = (), spelled: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Check type options (as words or config values) and flatten them for the IPCP; `also` are the
    other keys the caller takes (a near miss of one of them is suggested too); `spelled` how the caller
    wrote a key (an irmd.conf's addr_size for addr), so that an error names what the user wrote."""
    conf: dict[str, str] = {}
    for key, vals in options.items():
        said = (spelled or {}).get(key, key)
        if kind and key not in TYPE_OPTIONS[kind]:
            known = [*TYPE_OPTIONS[kind], *also]
            if key not in (o for opts in TYPE_OPTIONS.values() for o in opts) and (hint := did_you_mean(key, known)):
                raise OptionError(f'unknown key "{said}"{hint}')
            raise OptionError(
                f'"{said}" does not apply to type {kind}: expected one of '
                f"{{{' '.join(TYPE_OPTIONS[kind]) or 'no options'}}}" + did_you_mean(key, known)
            )
        check = next(opts[key] for t, opts in TYPE_OPTIONS.items() if key in opts and t in (kind or t))
        if len(vals) > 1 and key not in MULTI:
            raise OptionError(f'"{said}" given {len(vals)} times: expected once')
        conf[key] = ",".join(check(said, v) for v in vals)
    if kind in ("udp4", "udp6") and "ip" not in conf:
        raise OptionError(f'missing "ip <address>" for type {kind}')
    if kind in ("eth-dix", "eth-llc") and "dev" not in conf:
        raise OptionError(f'missing "dev <interface>" for type {kind}')
    return conf
