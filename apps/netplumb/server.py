"""netplumbd, the daemon: accept flows and give each its own thread and driver (driver.py), within
the limits (limits.py), so that nothing a peer sends reaches the accept loop; options, signals, main.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from apps.netplumb import policy, privsep
from apps.netplumb.driver import KILL_GRACE, PREAUTH_RCV_BUF, Config, ConfigError, Driver, open_recipe_dir
from apps.netplumb.keys import AuthorizedKeys, Identity, KeyFileError, SpentKeys, config_dir, fingerprint
from apps.netplumb.limits import ADMIN_SESSIONS, LimitReached, Limits, Peer, Ticket
from apps.netplumb.policy import Settings
from apps.netplumb.privsep import Spare
from apps.netplumb.session import ServerSession
from apps.netplumb.wire import INITIAL_WINDOW
from flowlib import FlowError, IrmdUnreachable
from flowlib.flow import establish
from flowlib.irm import IrmClient, default_client
from proto import logs
from proto import messages as m
from proto.service import notify_ready, raise_nofile, serve_until_stopped, stop_on_signals
from proto.version import add_version
from transports.ratelog import RateLog

log = logging.getLogger("netplumbd")
refusal_log = RateLog(logger=log)  # peers cause these as fast as they allocate flows: a bounded rate

ACCEPT_BACKOFF = 0.2  # after the IRMd failed an accept, before the next
REFUSE_WAIT = 2.0  # a refused client's hello is awaited this long before the refusal goes out
MAX_REFUSING = 8  # refusals in progress; beyond, connections over a limit are closed unanswered
RESERVE_FDS = 64  # descriptors no session may take: accepting, refusing, logging, the spare runner, the IRMd


class Daemon:
    """The accept loop: every flow gets a thread bounded by the limits; nothing a peer sends reaches
    this loop, so no peer can end it or hold it up."""

    def __init__(self, cfg: Config, irm: IrmClient) -> None:
        self.cfg = cfg
        self.irm = irm
        self.live: set[Driver] = set()
        self.refusing = threading.BoundedSemaphore(MAX_REFUSING)

    def serve(self) -> None:
        while True:
            try:
                reply, fd = self.irm.accept(None)
            except IrmdUnreachable:
                raise
            except FlowError as e:
                log.warning("accept: %s", e)
                time.sleep(ACCEPT_BACKOFF)
                continue
            peer = peer_of(reply, self.irm)
            try:
                ticket = self.cfg.admission.arrive(peer)
            except LimitReached as e:
                refusal_log.log("flow %d (%s): %s", reply.flow_id, peer, e)
                self._refuse(reply, fd, str(e))
                continue
            threading.Thread(
                target=self._connection, args=(reply, fd, ticket), daemon=True, name=f"conn-{reply.flow_id}"
            ).start()

    def _connection(self, reply: m.FlowReply, fd: int, ticket: Ticket) -> None:
        try:
            # A small receive window until the peer authenticated (the driver opens it then).
            flow = establish(reply, fd, self.irm, client=False, rcv_buf=PREAUTH_RCV_BUF)  # closes fd if it fails
        except Exception as e:  # whatever a peer did to the flow before the session began
            log.info("flow %d: %s: %s", reply.flow_id, type(e).__name__, e)
            self.cfg.admission.leave(ticket)
            return
        try:
            conn = Driver(flow, self.cfg, ticket)
        except Exception as e:  # out of descriptors, say: this client only
            log.info("flow %d: %s: %s", reply.flow_id, type(e).__name__, e)
            with contextlib.suppress(FlowError):
                flow.close()
            self.cfg.admission.leave(ticket)
            return
        self.live.add(conn)
        try:
            conn.run()  # never raises: it ends its own connection, whatever happens
        finally:
            self.live.discard(conn)
            self.cfg.admission.leave(ticket)

    def _refuse(self, reply: m.FlowReply, fd: int, why: str) -> None:
        """Tell a client over a limit why (in clear: no key is agreed), in a thread of a bounded few."""
        if not self.refusing.acquire(blocking=False):
            with contextlib.suppress(OSError):
                os.close(fd)
            self.irm.dealloc(reply.flow_id)
            return

        def refuse() -> None:
            try:
                flow = establish(reply, fd, self.irm, client=False, rcv_buf=PREAUTH_RCV_BUF)
                try:
                    flow.set_timeout(REFUSE_WAIT)
                    with contextlib.suppress(FlowError):
                        flow.read()  # its hello: the refusal answers it
                    flow.write(ServerSession(self.cfg.identity, lambda _key: why).error(why))
                finally:
                    flow.close(linger=False)  # a refused peer is owed no wait for its acknowledgement
            except Exception as e:
                refusal_log.log("flow %d: refusal not delivered: %s", reply.flow_id, e)
            finally:
                self.refusing.release()

        threading.Thread(target=refuse, daemon=True, name=f"refuse-{reply.flow_id}").start()

    def stop_jobs(self) -> None:
        for c in list(self.live):
            c.stop_job()

    def kill_runners(self) -> None:
        for c in list(self.live):
            if c.runner is not None:
                c.runner.kill()

    def busy(self) -> bool:
        return any(c.runner is not None and not c.runner.gone.is_set() for c in list(self.live))


def peer_of(reply: m.FlowReply, irm: IrmClient) -> Peer:
    """Who a flow comes from, as the IRMd vouches: the allocating uid on this host (root and our own
    user are admins), else the remote peer its layer names (m.FlowPeer, asked of the IRMd)."""
    if reply.peer_uid >= 0:
        return Peer(uid=reply.peer_uid, admin=reply.peer_uid in (0, os.geteuid()))
    return Peer(layer=reply.layer, remote=irm.remote_addr(reply.flow_id))


def fit_fds(limits: Limits) -> Limits:
    """Raise the descriptor limit so that every session can hold all its limits allow (a service
    manager's 1024 was less than one key's 8 sessions could take); if it cannot be raised enough,
    serve fewer sessions, so that one client at its limits never leaves another without descriptors."""
    need = (limits.max_sessions + ADMIN_SESSIONS) * limits.fds_per_session() + RESERVE_FDS
    before, soft = raise_nofile(need)
    if before < need:
        privsep.job_nofile = before  # the jobs keep the limit netplumbd was given
    if need <= soft:
        return limits
    sessions = max(1, (soft - RESERVE_FDS) // limits.fds_per_session() - ADMIN_SESSIONS)
    log.warning(
        "%d descriptors allow %d sessions of %d descriptors each (--max-channels, --max-connections), not %d "
        "(--max-sessions)",
        soft,
        sessions,
        limits.fds_per_session(),
        limits.max_sessions,
    )
    return replace(
        limits,
        max_sessions=sessions,
        max_startups=min(limits.max_startups, sessions),
        peer_sessions=min(limits.peer_sessions, sessions),
    )


def _bind(irm: IrmClient, name: str, layers: list[str]) -> None:
    try:
        irm.bind(name)
    except FlowError as e:  # started by the IRMd for this name: bound already
        log.info("bind %s: %s", name, e)
    if layers:
        try:
            irm.register(name, layers)
        except FlowError as e:
            if "already" not in str(e).lower() and "exist" not in str(e).lower():
                raise
            log.info("register %s: %s", name, e)


def _parser() -> argparse.ArgumentParser:
    d = Limits()
    ap = argparse.ArgumentParser(prog="netplumbd", description="netplumb remote execution service")
    ap.add_argument("--name", help="bind this process to NAME (an IRMd starting us with auto has done so)")
    ap.add_argument("--layer", action="append", default=[], help="register NAME in LAYER (repeatable)")
    ap.add_argument(
        "--authorized-keys",
        type=Path,
        default=None,
        help="client keys allowed in (default ~/.config/netplumb/authorized_keys)",
    )
    ap.add_argument(
        "--host-key",
        type=Path,
        default=None,
        help="this server's key, made if missing (default ~/.config/netplumb/host_key)",
    )
    ap.add_argument(
        "--spent-keys",
        type=Path,
        default=None,
        help="where used one-time keys are recorded (default AUTHORIZED_KEYS.spent)",
    )
    ap.add_argument(
        "--recipe-dir",
        type=Path,
        default=None,
        help="private directory of recipes' working directories, one per user (default ~/.config/netplumb/recipes)",
    )
    ap.add_argument(
        "--path", default=None, help="the PATH programs are found in and commands get (default: netplumbd's own)"
    )
    ap.add_argument(
        "--accept-env",
        action="append",
        default=[],
        metavar="PATTERN",
        help="client variables a command may get, as sshd's AcceptEnv (repeatable; none by default)",
    )
    limits = ap.add_argument_group("limits")
    for opt, attr, kind, what in (
        ("--max-startups", "max_startups", int, "unauthenticated connections in all"),
        ("--per-peer-startups", "peer_startups", int, "unauthenticated connections from one local uid or remote peer"),
        ("--max-sessions", "max_sessions", int, "connections in all"),
        ("--per-peer-sessions", "peer_sessions", int, "connections from one local uid or remote peer"),
        ("--per-key-sessions", "key_sessions", int, "sessions of one key"),
        ("--login-grace-time", "login_grace", float, "seconds to authenticate and ask for a command"),
        ("--max-channels", "max_channels", int, "named pipes and sockets of one START"),
        ("--max-connections", "max_connections", int, "open connections on a session's sockets"),
        ("--per-key-buffer", "key_buffer", int, "bytes a key's sessions hold that their commands did not read yet"),
        ("--max-buffer", "max_buffer", int, "bytes all sessions hold that their commands did not read yet"),
    ):
        limits.add_argument(
            opt,
            dest=attr,
            type=kind,
            default=getattr(d, attr),
            metavar="N",
            help=f"{what} (default {getattr(d, attr):g})",
        )
    logs.add_arguments(ap)
    add_version(ap)
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = _parser()
    args = ap.parse_args(argv)
    logs.setup("netplumbd", args)  # peers' words (an ERROR's reason, a command line) stay within their log line
    if args.layer and not args.name:
        ap.error("--layer needs --name")
    limits = Limits(**{f: getattr(args, f) for f in Limits.__dataclass_fields__})
    if any(v <= 0 for v in vars(limits).values()):
        ap.error("every limit must be positive")
    if limits.key_buffer < INITIAL_WINDOW:  # below one channel's window, a `cat` of a large file could fail
        ap.error(f"--per-key-buffer must be at least one channel's window ({INITIAL_WINDOW})")
    if limits.max_buffer < limits.key_buffer:
        ap.error("--max-buffer must be at least --per-key-buffer")
    limits = fit_fds(limits)
    auth = args.authorized_keys or config_dir() / "authorized_keys"
    try:
        identity = Identity.load_or_create(args.host_key or config_dir() / "host_key")
        with contextlib.suppress(FileNotFoundError):
            AuthorizedKeys.load(auth)  # refuse a file with loose modes now, not at the first login
        recipe_dir = args.recipe_dir or config_dir() / "recipes"
        recipe_fd = open_recipe_dir(recipe_dir)
    except (KeyFileError, ConfigError, OSError) as e:
        print(f"netplumbd: {e}", file=sys.stderr)
        sys.exit(1)
    me = policy.account_of(pwd.getpwuid(os.geteuid()))
    settings = Settings(
        me,
        args.path or os.environ.get("PATH") or os.defpath,
        policy.real_account,
        policy.real_which,
        tuple(args.accept_env),
        policy.login_shells(),
        os.environ.get("LANG"),
        limits.max_channels,
    )
    cfg = Config(
        identity,
        auth,
        SpentKeys(args.spent_keys or auth.with_name(auth.name + ".spent")),
        recipe_dir,
        recipe_fd,
        settings,
        limits,
    )
    irm = default_client()
    daemon = Daemon(cfg, irm)

    stop_on_signals()
    Spare.refill_soon()
    try:
        if args.name:
            _bind(irm, args.name, args.layer)
        log.info("serving with key %s", fingerprint(identity.public))
        notify_ready()
        serve_until_stopped(daemon.serve)
    except FlowError as e:
        print(f"netplumbd: {e}", file=sys.stderr)
        sys.exit(1)
    finally:  # the commands of sessions still running do not outlive us
        # Armed first: whatever below waits too long, we are gone shortly, and so are the commands.
        timer = threading.Timer(KILL_GRACE + 1.0, _give_up, args=(daemon,))
        timer.daemon = True
        timer.start()
        daemon.stop_jobs()
        Spare.discard()
        deadline = time.monotonic() + KILL_GRACE + 1.0
        while daemon.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        daemon.kill_runners()


def _give_up(daemon: Daemon) -> None:
    daemon.kill_runners()
    os._exit(0)


if __name__ == "__main__":
    main()
