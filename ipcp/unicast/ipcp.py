"""The unicast IPCP: an application of the layers below that enrolls, routes, keeps the
directory and carries flows across its layer, multi-hop. This module composes and drives.

The parts are sans-IO cores, each in its module: enroll, connmgr (adjacencies, neighbours,
automatic connects), fa (flow allocator), routing (link state) with a pff policy, dir (DHT), and
the data transfer thread (dt) with a congestion policy (ca). Here: N-1 flows, the IRMd, and one
timer armed for the earliest of the cores' get_timer().
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import itertools
import logging
import os
import random
import time
from typing import Any

from flowlib.aio import AsyncFlow
from flowlib.flow import Flow, flow_alloc
from flowlib.irm import IrmClient
from ipcp.base import DROP_APP, Ipcp, flow_counters
from ipcp.unicast import auth, ca, pff
from ipcp.unicast import messages as um
from ipcp.unicast.connmgr import MAX_NEIGHBOURS, Adjacency, AutoConnect, Neighbours
from ipcp.unicast.dir import DhtParams, Directory
from ipcp.unicast.dt import Dt, UniFlow
from ipcp.unicast.enroll import Enrollee, Enroller
from ipcp.unicast.fa import MAX_DATA, Alloc, Allocated, AllocFailed, Arrived, Ended, FaError, FlowAllocator, State
from ipcp.unicast.handshake import Handshake, Peer, Refused
from ipcp.unicast.mgmtq import MgmtQueue
from ipcp.unicast.pci import FRAMING, MAX_PDU, PciFormat
from ipcp.unicast.routing import Lsdb, LsTimers, Pacer
from proto import messages as m
from proto.errors import FlowError
from proto.names import HASHES
from proto.qos import QosSpec
from proto.qos import by_name as qos_by_name
from proto.qos import raw as qos_raw
from transports.channel import HandlerError, RemoteError
from transports.ratelog import RateLog
from transports.unix import seqpacket_pair
from transports.wire import Message, WireError

log = logging.getLogger(__name__)
DROPPED = RateLog(logger=log)  # forged LSUs: a neighbour can send them by the thousand
# Handshakes refused: anyone reaching a member through the layer below fails one per flow it opens (a
# line each, ~20 a second from one local user); the stats count them all.
REFUSED = RateLog(rate=1.0, burst=5, logger=log)
ENDED = RateLog(rate=2.0, burst=10, logger=log)  # flows their peers ended: one per flow a peer opens and closes
# Neighbours enrolled, connected and gone: a member (anyone, in an open layer) can enroll or link and drop
# over and over through the layer below, ~40 lines a second from one local user; the stats count them.
NEIGHBOURS = RateLog(rate=2.0, burst=10, logger=log)

ALLOC_TIMEOUT = 10.0
AUTO = "auto"  # `connect dst auto`: find and connect neighbours by ourselves
MAX_HANDSHAKES = 32  # N-1 flows being greeted at once; past it the oldest silent one gives way
MAX_ENROLLING = 32  # enrollees answered and waited for (to close first) at once; past it the oldest is let go
# `connect` answers once the new neighbour is routed, so a name lookup right after it can ask it;
# past this it answers anyway (the layer's routing settles on its own).
ROUTED_WAIT = 2.0
MAX_MGMT_QUEUE = 4096  # management PDUs the DT thread may hand over ahead of the loop (per neighbour in turn)
MGMT_SLICE = 256  # ... taken by the loop at once
DEFAULTS = {
    "addr": "4",
    "eid": "8",
    "ttl": "60",
    "routing": "link_state",
    "congestion": "none",
    "hash": "SHA3_256",
    "directory": "DHT",
    "addr_auth": "flat",
    "mtu": "1500",
    "ls_t_recalc": "4",
    "ls_t_update": "15",
    "ls_t_timeo": "60",
    "dht_alpha": "3",
    "dht_k": "8",
    "dht_t_expire": "86400",
    "dht_t_refresh": "900",
    "dht_t_replicate": "900",
}
# Each member's own word, checked end to end: a lookup too, since its answer (up to MAX_FOUND signed
# stores) goes to the address it names, which would otherwise make others' answers a flood on a third.
SIGNED = (um.FaReq, um.FaReply, um.FaDealloc, um.FlowUpdate, um.DhtFind)
BOUNDS = {
    "ls_t_recalc": (1, 3600),
    "ls_t_update": (1, 3600),
    "ls_t_timeo": (2, 86400),
    "dht_alpha": (1, 20),
    "dht_k": (1, 20),
    "dht_t_expire": (10, 86400),
    "dht_t_refresh": (1, 3600),
    "dht_t_replicate": (1, 3600),
}


def qos_cube(qos: QosSpec) -> int:
    """The layer's QoS cubes: 0 raw, 1 in-order (best effort, video, voice), 2 reliable (data)."""
    return 2 if qos.loss == 0 else 1 if qos.in_order else 0


