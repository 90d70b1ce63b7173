"""The IRMd as files: ipcp/, layer/, name/, flow/ trees with ctl and status files, plus net/.

Reads print the IRMd's tables as plain text; a line written to a ctl file is an
irm command (irmd.cli's grammar), with the ipcp or name implied by the directory.
Each attach gets its own tree, whose requests its client's agent makes: the IRMd judges them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from apps.styx import fscreds
from apps.styx.agent import Peer
from apps.styx.netfs import NetFs
from apps.styx.server import DEFAULT_LIMITS, Limits
from apps.styx.tree import Node, StyxError, Synth, SynthDir, Tree, text_file
from flowlib import FlowError
from flowlib.irm import call
from irmd import cli
from proto import messages as m
from transports.wire import Message

ADMIN_TIMEOUT = 60.0  # bootstrap and enroll may take a while
CTL_PERM = 0o666  # whoever may act writes; the IRMd decides what each user may do
READ_ONLY = 0o444  # the ctl files of a client the IRMd would not see as itself
HELP = """write one irm command per write, e.g.
  ipcp bootstrap name lo type local layer local
  name register NAME layer local
  bind program PATH name NAME auto
then read this file for the answer
"""


class IrmAdmin:
    """One client's requests to the IRMd, on the connection its agent made."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def request(self, msg: Message) -> Message:
        try:
            reply, _ = call(self.peer.irm().channel, msg, ADMIN_TIMEOUT)
        except FlowError as e:
            raise StyxError(str(e)) from None
        return reply

    def rows(self, msg: Message) -> list[dict[str, str]]:
        reply = self.request(msg)
        return reply.rows if isinstance(reply, m.Table) else []

    def own_rows(self, msg: Message) -> list[dict[str, str]]:
        """Rows of a list the IRMd makes of the caller's own (flows, names): none for a client the
        IRMd would not see as itself, whose agent is another user (the anonymous account, or a
        non-root server's own user): what is that user's is not the client's."""
        return self.rows(msg) if self.peer.acts else []

    def run(self, words: list[str]) -> str:
        """One irm command line; its answer as text."""
        self.peer.require_acts("writing an irm command")
        # A command line names files (`bind program PATH`, found in $PATH; security files, resolved):
        # they are looked up as the client, as its own irm would, not as the server, whose answer
        # (found or not) would tell the client what directories it may not search hold.
        try:
            with fscreds.working_as(self.peer.rights.creds):
                msg = cli.parse(words)
        except cli.UsageError as e:
            raise StyxError(f"{' '.join(words)}: {e}") from None
        except fscreds.CredsError as e:
            raise StyxError(f"cannot work as {self.peer.user.name}: {e.strerror or e}") from None
        reply = self.request(msg)
        if isinstance(reply, m.Table):
            return cli.render(reply)
        return reply.text if isinstance(reply, m.Ok) and reply.text else "ok"


def _words(command: str) -> list[str]:
    words = command.split()
    if not words:
        raise StyxError("empty command")
    return words


def _kv(row: dict[str, str]) -> str:
    return "".join(f"{k} {v}\n" for k, v in row.items())


def _safe(name: str) -> bool:
    return bool(name) and "/" not in name and name not in (".", "..", "-")


class IrmTree(Tree):
    """What `styx serve --irm` serves: to each attach, an IrmFs of its own client."""

    def __init__(self, served_as: frozenset[str] = frozenset(), limits: Limits = DEFAULT_LIMITS) -> None:
        self.served_as = served_as  # names this server answers as: never announced through net/
        self.limits = limits

    def attach(self, peer: Peer, aname: str) -> Node:
        # One net/ per connection (its peer), however many attaches it makes: --max-flows (and the
        # descriptors budgeted for a connection) bound them all, and the agent's IRMd connection,
        # whose arrivals and bindings net/ keeps track of, is one.
        net = peer.kept(NetFs, lambda: NetFs(peer, self.served_as, self.limits)) if peer.acts else None
        return IrmFs(IrmAdmin(peer), net).root


