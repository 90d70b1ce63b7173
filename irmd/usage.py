"""irm's usage texts, one per level and command, laid out as Ouroboros 0.23's irm prints them,
with the defaults this stack uses and the options it adds.
"""

from __future__ import annotations

from proto.options import DEFAULTS

HASHES = "{SHA3_224 SHA3_256 SHA3_384 SHA3_512}"
TYPES = "{unicast broadcast local udp4 udp6 eth-llc eth-dix}"
IMPAIR = "        [impair <loss=PCT,dup=PCT,reorder=PCT,rate=MBITS> (tests only, default: none)]\n"
U, D4, D6 = DEFAULTS["unicast"], DEFAULTS["udp4"], DEFAULTS["udp6"]
SECURITY_PATHS = [
    (f"{side[0]}{kind}path", side, file)
    for side in ("server", "client")
    for kind, file in (("enc", "enc.conf"), ("crt", "crt.pem"), ("key", "key.pem"))
]


def _operations(path: str, ops: list[str]) -> str:
    return f"Usage: irm {path} [OPERATION]\n\nwhere OPERATION in {{{' '.join(ops)}}}\n"


BOOTSTRAP = f"""Usage: irm ipcp bootstrap
           name <ipcp name>
           layer <layer name>
           [type [TYPE]]
where TYPE in {TYPES},

if TYPE == unicast
        [addr_auth <ADDRESS_POLICY> (default: {U["addr_auth"]})]
        [directory <DIRECTORY_POLICY> (default: {U["directory"]})]
        [hash [ALGORITHM] (default: {U["hash"]})]
        [routing <ROUTING_POLICY> (default: {U["routing"]})]
        [congestion <CONG_POLICY> (default: {U["congestion"]})]
        [key <layer key> (default: none)]
        [autobind]

where ADDRESS_POLICY in {{flat}}
    DIRECTORY_POLICY in {{DHT}}
    ALGORITHM in {HASHES}
    ROUTING_POLICY in {{link_state lfa ecmp}}
    CONG_POLICY in {{none mb-ecn}}
    [Data Transfer Constants]
        [addr <address size> (default: {U["addr"]})]
        [eid <eid size> (default: {U["eid"]})]
        [ttl <max time-to-live>, default: {U["ttl"]})]

if DIRECTORY_POLICY == DHT
        [dht_alpha <search factor> (default: {U["dht_alpha"]})]
        [dht_k <replication factor> (default: {U["dht_k"]})]
        [dht_t_expire <expiration (s)> (default: {U["dht_t_expire"]})]
        [dht_t_refresh <contact refresh (s)> (default: {U["dht_t_refresh"]})]
        [dht_t_replicate <replication (s)> (default: {U["dht_t_replicate"]})]

if ROUTING_POLICY == link_state
        [ls_t_recalc <pff recalc interval (s)> (default: {U["ls_t_recalc"]})]
        [ls_t_update <LSA update interval (s)> (default: {U["ls_t_update"]})]
        [ls_t_timeo  <link timeout (s)> (default: {U["ls_t_timeo"]})]

if TYPE == udp4
        ip <IP address in dotted notation>
        [port <UDP port> (default: {D4["port"]})]
        [dns <DDNS IPv4 address in dotted notation> (default: none)]
        [peer <IPv4 address of a member> (repeatable, default: none)]
        [members <most members to keep> (default: {D4["members"]})]
{IMPAIR}
if TYPE == udp6
        ip <IPv6 address>
        [port <UDP port> (default: {D6["port"]})]
        [dns <DDNS IPv6 address> (default: none)]
        [peer <IPv6 address of a member> (repeatable, default: none)]
        [members <most members to keep> (default: {D6["members"]})]
{IMPAIR}
if TYPE == eth-llc
        dev <interface name>
        [hash [ALGORITHM] (default: {DEFAULTS["eth-llc"]["hash"]})]
{IMPAIR}where ALGORITHM in {HASHES}

if TYPE == eth-dix
        dev <interface name>
        [ethertype <ethertype> (default: 0x{int(DEFAULTS["eth-dix"]["ethertype"], 16):4X})]
        [hash [ALGORITHM] (default: {DEFAULTS["eth-dix"]["hash"]})]
{IMPAIR}where ALGORITHM in {HASHES}

if TYPE == local
        [hash [ALGORITHM] (default: {DEFAULTS["local"]["hash"]})]
where ALGORITHM in {HASHES}

if TYPE == broadcast
        [hash [ALGORITHM] (default: {DEFAULTS["local"]["hash"]})]
        [autobind]
where ALGORITHM in {HASHES}

"""