def check_conf(conf: dict[str, str]) -> dict[str, str]:
    out = dict(DEFAULTS)
    unknown = set(conf) - set(DEFAULTS) - {"key"}
    if unknown:
        raise HandlerError(m.EINVAL, f"unknown unicast options {sorted(unknown)}: expected {sorted(DEFAULTS)}")
    out.update(conf)
    try:
        PciFormat(int(out["addr"]), int(out["eid"]))
        if not 1 <= int(out["ttl"]) <= 255 or int(out["mtu"]) < 64:
            raise ValueError("ttl must be 1-255 and mtu at least 64")
        for key, (lo, hi) in BOUNDS.items():
            if not lo <= int(out[key]) <= hi:
                raise ValueError(f"{key} must be {lo}-{hi}")
        if int(out["ls_t_timeo"]) <= int(out["ls_t_update"]):
            raise ValueError("ls_t_timeo must exceed ls_t_update, or LSUs expire between two updates")
        pff.by_name(out["routing"])
        ca.by_name(out["congestion"])
    except ValueError as e:
        raise HandlerError(m.EINVAL, f"bad unicast options: {e}") from None
    if out["hash"] not in HASHES:
        raise HandlerError(m.EINVAL, f"bad hash {out['hash']!r}")
    return out


ADDRESS_DRAWS = 64  # random draws before a walk: only a nearly full address space needs one


def _free_address(members: set[int], max_addr: int) -> int:
    """A random address of 1..max_addr that no member has; HandlerError when every one is taken
    (as an enroller may claim: its member list is what it says)."""
    if sum(1 for a in members if 0 < a <= max_addr) >= max_addr:
        raise HandlerError(m.EIPCP, f"the layer has no free address (all {max_addr} taken)")
    for _ in range(ADDRESS_DRAWS):
        if (addr := random.randint(1, max_addr)) not in members:
            return addr
    return next(a for a in range(1, max_addr + 1) if a not in members)


def _close_after(af: AsyncFlow, _: object) -> None:
    af.close()