class IrmFs:
    """One client's view of the IRMd (and its net/, if the client may use flows)."""

    def __init__(self, admin: IrmAdmin, net: NetFs | None = None) -> None:
        self.admin = admin
        self.ctl_perm = perm = CTL_PERM if admin.peer.acts else READ_ONLY
        root = self.root = SynthDir("")
        root.add(text_file("ctl", root, lambda: HELP, lambda c: self.admin.run(_words(c)), perm))
        ipcp = root.add(SynthDir("ipcp", root, self._ipcps))
        assert isinstance(ipcp, SynthDir)
        ipcp.add(
            text_file(
                "ctl",
                ipcp,
                lambda: "ipcp create|bootstrap|enroll ... without the word ipcp\n",
                lambda c: self.admin.run(["ipcp", *_words(c)]),
                perm,
            )
        )
        root.add(SynthDir("layer", root, self._layers))
        name = root.add(SynthDir("name", root, self._names))
        assert isinstance(name, SynthDir)
        name.add(
            text_file(
                "ctl",
                name,
                lambda: "create NAME [lb POLICY] | destroy NAME\n",
                lambda c: self.admin.run(["name", *_words(c)]),
                perm,
            )
        )
        root.add(SynthDir("flow", root, self._flows))
        if net is not None:
            root.add(net.mount(root))

    # -- ipcp/ --------------------------------------------------------------------------

    def _ipcps(self, parent: SynthDir) -> list[Synth]:
        return [self._ipcp_dir(parent, row) for row in self.admin.rows(m.IpcpList()) if _safe(row.get("name", ""))]

    def _ipcp_row(self, name: str) -> dict[str, str]:
        rows = self.admin.rows(m.IpcpList(name=name))
        if not rows:
            raise StyxError(f"ipcp '{name}' is gone")
        return rows[0]

    def _ipcp_dir(self, parent: SynthDir, row: dict[str, str]) -> Synth:
        name = row["name"]
        d = SynthDir(name, parent)
        d.add(
            text_file(
                "ctl",
                d,
                lambda: (
                    "destroy | bootstrap layer L [type T ...] | enroll ... | connect dst D ... | disconnect dst D\n"
                ),
                lambda c: self._ipcp_ctl(name, c),
                self.ctl_perm,
            )
        )
        d.add(text_file("status", d, lambda: _kv(self._ipcp_row(name))))
        d.add(text_file("layer", d, lambda: self._ipcp_row(name).get("layer", "") + "\n"))
        d.add(text_file("show", d, lambda: self._ipcp_show(name)))
        return d

    def _ipcp_show(self, name: str) -> str:
        """What `irm ipcp show` prints: the IPCP's address, neighbours, forwarding table, counters, flows."""
        self.admin.peer.require_acts("asking an IPCP")
        reply = self.admin.request(m.IpcpInfoReq(name))
        return cli.render_info(reply) + "\n" if isinstance(reply, m.IpcpInfo) else ""

    def _ipcp_ctl(self, name: str, command: str) -> str:
        op, *rest = _words(command)
        return self.admin.run(["ipcp", op, "name", name, *rest])

    # -- layer/ ---------------------------------------------------------------------------

    def _layers(self, parent: SynthDir) -> list[Synth]:
        layers = sorted({r.get("layer", "") for r in self.admin.rows(m.IpcpList())})
        out: list[Synth] = []
        for layer in filter(_safe, layers):
            d = SynthDir(layer, parent)
            d.add(
                text_file(
                    "ipcps",
                    d,
                    self._lister(
                        lambda lay=layer: [  # type: ignore[misc]
                            r["name"] for r in self.admin.rows(m.IpcpList(layer=lay))
                        ]
                    ),
                )
            )
            d.add(
                text_file(
                    "names",
                    d,
                    self._lister(
                        lambda lay=layer: [  # type: ignore[misc]
                            r["name"]
                            for r in self.admin.own_rows(m.NameList())
                            if lay in re.split(r"[,\s]+", r.get("layers", ""))
                        ]
                    ),
                )
            )
            out.append(d)
        return out

    @staticmethod
    def _lister(items: Callable[[], list[str]]) -> Callable[[], str]:
        return lambda: "".join(f"{i}\n" for i in items())

    # -- name/ ------------------------------------------------------------------------------

    def _names(self, parent: SynthDir) -> list[Synth]:
        out: list[Synth] = []
        for row in self.admin.own_rows(m.NameList()):
            name = row.get("name", "")
            if not _safe(name):
                continue
            d = SynthDir(name, parent)
            d.add(
                text_file(
                    "ctl",
                    d,
                    lambda: (
                        "register layer L | unregister layer L | destroy | "
                        "bind program PATH [auto] [-- ARGS] | unbind program PATH\n"
                    ),
                    lambda c, n=name: self._name_ctl(n, c),  # type: ignore[misc]
                    self.ctl_perm,
                )
            )
            d.add(text_file("status", d, lambda n=name: _kv(self._name_row(n))))  # type: ignore[misc]
            out.append(d)
        return out

    def _name_row(self, name: str) -> dict[str, str]:
        for row in self.admin.own_rows(m.NameList()):
            if row.get("name") == name:
                return row
        raise StyxError(f"name '{name}' is gone")

    def _name_ctl(self, name: str, command: str) -> str:
        op, *rest = _words(command)
        try:
            op = cli.match(op, ["register", "unregister", "destroy", "bind", "unbind"], "a name command")
        except cli.UsageError as e:
            raise StyxError(str(e)) from None
        if op in ("bind", "unbind"):
            if len(rest) < 2:
                raise StyxError(f"{op} needs: program|process|ipcp TARGET")
            dash = rest.index("--") if "--" in rest else len(rest)
            return self.admin.run([op, rest[0], rest[1], "name", name, *rest[2:dash], *rest[dash:]])
        return self.admin.run(["name", op, name, *rest])

    # -- flow/ --------------------------------------------------------------------------------

    def _flows(self, parent: SynthDir) -> list[Synth]:
        out: list[Synth] = []
        for row in self.admin.own_rows(m.FlowList()):
            fid = row.get("id", "")
            if _safe(fid):
                out.append(text_file(fid, parent, lambda r=row: _kv(r)))  # type: ignore[misc]
        return out