USAGE: dict[tuple[str, ...], str] = {
    (): "Usage: irm [OPERATION]\n\nwhere OPERATION in { ipcp bind unbind name flow dump }\n",
    ("ipcp",): ("Usage: irm ipcp [OPERATION]\n\n"
                "where OPERATION in {create destroy\n"
                "                    bootstrap enroll\n"
                "                    connect disconnect\n"
                "                    list show\n"
                "                    help}\n"),
    ("ipcp", "create"): ("Usage: irm ipcp create\n"
                         "                name <ipcp name>\n"
                         "                type [TYPE]\n\n"
                         f"where TYPE in {TYPES}\n"),
    ("ipcp", "destroy"): "Usage: irm ipcp destroy\n                name <ipcp name>\n",
    ("ipcp", "bootstrap"): BOOTSTRAP,
    ("ipcp", "enroll"): ("Usage: irm ipcp enroll\n"
                         "                name <ipcp name>\n"
                         "                [layer <layer to enroll with>]\n"
                         "                [dst <destination to enroll with>]\n"
                         "                [type [TYPE], default = unicast]\n"
                         "                [key <layer key> (default: none)]\n"
                         "                [autobind]\n"
                         "where TYPE in {unicast broadcast}\n"),
    ("ipcp", "connect"): ("Usage: irm ipcp connect\n"
                          "                name      <ipcp name>\n"
                          "                dst       <name of destination IPCP>\n"
                          "                [component [COMPONENT]]\n"
                          "where COMPONENT in {dt mgmt}\n\n"
                          "if COMPONENT == dt\n"
                          "                [qos       [QOS]\n"
                          "where QOS in {raw, best, voice, video, data}\n"),
    ("ipcp", "disconnect"): ("Usage: irm ipcp disconnect\n"
                             "                name      <ipcp name>\n"
                             "                dst       <name of destination IPCP>\n"
                             "                [component [COMPONENT]]\n\n"
                             "where COMPONENT in {dt mgmt}\n"),
    ("ipcp", "list"): ("Usage: irm ipcp list\n"
                       "                [name  <ipcp name>]\n"
                       "                [layer <layer_name>]\n\n"
                       "                [type [TYPE]]\n\n"
                       f"where TYPE = {TYPES}\n"),
    ("ipcp", "show"): "Usage: irm ipcp show\n                [name] <ipcp name>\n",
    ("bind",): _operations("bind", ["program", "process", "ipcp", "help"]),
    ("bind", "program"): ("Usage: irm bind program <program>\n"
                          "           name <name>\n"
                          "           [auto] (instantiate program if not running)\n"
                          "           [-- <application arguments>]\n"),
    ("bind", "process"): "Usage: irm bind process <pid> name <name>\n",
    ("bind", "ipcp"): "Usage: irm bind ipcp <name> name <name>\n",
    ("unbind",): _operations("unbind", ["program", "process", "ipcp", "help"]),
    ("unbind", "program"): ("Usage: irm unbind program <program>\n"
                            "                  [name <name> (default: unbind all names)]\n"),
    ("unbind", "process"): ("Usage: irm unbind process <pid>\n"
                            "                  [name <name> (default: unbind all names)]\n"),
    ("unbind", "ipcp"): ("Usage: irm unbind ipcp <name>\n"
                         "                  [name <name> (default: remove all IPCP info)]\n"),
    ("name",): ("Usage: irm name [OPERATION]\n\n"
                "where OPERATION in {create destroy\n"
                "                    register unregister\n"
                "                    list\n"
                "                    help}\n"),
    ("name", "create"): ("Usage: irm name create\n"
                         "                <name>. max 255 chars.\n"
                         "                [lb LB_POLICY], default: round-robin\n"
                         + "".join(f"                [{word} <path>, default: <security_dir>/{side}/<name>/{file}]\n"
                                   for word, side, file in SECURITY_PATHS)
                         + "\nwhere LB_POLICY in {round-robin spillover}\n"),
    ("name", "destroy"): "Usage: irm name destroy <name>\n",
    ("name", "register"): ("Usage: irm name register <name>\n"
                           "           ipcp <ipcp to register with>\n"
                           "           [ipcp <ipcp to register with>]\n"
                           "           [... (as many as wanted)]\n"
                           "           layer <layer to register with>\n"
                           "           [layer <layer to register with>]\n"
                           "           [... (as many as wanted)]\n"
                           "(ipcp and layer take patterns: * stands for any characters)\n"),
    ("name", "unregister"): ("Usage: irm name unregister <name>\n"
                             "           ipcp <ipcp to unregister from>\n"
                             "           [ipcp <ipcp to unregister from>]\n"
                             "           [... (as many as wanted)]\n"
                             "           layer <layer to unregister from>\n"
                             "           [layer <layer to unregister from>]\n"
                             "           [... (as many as wanted)]\n"
                             "(ipcp and layer take patterns: * stands for any characters)\n"),
    ("name", "list"): "Usage: irm name list [<prefix>] (only the names that begin with it)\n",
    ("flow",): _operations("flow", ["list", "help"]),
    ("flow", "list"): "Usage: irm flow list\n",
    ("dump",): _operations("dump", ["config", "graph", "help"]),
    ("dump", "config"): "Usage: irm dump config (the running state as a config file)\n",
    ("dump", "graph"): "Usage: irm dump graph [FORMAT]\n\nwhere FORMAT in {text dot}, default: text\n",
}  # fmt: skip