class UnicastIpcp(Ipcp):
    type = "unicast"
    dt_class = Dt

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.conf: dict[str, str] = {}
        self.addr = 0
        self.max_addr = um.ADDR_SPACE - 1  # the layer's, once known (enrolled or bootstrapped)
        self.psk: bytes | None = None  # from the layer key; None: an open layer
        self.identity = auth.Identity.generate()  # until the layer is joined: then the IPCP's own, kept
        self.irm: IrmClient | None = None
        self.dt: Dt | None = None
        self.lsdb: Lsdb | None = None
        self.dir: Directory | None = None
        self.fa: FlowAllocator | None = None
        self.mtu = 0
        self.neighbours = Neighbours()
        self.routes: dict[int, list[int]] = {}  # the forwarding table, as last given to the DT thread
        self.via = ""  # the name we enrolled through
        self.auto = AutoConnect(time.monotonic())
        self.flows: dict[int, UniFlow] = {}  # by irmd flow id
        self.stats: collections.Counter[str] = collections.Counter()  # enrollment, handshakes, drops
        self._allocs: dict[int, asyncio.Future[Alloc]] = {}
        self._lookups: dict[bytes, list[asyncio.Future[list[int]]]] = {}
        # N-1 flows being greeted, oldest first: their handshakes and the tasks that drive them
        self._greeting: dict[AsyncFlow, tuple[Adjacency, asyncio.Task[Any]]] = {}
        self._enrolling: dict[AsyncFlow, asyncio.Task[Any]] = {}  # enrollees answered, oldest first
        self._mgmt_in = MgmtQueue(MAX_MGMT_QUEUE)  # from the DT thread, per neighbour
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- joining a layer ---------------------------------------------------

    async def bootstrap(self, layer: str, conf: dict[str, str]) -> m.LayerInfo:
        conf = check_conf(conf)
        return await self._start(layer, conf, members=set())

    async def enroll(self, dst: str, key: str = "") -> m.LayerInfo:
        """Ask a member, reached by name through the layers below, for the layer's config."""
        af = await self._alloc_n1(dst, qos_raw, "enroll")
        core = Enrollee(self.name, key, time.monotonic())
        core.start()
        try:
            await self._drive(af, core)
        finally:
            af.close()
        if core.error is not None:
            self.stats["enroll_failed"] += 1
            hint = " (enroll ... key SECRET)" if core.error.code == m.EPERM and not key else ""
            raise HandlerError(core.error.code, f"enrollment through {dst!r} failed: {core.error.text}{hint}")
        assert core.info is not None and core.enroller is not None
        info = core.info
        log.info("%s: enrolled in %s through %s", self.name, info.layer, info.name or dst)
        self.via = info.name or dst  # its own name: the layer's name may be ours too soon (autobind)
        conf = check_conf({k: v for k, v in info.conf.items() if k != "key"})
        if key:
            conf["key"] = key  # ours: the enroller proved it knows it, never sent it
        self.stats["enrolled"] += 1
        return await self._start(info.layer, conf, members=set(info.members))

    async def _start(self, layer: str, conf: dict[str, str], members: set[int]) -> m.LayerInfo:
        try:
            identity = auth.Identity.load(auth.state_dir() / "ipcp" / f"{self.name}.key")
        except (OSError, ValueError) as e:
            raise HandlerError(m.EPERM, f"cannot use this IPCP's member key: {e}") from None
        self.identity = identity
        self.conf = conf
        self.psk = auth.layer_psk(conf["key"]) if conf.get("key") else None
        fmt = PciFormat(int(conf["addr"]), int(conf["eid"]))
        self.max_addr = fmt.max_addr
        self.addr = _free_address(members, fmt.max_addr)
        self.layer = layer
        # What one PDU carries (its length is 2 bytes), within what one frame of the flows below does.
        self.mtu = min(int(conf["mtu"]) - FRAMING - (auth.SEAL if self.psk else 0), MAX_PDU) - fmt.size
        now = time.monotonic()
        bindings = auth.Bindings()
        timers = LsTimers(float(conf["ls_t_recalc"]), float(conf["ls_t_update"]), float(conf["ls_t_timeo"]))
        policy = pff.by_name(conf["routing"])
        self.lsdb = Lsdb(self.addr, policy, self.name, time.time(), identity, bindings, timers, now, fmt.max_addr)
        self.pacer = Pacer(self.lsdb)
        params = DhtParams(
            int(conf["dht_alpha"]),
            int(conf["dht_k"]),
            float(conf["dht_t_expire"]),
            float(conf["dht_t_refresh"]),
            float(conf["dht_t_replicate"]),
        )
        self.dir = Directory(self.addr, params, identity, bindings, now)
        self.dir.reachable = self._reachable
        self.fa = FlowAllocator(self.addr, fmt.max_eid, self._reachable)
        self.loop = loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._fatal)

        def on_mgmt(pdu: bytes, hop: int) -> None:  # on the DT thread: hand over in batches, bounded
            assert self.dt is not None
            if self._mgmt_in.put(hop, pdu):  # the loop drains to empty: one wake-up per batch
                loop.call_soon_threadsafe(self._drain_mgmt)
            self.dt.counters.mgmt_dropped = self._mgmt_in.dropped

        def on_n1_down(addr: int, link: object) -> None:
            loop.call_soon_threadsafe(self._drop_link, addr, um.DT, link)

        def on_congestion(flow: UniFlow, update: ca.Update) -> None:  # on the DT thread
            assert self.dt is not None
            msg = self._sign(um.FlowUpdate(self.addr, flow.remote_eid, update.ece, update.rate))
            self.dt.send_mgmt(flow.dst, um.CODEC.encode(msg))

        self.dt = self.dt_class(
            fmt,
            self.addr,
            int(conf["ttl"]),
            65536,
            on_mgmt,
            on_n1_down,
            on_congestion,
            ca.by_name(conf["congestion"]),
            policy.spread,
        )
        self.dt.start()
        irm = self._client()
        loop.add_reader(irm.wakeup_fd, self._on_arrivals)
        await asyncio.to_thread(irm.listen, True)
        log.info("%s: in layer %s at address %d", self.name, layer, self.addr)
        self._after(now)
        return m.LayerInfo(layer, conf["hash"], self.mtu)

    def _fatal(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An error nothing handled, in a callback or a task: the IPCP is not to be trusted on."""
        log.critical("%s: %s; the IPCP ends", self.name, context.get("message"), exc_info=context.get("exception"))
        self.fail()

    def _client(self) -> IrmClient:
        if self.irm is None:
            self.irm = IrmClient(self.irmd_sock)
        return self.irm

    def _reachable(self, addr: int) -> bool:
        return addr in self.routes

    async def _alloc_n1(self, dst: str, qos: QosSpec, what: str) -> AsyncFlow:
        try:
            flow = await asyncio.to_thread(flow_alloc, dst, qos, ALLOC_TIMEOUT, irm=self._client())
        except FlowError as e:
            raise HandlerError(m.ENOENT, f"cannot reach {dst!r} to {what}: {e}") from None
        return AsyncFlow(flow)

    @staticmethod
    async def _drive(af: AsyncFlow, core: Enrollee | Adjacency) -> None:
        """Run a handshake core over its N-1 flow until it is done (or the flow ends)."""
        while True:
            try:
                for sdu in core.pop_out():
                    await af.write(sdu)
            except FlowError:
                core.closed()
                return
            if core.done:
                return
            deadline = core.get_timer()
            assert deadline is not None
            try:
                sdu = await asyncio.wait_for(af.read(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                core.handle_timer(time.monotonic())
                continue
            except FlowError:
                core.closed()
                return
            core.receive(sdu, time.monotonic())

    # -- neighbours ----------------------------------------------------------

    async def connect(self, dst: str, component: str, qos: str, connect: bool) -> None:
        if not self.layer:
            raise HandlerError(m.ENOTCONN, "not in a layer yet")
        if dst == AUTO:
            self.auto.enabled = connect
            self._rearm()
            return
        comps = [component] if component else [um.MGMT, um.DT]
        routed = self.addr
        if not connect:
            for nb in self.neighbours.named(dst):
                for comp in comps:
                    self._drop_link(nb.addr, comp)
            return
        for comp in comps:
            spec = qos_by_name(qos) if comp == um.DT else qos_raw  # management always rides raw flows
            if comp == um.DT and not spec.frct:
                # DT reads a raw flow's socket itself, past flowlib: its peer's liveness cannot be seen.
                spec = dataclasses.replace(spec, timeout=0)
            af = await self._alloc_n1(dst, spec, "connect")
            adj = self._adjacency(True, comp)
            try:
                await self._drive(af, adj)
            except BaseException:
                af.close()
                raise
            if adj.error is not None or adj.peer is None:
                af.close()
                error = adj.error or Refused(m.EIPCP, "the flow ended during the handshake")
                self.stats["handshake_auth" if error.code == m.EPERM else "handshake_failed"] += 1
                raise HandlerError(error.code, f"cannot connect {comp} to {dst!r}: {error.text}")
            self._add_link(adj.peer, af)
            log.info("%s: connected %s to %s (address %d)", self.name, comp, dst, adj.peer.addr)
            routed = adj.peer.addr
        deadline = time.monotonic() + ROUTED_WAIT
        while routed not in self.routes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _on_arrivals(self) -> None:
        irm = self._client()
        try:
            arrived = irm.take_arrived()
        except FlowError:  # the IRMd is gone; our control channel closing stops us
            self.loop.remove_reader(irm.wakeup_fd)
            return
        for reply, fd in arrived:
            af = AsyncFlow(Flow(reply, fd, irm))
            if len(self.neighbours) >= MAX_NEIGHBOURS or (
                len(self._greeting) >= MAX_HANDSHAKES and not self._evict_unproven()
            ):
                self.stats["greet_refused"] += 1
                af.close()
                continue
            adj = self._adjacency(False, "")
            self._greeting[af] = (adj, self.spawn(self._greet(af, adj)))

    def _evict_unproven(self) -> bool:
        """Close the oldest greeting whose peer has said nothing, else the oldest not yet proved (one
        hello costs nothing to send): flows opened and left there must not keep members from enrolling
        or connecting, and a real handshake is done within a round trip. False if all are done."""
        pending = [(af, adj, task) for af, (adj, task) in self._greeting.items() if not adj.done]
        victim = next((p for p in pending if p[1].silent), pending[0] if pending else None)
        if victim is None:
            return False
        af, _, task = victim
        del self._greeting[af]
        # The flow is closed once its task has let go of it: closed under a pending read, its
        # descriptor's number would come back as the next flow's with the old reader on it.
        task.cancel()
        task.add_done_callback(functools.partial(_close_after, af))
        self.stats["greet_evicted"] += 1
        return True

    async def _greet(self, af: AsyncFlow, adj: Adjacency) -> None:
        """A member below reached us: it enrolls, or connects a component."""
        try:
            await self._drive(af, adj)
        finally:
            self._greeting.pop(af, None)
        peer = adj.peer
        if peer is None:
            self.stats["handshake_auth" if adj.error and adj.error.code == m.EPERM else "handshake_failed"] += 1
            if adj.error is not None:
                REFUSED.log("%s: refused an N-1 flow: %s", self.name, adj.error.text)
            af.close()
        elif peer.component == um.ENROLL:
            await self._enroll_peer(af, peer)
        else:
            self._add_link(peer, af)
            NEIGHBOURS.log("%s: %s connected %s (address %d)", self.name, peer.name, peer.component, peer.addr)

    async def _enroll_peer(self, af: AsyncFlow, peer: Peer) -> None:
        assert self.lsdb is not None
        conf = {k: v for k, v in self.conf.items() if k != "key"}  # the key never travels
        core = Enroller(
            peer,
            um.EnrollInfo(self.layer, conf, sorted(self.lsdb.members), name=self.name),
            time.monotonic(),
            af.flow.mtu,
        )
        try:
            for sdu in core.pop_out():
                await af.write(sdu)
            self.stats["enrollments"] += 1
            NEIGHBOURS.log("%s: enrolled %s", self.name, peer.name)
            deadline = core.get_timer()
            assert deadline is not None
            # The enrollee has its answer: waiting for it to close first is a courtesy, which enrollees
            # that never close must not turn into a flow and a task each for TIMEOUT.
            if len(self._enrolling) >= MAX_ENROLLING:
                self._enrolling.pop(next(iter(self._enrolling))).cancel()
                self.stats["enroll_let_go"] += 1
            if (task := asyncio.current_task()) is not None:
                self._enrolling[af] = task
            await asyncio.wait_for(af.read(), max(0.0, deadline - time.monotonic()))  # until the enrollee closes
        except (TimeoutError, FlowError):
            pass  # closed, or done waiting for it: either way the enrollment is over
        finally:
            self._enrolling.pop(af, None)
            core.closed() if not core.done else None
            af.close()

    def _adjacency(self, initiator: bool, component: str) -> Adjacency:
        """An N-1 flow's handshake, as this member: its name, address, layer key and member key."""
        hs = Handshake(initiator, component, self.name, self.layer, self.addr, self.psk, time.monotonic(),
                       self.max_addr, self.identity, self._key_of)  # fmt: skip
        return Adjacency(hs)

    def _key_of(self, addr: int) -> bytes | None:
        """The member key `addr` is bound to (by its LSUs), if any."""
        return self.lsdb.bindings.by_addr.get(addr) if self.lsdb is not None else None

    def _add_link(self, peer: Peer, af: AsyncFlow) -> None:
        assert self.dt is not None and self.lsdb is not None
        comp = peer.component
        others = self._links_of_other_keys(peer.addr, peer.pub)
        if others:
            if self._key_of(peer.addr) != peer.pub:
                # Before its LSUs bind its key, a live neighbour's links are still its own: not another key's.
                self.stats["handshake_auth"] += 1
                REFUSED.log("%s: refused %s for address %d: another member key holds it", self.name, comp, peer.addr)
                af.close()
                return
            for c in others:  # the key the address is bound to takes it back from whoever linked first
                self._drop_link(peer.addr, c)
        link = (af, peer)
        old = self.neighbours.add(peer.addr, peer.name, comp, link)
        if old is not None:
            old[0].close()
        if comp == um.DT:
            self.dt.command(self.dt.add_n1, peer.addr, os.dup(af.flow.fd), peer.sealer, peer.opener, link, af.flow.mtu)
            self._adjacency_changed()
        else:
            self.spawn(self._serve_mgmt(link))
            for lsu in self.lsdb.all():
                self._write_mgmt(af, peer, lsu)

    def _drop_link(self, addr: int, comp: str, link: Any = None) -> None:
        """Drop a neighbour's adjacency (only `link`, if given: not one that replaced it since)."""
        assert self.dt is not None
        gone = self.neighbours.remove(addr, comp, link)
        if gone is None:
            return
        NEIGHBOURS.log("%s: %s flow to %s (address %d) is down", self.name, comp, gone[1].name, addr)
        gone[0].close()  # a management flow's task ends on it
        if comp == um.DT:
            self.dt.command(self.dt.remove_n1, addr, gone)
            self._adjacency_changed()

    async def _serve_mgmt(self, link: tuple[AsyncFlow, Peer]) -> None:
        assert self.lsdb is not None
        af, peer = link
        for taken in itertools.count(1):
            if taken % MGMT_SLICE == 0:
                await asyncio.sleep(0)  # a read that is always ready never yields: let the others run
            try:
                sdu = await af.read()
            except FlowError:
                self._drop_link(peer.addr, um.MGMT, link)
                return
            try:
                msg = um.CODEC.decode(bytes(peer.opener.open(sdu)) if peer.opener else sdu).msg
            except auth.Replayed:
                self.stats["mgmt_replayed"] += 1
                continue
            except auth.Forged:
                self.stats["mgmt_forged"] += 1
                continue
            except WireError as e:
                self.stats["mgmt_malformed"] += 1
                log.debug("%s: bad management message from %s: %s", self.name, peer.name, e)
                continue
            if not isinstance(msg, um.Lsu):
                self.stats["mgmt_malformed"] += 1
                continue
            now = time.monotonic()
            if self.pacer.hold(msg, peer.addr, now):  # its turn comes at the timer
                self._rearm()
                continue
            self._take_lsu(msg, now, peer)

    def _take_lsu(self, msg: um.Lsu, now: float, peer: Peer | None, via: int = 0) -> None:
        """An LSU from the neighbour `peer` (None: one the pacer held back, from the neighbour at
        `via`): flooded on if news, to every neighbour but the one it came from."""
        assert self.lsdb is not None
        try:
            news = self.lsdb.receive(msg, now)
        except auth.Forged as e:
            where = peer.name if peer is not None else f"neighbour {via}"
            DROPPED.log("%s: dropped an LSU via %s: %s", self.name, where, e)  # counted in lsu_forged
            return
        if news:
            self._flood(msg, exclude=peer.addr if peer is not None else via)
            self._drop_links_of_other_keys(msg.src)
            self._after(now)

    def _drop_links_of_other_keys(self, addr: int) -> None:
        """`addr` is now bound to a key (its LSU): links to it made with another key before that go."""
        if (bound := self._key_of(addr)) is None:
            return
        for comp in self._links_of_other_keys(addr, bound):
            self.stats["handshake_auth"] += 1
            self._drop_link(addr, comp)

    def _links_of_other_keys(self, addr: int, pub: bytes) -> list[str]:
        """The components of our links to `addr` whose peer proved a key other than `pub`."""
        nb = self.neighbours.get(addr)
        return [c for c, (_, p) in nb.links.items() if p.pub != pub] if nb is not None else []

    @staticmethod
    def _write_mgmt(af: AsyncFlow, peer: Peer, msg: Message) -> None:
        sdu = um.CODEC.encode(msg)
        try:
            af.flow.write(peer.sealer.seal_bytes(sdu) if peer.sealer else sdu)
        except FlowError as e:
            log.debug("management write failed: %s", e)

    def _flood(self, lsu: um.Lsu, exclude: int = 0) -> None:
        for addr, (af, peer) in self.neighbours.with_link(um.MGMT).items():
            if addr != exclude:
                self._write_mgmt(af, peer, lsu)

    def _adjacency_changed(self) -> None:
        assert self.lsdb is not None
        now = time.monotonic()
        self._flood(self.lsdb.set_neighbours(set(self.neighbours.with_link(um.DT)), now))
        self._after(now)

    # -- the cores' output, and the one timer --------------------------------------

    def _after(self, now: float) -> None:
        """Carry out what the cores have to say after any input, and re-arm the timer."""
        assert self.dt is not None and self.lsdb is not None and self.dir is not None and self.fa is not None
        table = self.lsdb.take_table(now)
        if table is not None:
            self.routes = table
            self.dt.command(self.dt.set_pff, table)
            # Directory entries live only at members we can reach: others would drop them unseen.
            self._send_all(self.dir.set_members(set(table) | {self.addr}, now))
            self.fa.routes_changed(now)
        out, events = self.fa.pop()
        self._send_all(out)
        for ev in events:
            self._on_fa_event(ev)
        for key, addrs in self.dir.resolved:
            for fut in self._lookups.pop(key, []):
                if not fut.done():
                    fut.set_result(addrs)
        self.dir.resolved.clear()
        self._rearm()

    def _rearm(self) -> None:
        if self.lsdb is None or self.dir is None or self.fa is None:
            return
        due = [
            t
            for t in (
                self.lsdb.get_timer(),
                self.pacer.get_timer(),
                self.dir.get_timer(),
                self.fa.get_timer(),
                self.auto.get_timer(),
            )
            if t is not None
        ]
        at = min(due)
        if self._timer is not None and self._timer_at == at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        assert self.lsdb is not None and self.dir is not None and self.fa is not None
        self._timer = None
        now = time.monotonic()
        for held, via in self.pacer.due(now):
            self._take_lsu(held, now, None, via)
        lsu = self.lsdb.handle_timer(now)
        if lsu is not None:
            self._flood(lsu)
        self._send_all(self.dir.handle_timer(now))
        self.fa.handle_timer(now)
        target = self.auto.handle_timer(now, self.addr, self.via, self.neighbours, self.lsdb.names())
        if target is not None:
            self.spawn(self._auto_connect(target))
        self._after(now)

    async def _auto_connect(self, dst: str) -> None:
        try:
            await self.connect(dst, "", "raw", True)
        except HandlerError as e:
            log.info("%s: automatic connect to %s failed: %s", self.name, dst, e.text)
            self.auto.done(dst, False, time.monotonic())
        else:
            self.auto.done(dst, True, time.monotonic())
        self._rearm()

    # -- management PDUs (flow allocator, directory) ---------------------------

    def _sign(self, msg: Message) -> Message:
        return dataclasses.replace(msg, sig=self.identity.sign(um.signed_part(msg)))  # type: ignore[type-var]

    def _signed_by_src(self, msg: um.FaReq | um.FaReply | um.FaDealloc | um.FlowUpdate | um.DhtFind) -> bool:
        """Whether the member at msg.src signed it, under the key bound to that address."""
        assert self.lsdb is not None
        pub = self.lsdb.bindings.by_addr.get(msg.src)
        try:
            if pub is None:
                raise auth.Forged(f"no member key known for address {msg.src}")
            auth.verify(pub, um.signed_part(msg), msg.sig)
        except auth.Forged as e:
            log.debug("%s: dropped a %s: %s", self.name, type(msg).__name__, e)
            return False
        return True

    def _send(self, dst: int, msg: Message) -> None:
        assert self.dt is not None
        if isinstance(msg, SIGNED):
            msg = self._sign(msg)
        self.dt.command(self.dt.send_mgmt, dst, um.CODEC.encode(msg))

    def _send_all(self, out: list[tuple[int, Message]]) -> None:
        for dst, msg in out:
            self._send(dst, msg)

    def _drain_mgmt(self) -> None:
        """Management PDUs the DT thread handed over, MGMT_SLICE at a time so the loop stays responsive."""
        for _ in range(MGMT_SLICE):
            if (pdu := self._mgmt_in.take()) is None:
                return
            self._on_mgmt(pdu)
        self.loop.call_soon(self._drain_mgmt)

    def _on_mgmt(self, payload: bytes) -> None:
        assert self.dir is not None and self.fa is not None and self.dt is not None
        try:
            msg = um.CODEC.decode(payload).msg
        except WireError as e:
            self.stats["mgmt_malformed"] += 1
            log.debug("%s: dropped a management PDU: %s", self.name, e)
            return
        now = time.monotonic()
        if isinstance(msg, SIGNED) and not self._signed_by_src(msg):
            self.stats["fa_forged"] += 1
            return
        match msg:
            case um.DhtStore() | um.DhtFind() | um.DhtFound():
                try:
                    self._send_all(self.dir.receive(msg, now))
                except auth.Forged as e:
                    DROPPED.log("%s: dropped a directory store: %s", self.name, e)  # counted in dht_forged
            case um.FaReq() | um.FaReply() | um.FaDealloc():
                self.fa.receive(msg, now)
            case um.FlowUpdate():
                self.dt.command(self.dt.on_update, msg.eid, msg.src, ca.Update(msg.ece, msg.rate))
            case _:
                self.stats["mgmt_malformed"] += 1
        self._after(now)

    async def _lookup(self, digest: bytes) -> list[int]:
        if self.dir is None:
            raise HandlerError(m.ENOTCONN, "not in a layer yet")
        now = time.monotonic()
        found = self.dir.local(digest, now)
        if found:
            return found
        fut: asyncio.Future[list[int]] = self.loop.create_future()
        first = digest not in self._lookups
        self._lookups.setdefault(digest, []).append(fut)
        if first:
            _, out = self.dir.lookup(digest, now)
            self._send_all(out)
            self._after(now)
        return await fut

    async def reg(self, digest: bytes, register: bool) -> None:
        if self.dir is None:
            raise HandlerError(m.ENOTCONN, "not in a layer yet")
        now = time.monotonic()
        self._send_all(self.dir.register(digest, register, now))
        self._after(now)

    async def query(self, digest: bytes) -> bool:
        return bool(await self._lookup(digest))

    async def flow_alloc(
        self, flow_id: int, digest: bytes, qos: QosSpec, timeout: float, data: bytes
    ) -> tuple[int, int, bytes]:
        assert self.dt is not None and self.fa is not None and self.dir is not None
        if len(data) > MAX_DATA:
            raise HandlerError(m.EINVAL, f"allocation data of {len(data)} bytes exceeds {MAX_DATA}")
        addrs = await self._lookup(digest)
        if not addrs:
            raise HandlerError(m.ENOENT, "name not found in the layer's directory")
        fut: asyncio.Future[Alloc] = self.loop.create_future()
        now = time.monotonic()
        try:
            alloc = self.fa.alloc(flow_id, digest, qos, data, addrs, min(timeout, ALLOC_TIMEOUT), now)
        except FaError as e:
            raise HandlerError(e.code, e.text) from None
        self._allocs[alloc.eid] = fut
        self._after(now)
        try:
            await fut
        finally:
            self._allocs.pop(alloc.eid, None)
        if alloc.error is not None:
            if alloc.error.code in (m.ENOENT, m.EIPCP):
                self.dir.cache.pop(digest, None)  # stale: the next lookup asks again
            raise HandlerError(alloc.error.code, alloc.error.text)
        app_end, mine = seqpacket_pair()
        self._add_flow(UniFlow(alloc.eid, mine, alloc.dst, alloc.remote_eid, flow_id, qos_cube(qos)))
        return self.mtu, app_end.detach(), alloc.data

    def _add_flow(self, flow: UniFlow) -> None:
        assert self.dt is not None
        self.flows[flow.flow_id] = flow
        self.dt.command(self.dt.add_flow, flow)

    def _on_fa_event(self, ev: Allocated | AllocFailed | Arrived | Ended) -> None:
        match ev:
            case Allocated(alloc) | AllocFailed(alloc):
                fut = self._allocs.get(alloc.eid)
                if fut is not None and not fut.done():
                    fut.set_result(alloc)
            case Arrived(alloc):
                self.spawn(self._fa_arrived(alloc))
            case Ended(alloc, down):
                flow = self.flows.pop(alloc.flow_id, None)
                if flow is not None:
                    assert self.dt is not None
                    self.dt.command(self.dt.remove_flow, flow.eid)
                    why = "its lost path" if down else "its peer"
                    ENDED.log("%s: flow %d ended by %s", self.name, flow.flow_id, why)
                    self.flow_ended(flow.flow_id, down, flow.io)

    async def _fa_arrived(self, alloc: Alloc) -> None:
        assert self.fa is not None
        app_end, mine = seqpacket_pair()
        try:
            flow_id, data = await self.flow_arrived(
                alloc.digest, alloc.qos, self.mtu, app_end.fileno(), alloc.data, peer=f"address {alloc.dst}"
            )
        except (RemoteError, HandlerError) as e:
            mine.close()
            self.fa.refuse(alloc, um.RESULTS.get(e.code, um.E_REFUSED))
            self._after(time.monotonic())
            return
        finally:
            app_end.close()
        try:
            if alloc.state is not State.ARRIVED:
                raise FaError(m.ETIMEDOUT, "the IRMd answered after the request timed out")
            self.fa.accept(alloc, flow_id, data)
        except FaError as e:
            log.info("%s: flow %d not served: %s", self.name, flow_id, e.text)
            self.flow_ended(flow_id, True, mine)
        else:
            self._add_flow(UniFlow(alloc.eid, mine, alloc.dst, alloc.remote_eid, flow_id, qos_cube(alloc.qos)))
        self._after(time.monotonic())

    async def flow_dealloc(self, flow_id: int) -> None:
        flow = self.flows.pop(flow_id, None)
        if flow is not None and self.dt is not None and self.fa is not None:
            self.dt.command(self._close_flow, flow)
            self.fa.dealloc(flow_id)
            self._after(time.monotonic())

    def _close_flow(self, flow: UniFlow) -> None:  # on the DT thread
        assert self.dt is not None
        self.dt.remove_flow(flow.eid)
        flow.io.close()

    # -- state ------------------------------------------------------------------

    def info(self) -> list[m.InfoSection]:
        sections = super().info()
        if self.lsdb is None or self.dir is None or self.fa is None or self.dt is None:
            return sections
        sections[0].rows += [
            ["address", str(self.addr)],
            ["key", "yes" if self.psk else "no (open layer)"],
            ["routing", self.conf["routing"]],
            ["congestion", self.conf["congestion"]],
            ["members", str(len(self.lsdb.db))],
            ["lsdb", self.lsdb.digest()],
            ["directory entries", str(self.dir.size)],
            ["registered", str(len(self.dir.mine))],
            ["flows", str(len(self.flows))],
        ]
        nbs = [[str(nb.addr), nb.name, " ".join(sorted(nb.links))] for nb in self.neighbours]
        table = [[str(d), " ".join(map(str, hops))] for d, hops in sorted(self.routes.items())]
        counters = {
            **dataclasses.asdict(self.dt.counters),
            **self.stats,
            "lsu_forged": self.lsdb.forged,
            "lsu_refused": self.lsdb.refused,
            "lsu_held": self.pacer.held,
            "dht_forged": self.dir.forged,
            "dht_refused": self.dir.refused,
            "dht_misdirected": self.dir.misdirected,
            "dht_replayed": self.dir.replayed,
            "fa_refused": self.fa.refused,
            "fa_replayed": self.fa.replayed,
        }
        flows = [
            flow_counters(f.flow_id, str(f.dst), f.sent, f.delivered, {DROP_APP: f.dropped})
            for f in sorted(self.flows.values(), key=lambda f: f.flow_id)
        ][: m.INFO_ROWS]
        return [
            *sections,
            m.InfoSection("neighbours", ["address", "name", "components"], nbs),
            m.InfoSection("forwarding", ["destination", "next hops"], table),
            m.InfoSection("counters", ["counter", "value"], [[k, str(v)] for k, v in sorted(counters.items())]),
            m.InfoSection("flows", list(m.FLOW_COUNTERS), flows),
        ]

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.fa is not None:
            for flow_id in list(self.flows):
                self.fa.dealloc(flow_id)
            self._send_all(self.fa.pop()[0])
        for nb in self.neighbours:
            for comp in list(nb.links):
                self._drop_link(nb.addr, comp)
        if self.dt is not None:
            self.dt.stop()
        if self.irm is not None:
            self.irm.close()
