"""The unicast IPCP: an application of the layers below that enrolls, routes, keeps the
directory and carries flows across its layer, multi-hop.

Components live in their own modules (pci, dt, routing, dir); this module is
the glue: enrollment, neighbour connections, the flow allocator, timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import random
import time
from typing import Any

from flowlib.aio import AsyncFlow
from flowlib.flow import Flow, flow_alloc
from flowlib.irm import IrmClient
from ipcp.base import Ipcp
from ipcp.unicast import ca
from ipcp.unicast import messages as um
from ipcp.unicast.dir import Directory
from ipcp.unicast.dt import Dt, UniFlow
from ipcp.unicast.pci import PciFormat
from ipcp.unicast.routing import POLICIES, Lsdb
from proto import messages as m
from proto.errors import FlowError
from proto.names import HASHES
from proto.qos import QosSpec
from proto.qos import by_name as qos_by_name
from proto.qos import raw as qos_raw
from transports.channel import HandlerError, RemoteError
from transports.unix import seqpacket_pair
from transports.wire import Message, WireError

log = logging.getLogger(__name__)

TICK = 0.5
HELLO_TIMEOUT = 10.0
ALLOC_TIMEOUT = 10.0
PATH_GRACE = 10.0  # a flow whose destination stays unreachable this long goes down
AUTO = "auto"  # `connect dst auto`: find and connect neighbours by ourselves
AUTO_NEIGHBOURS = 8  # automatic connects stop at this many neighbours
AUTO_RETRY = 10.0  # seconds before trying a member that could not be reached again
DEFAULTS = {"addr": "4", "eid": "8", "ttl": "60", "routing": "link_state", "congestion": "none",
            "hash": "SHA3_256", "directory": "DHT", "addr_auth": "flat", "mtu": "1500"}


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
    except ValueError as e:
        raise HandlerError(m.EINVAL, f"bad unicast options: {e}") from None
    if out["routing"] not in POLICIES or out["hash"] not in HASHES:
        raise HandlerError(m.EINVAL, f"bad routing {out['routing']!r} or hash {out['hash']!r}")
    return out


def proof(key: bytes, nonce: bytes, name: str) -> bytes:
    return hmac.new(key, nonce + name.encode(), hashlib.sha3_256).digest()


@dataclasses.dataclass(eq=False)
class Neighbour:
    addr: int
    name: str
    mgmt: AsyncFlow | None = None
    dt: Flow | None = None
    task: asyncio.Task[None] | None = None


class UnicastIpcp(Ipcp):
    type = "unicast"
    dt_class = Dt

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.conf: dict[str, str] = {}
        self.addr = 0
        self.key = b""
        self.irm: IrmClient | None = None
        self.dt: Dt | None = None
        self.lsdb: Lsdb | None = None
        self.dir: Directory | None = None
        self.mtu = 0
        self.neighbours: dict[int, Neighbour] = {}
        self.via = ""  # the name we enrolled through
        self.auto = False
        self._auto_busy = False
        self._auto_retry: dict[str, float] = {}  # member name -> when to try it again
        self.flows: dict[int, UniFlow] = {}  # by irmd flow id
        self.unreachable: dict[int, float] = {}  # flow id -> since when its dst has no route
        self._allocs: dict[int, asyncio.Future[um.FaReply]] = {}
        self._lookups: dict[bytes, list[asyncio.Future[list[int]]]] = {}

    # -- joining a layer ---------------------------------------------------

    async def bootstrap(self, layer: str, conf: dict[str, str]) -> m.LayerInfo:
        conf = check_conf(conf)
        return await self._start(layer, conf, members=set())

    async def enroll(self, dst: str, key: str = "") -> m.LayerInfo:
        """Ask a member, reached by name through the layers below, for the layer's config."""
        irm = self._client()
        try:
            flow = await asyncio.to_thread(flow_alloc, dst, qos_raw, ALLOC_TIMEOUT, irm=irm)
        except FlowError as e:
            raise HandlerError(m.ENOENT, f"cannot reach {dst!r} to enroll: {e}") from None
        async with AsyncFlow(flow) as af:
            await af.write(um.CODEC.encode(um.Hello(um.ENROLL, self.name)))
            info = await self._expect(af, um.EnrollInfo)
            if info.result == um.E_AUTH and info.nonce:
                if not key:
                    raise HandlerError(m.EPERM, f"layer {info.layer!r} needs a key to enroll (enroll ... key SECRET)")
                await af.write(um.CODEC.encode(um.Proof(proof(key.encode(), info.nonce, self.name))))
                info = await self._expect(af, um.EnrollInfo)
        if info.result != um.OK:
            raise HandlerError(m.EPERM if info.result == um.E_AUTH else m.EIPCP, f"enrollment refused: {info.error}")
        log.info("%s: enrolled in %s through %s", self.name, info.layer, info.name or dst)
        self.via = info.name or dst  # its own name: the layer's name may be ours too soon (autobind)
        return await self._start(info.layer, check_conf(info.conf), members=set(info.members))

    async def _start(self, layer: str, conf: dict[str, str], members: set[int]) -> m.LayerInfo:
        self.conf = conf
        self.key = conf.get("key", "").encode()
        fmt = PciFormat(int(conf["addr"]), int(conf["eid"]))
        while True:
            self.addr = random.randint(1, fmt.max_addr)
            if self.addr not in members:
                break
        self.layer = layer
        self.mtu = int(conf["mtu"]) - fmt.size
        self.lsdb = Lsdb(self.addr, conf["routing"], self.name, time.time())
        self.dir = Directory(self.addr)
        self.dir.reachable = lambda addr: self.dt is not None and addr in self.dt.pff
        self.loop = asyncio.get_running_loop()
        loop = self.loop

        def on_mgmt(pdu: bytes) -> None:  # from the DT thread
            loop.call_soon_threadsafe(self._on_mgmt, pdu)

        def on_n1_down(addr: int) -> None:
            loop.call_soon_threadsafe(self._n1_down, addr)

        def on_congestion(flow: UniFlow, update: ca.Update) -> None:  # on the DT thread
            assert self.dt is not None
            self.dt.send_mgmt(flow.dst, um.CODEC.encode(
                um.FlowUpdate(self.addr, flow.remote_eid, update.ece, update.rate)))

        self.dt = self.dt_class(fmt, self.addr, int(conf["ttl"]), 65536, on_mgmt, on_n1_down,
                                on_congestion if conf["congestion"] == "mb-ecn" else None)
        self.dt.ecmp = conf["routing"] == "ecmp"
        self.dt.start()
        irm = self._client()
        self.loop.add_reader(irm.wakeup_fd, self._on_arrivals)
        await asyncio.to_thread(irm.listen, True)
        self.spawn(self._tick())
        log.info("%s: in layer %s at address %d", self.name, layer, self.addr)
        return m.LayerInfo(layer, conf["hash"], self.mtu)

    def _client(self) -> IrmClient:
        if self.irm is None:
            self.irm = IrmClient(self.irmd_sock)
        return self.irm

    @staticmethod
    async def _expect(af: AsyncFlow, kind: Any) -> Any:
        try:
            sdu = await asyncio.wait_for(af.read(), HELLO_TIMEOUT)
            msg = um.CODEC.decode(sdu).msg
        except (TimeoutError, FlowError, WireError) as e:
            raise HandlerError(m.EIPCP, f"peer did not answer as expected: {e or 'timed out'}") from None
        if not isinstance(msg, kind):
            raise HandlerError(m.EIPCP, f"peer answered {type(msg).__name__}, expected {kind.__name__}")
        return msg

    # -- neighbours ----------------------------------------------------------

    async def connect(self, dst: str, component: str, qos: str, connect: bool) -> None:
        if not self.layer:
            raise HandlerError(m.ENOTCONN, "not in a layer yet")
        if dst == AUTO:
            self.auto = connect
            return
        comps = [component] if component else [um.MGMT, um.DT]
        if not connect:
            for nb in [n for n in self.neighbours.values() if n.name == dst]:
                self._drop_neighbour(nb, comps)
            return
        for comp in comps:
            spec = qos_by_name(qos) if comp == um.DT else qos_raw  # management always rides raw flows
            if comp == um.DT and not spec.frct:
                # DT reads a raw flow's socket itself, past flowlib: its peer's liveness cannot be seen.
                spec = dataclasses.replace(spec, timeout=0)
            try:
                flow = await asyncio.to_thread(flow_alloc, dst, spec, ALLOC_TIMEOUT, irm=self._client())
            except FlowError as e:
                raise HandlerError(m.ENOENT, f"cannot reach {dst!r}: {e}") from None
            af = AsyncFlow(flow)
            try:
                nonce = os.urandom(16)
                await af.write(um.CODEC.encode(um.Hello(comp, self.name, self.layer, self.addr, nonce)))
                hello = await self._expect(af, um.Hello)
                if hello.layer != self.layer:
                    raise HandlerError(m.EINVAL, f"{dst!r} is in layer {hello.layer!r}, not {self.layer!r}")
                if hello.addr == self.addr:  # a name this IPCP answers to itself (the layer's, say)
                    raise HandlerError(m.EINVAL, f"{dst!r} is this IPCP itself")
                if bool(hello.nonce) != bool(self.key):  # a keyed member challenges; a keyless one cannot
                    why = "needs the layer key" if hello.nonce else "does not know the layer key"
                    raise HandlerError(m.EPERM, f"{dst!r} {why}")
                if self.key:
                    await af.write(um.CODEC.encode(um.Proof(proof(self.key, hello.nonce, self.name))))
                    answer = await self._expect(af, um.Proof)
                    if not hmac.compare_digest(answer.mac, proof(self.key, nonce, hello.name)):
                        raise HandlerError(m.EPERM, f"{dst!r} failed to prove the layer key")
            except BaseException:
                af.close()
                raise
            self._add_neighbour(hello.addr, hello.name, comp, af)
            log.info("%s: connected %s to %s (address %d)", self.name, comp, dst, hello.addr)

    def _on_arrivals(self) -> None:
        irm = self._client()
        try:
            arrived = irm.take_arrived()
        except FlowError:  # the IRMd is gone; our control channel closing stops us
            self.loop.remove_reader(irm.wakeup_fd)
            return
        for reply, fd in arrived:
            self.spawn(self._greet(AsyncFlow(Flow(reply, fd, irm))))

    async def _greet(self, af: AsyncFlow) -> None:
        """A member below reached us: it enrolls, or connects a component."""
        try:
            hello = await self._expect(af, um.Hello)
            if hello.component == um.ENROLL:
                await self._enroll_peer(af, hello)
                return
            if hello.component not in (um.MGMT, um.DT) or hello.layer != self.layer:
                raise HandlerError(m.EINVAL, f"unexpected hello {hello.component!r} for layer {hello.layer!r}")
            if hello.addr == self.addr:
                raise HandlerError(m.EINVAL, "a connection from this IPCP itself")
            nonce = os.urandom(16) if self.key else b""  # a challenge only where there is a key
            await af.write(um.CODEC.encode(um.Hello(hello.component, self.name, self.layer, self.addr, nonce)))
            if self.key:
                answer = await self._expect(af, um.Proof)
                if not hmac.compare_digest(answer.mac, proof(self.key, nonce, hello.name)):
                    log.warning("%s: %s failed to prove the layer key; refused", self.name, hello.name)
                    af.close()
                    return
                await af.write(um.CODEC.encode(um.Proof(proof(self.key, hello.nonce, self.name))))
            self._add_neighbour(hello.addr, hello.name, hello.component, af)
            log.info("%s: %s connected %s (address %d)", self.name, hello.name, hello.component, hello.addr)
        except (HandlerError, FlowError) as e:
            log.warning("%s: dropping an N-1 flow: %s", self.name, e)
            af.close()

    async def _enroll_peer(self, af: AsyncFlow, hello: um.Hello) -> None:
        assert self.lsdb is not None
        conf = {k: v for k, v in self.conf.items() if k != "key"}
        if self.key:
            # The enrollee proves the key over our nonce; only then it learns the layer.
            nonce = os.urandom(16)
            await af.write(um.CODEC.encode(um.EnrollInfo(self.layer, {}, [], um.E_AUTH, "prove the key", nonce)))
            answer = await self._expect(af, um.Proof)
            if not hmac.compare_digest(answer.mac, proof(self.key, nonce, hello.name)):
                log.warning("%s: %s failed to prove the layer key; enrollment refused", self.name, hello.name)
                await af.write(um.CODEC.encode(um.EnrollInfo(self.layer, {}, [], um.E_AUTH, "wrong layer key")))
                af.close()
                return
            conf["key"] = self.key.decode()
        await af.write(um.CODEC.encode(um.EnrollInfo(self.layer, conf, sorted(self.lsdb.members), name=self.name)))
        log.info("%s: enrolled %s", self.name, hello.name)
        with contextlib.suppress(TimeoutError, FlowError):
            await asyncio.wait_for(af.read(), HELLO_TIMEOUT)  # until the enrollee closes
        af.close()

    def _add_neighbour(self, addr: int, name: str, comp: str, af: AsyncFlow) -> None:
        assert self.dt is not None and self.lsdb is not None
        nb = self.neighbours.setdefault(addr, Neighbour(addr, name))
        if comp == um.DT:
            if nb.dt is not None:
                nb.dt.close()
            nb.dt = af.flow
            self.dt.add_n1(addr, af.flow.fd)
            self._adjacency_changed()
        else:
            if nb.mgmt is not None:
                nb.mgmt.close()
            if nb.task is not None:
                nb.task.cancel()
            nb.mgmt = af
            nb.task = asyncio.ensure_future(self._serve_mgmt(nb, af))
            for lsu in self.lsdb.all():
                self._send_mgmt_flow(af, lsu)

    def _drop_neighbour(self, nb: Neighbour, comps: list[str]) -> None:
        assert self.dt is not None
        if um.DT in comps and nb.dt is not None:
            self.dt.remove_n1(nb.addr)
            nb.dt.close()
            nb.dt = None
            self._adjacency_changed()
        if um.MGMT in comps and nb.mgmt is not None:
            if nb.task is not None:
                nb.task.cancel()
            nb.mgmt.close()
            nb.mgmt = None
        if nb.dt is None and nb.mgmt is None:
            self.neighbours.pop(nb.addr, None)

    def _n1_down(self, addr: int) -> None:
        nb = self.neighbours.get(addr)
        if nb is not None:
            log.info("%s: data flow to %s (address %d) is down", self.name, nb.name, addr)
            self._drop_neighbour(nb, [um.DT])

    async def _serve_mgmt(self, nb: Neighbour, af: AsyncFlow) -> None:
        assert self.lsdb is not None
        while True:
            try:
                sdu = await af.read()
            except FlowError:
                log.info("%s: management flow to %s is down", self.name, nb.name)
                self.loop.call_soon(self._drop_neighbour, nb, [um.MGMT])
                return
            try:
                msg = um.CODEC.decode(sdu).msg
            except WireError as e:
                log.warning("%s: bad management message from %s: %s", self.name, nb.name, e)
                continue
            if isinstance(msg, um.Lsu) and self.lsdb.receive(msg, time.monotonic()):
                self._flood(msg, exclude=nb.addr)
                self._recompute()

    def _send_mgmt_flow(self, af: AsyncFlow, msg: Message) -> None:
        try:
            af.flow.write(um.CODEC.encode(msg))
        except FlowError as e:
            log.debug("%s: management write failed: %s", self.name, e)

    def _flood(self, lsu: um.Lsu, exclude: int = 0) -> None:
        for nb in self.neighbours.values():
            if nb.mgmt is not None and nb.addr != exclude:
                self._send_mgmt_flow(nb.mgmt, lsu)

    def _adjacency_changed(self) -> None:
        assert self.lsdb is not None
        live = {a for a, nb in self.neighbours.items() if nb.dt is not None}
        self._flood(self.lsdb.set_neighbours(live, time.monotonic()))
        self._recompute()

    def _recompute(self) -> None:
        assert self.dt is not None and self.lsdb is not None and self.dir is not None
        self.dt.pff = self.lsdb.table()
        # Directory entries live only at members we can reach: others would drop them unseen.
        self._send_all(self.dir.set_members(set(self.dt.pff) | {self.addr}, time.monotonic()))

    # -- management PDUs (flow allocator, directory) ---------------------------

    def _send(self, dst: int, msg: Message) -> bool:
        assert self.dt is not None
        return self.dt.send_mgmt(dst, um.CODEC.encode(msg))

    def _send_all(self, out: list[tuple[int, Message]]) -> None:
        for dst, msg in out:
            self._send(dst, msg)

    def _on_mgmt(self, payload: bytes) -> None:
        assert self.dir is not None
        try:
            msg = um.CODEC.decode(payload).msg
        except WireError as e:
            log.debug("%s: dropped a management PDU: %s", self.name, e)
            return
        now = time.monotonic()
        match msg:
            case um.DhtStore() | um.DhtFind() | um.DhtFound():
                self._send_all(self.dir.receive(msg, now))
                self._deliver_lookups()
            case um.FaReq():
                self.spawn(self._fa_arrived(msg))
            case um.FaReply():
                fut = self._allocs.pop(msg.d_eid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            case um.FlowUpdate():
                assert self.dt is not None
                self.dt.on_update(msg.eid, ca.Update(msg.ece, msg.rate))
            case um.FaDealloc():
                flow = next((f for f in self.flows.values()
                             if f.eid == msg.d_eid and f.dst == msg.src and f.remote_eid == msg.s_eid), None)
                if flow is not None:
                    self._end_flow(flow, down=False)

    def _deliver_lookups(self) -> None:
        assert self.dir is not None
        for key, addrs in self.dir.resolved:
            for fut in self._lookups.pop(key, []):
                if not fut.done():
                    fut.set_result(addrs)
        self.dir.resolved.clear()

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
            self._deliver_lookups()
        return await fut

    async def reg(self, digest: bytes, register: bool) -> None:
        if self.dir is None:
            raise HandlerError(m.ENOTCONN, "not in a layer yet")
        self._send_all(self.dir.register(digest, register, time.monotonic()))

    async def query(self, digest: bytes) -> bool:
        return bool(await self._lookup(digest))

    def _new_eid(self) -> int:
        assert self.dt is not None
        while True:
            eid = random.randint(1, min(self.dt.fmt.max_eid, 2**63 - 1))
            if eid not in self.dt.flows and eid not in self._allocs:
                return eid

    async def flow_alloc(self, flow_id: int, digest: bytes, qos: QosSpec, timeout: float,
                         data: bytes) -> tuple[int, int, bytes]:
        assert self.dt is not None
        addrs = await self._lookup(digest)
        if not addrs:
            raise HandlerError(m.ENOENT, "name not found in the layer's directory")
        reply, dst = await self._request_flow(digest, qos, addrs, min(timeout, ALLOC_TIMEOUT))
        if reply.result != um.OK:
            assert self.dir is not None
            self.dir.cache.pop(digest, None)  # stale: the next lookup asks again
            raise HandlerError(m.ENOENT if reply.result == um.E_NOENT else m.EIPCP, "the destination refused the flow")
        app_end, mine = seqpacket_pair()
        flow = UniFlow(reply.d_eid, mine, dst, reply.s_eid, flow_id, qos_cube(qos))
        self.flows[flow_id] = flow
        self.dt.add_flow(flow)
        return self.mtu, app_end.detach(), b""  # TODO(fa): carry the piggyback on the wire

    async def _request_flow(self, digest: bytes, qos: QosSpec, addrs: list[int],
                            timeout: float) -> tuple[um.FaReply, int]:
        """Ask the members registered for the name in turn, those we have a route to first: an
        entry may outlive its member (a host rebooted under a new address)."""
        assert self.dt is not None
        pff = self.dt.pff
        addrs = sorted(addrs, key=lambda a: a != self.addr and a not in pff)
        deadline = time.monotonic() + timeout
        why = ""
        for i, dst in enumerate(addrs):
            eid = self._new_eid()
            fut: asyncio.Future[um.FaReply] = self.loop.create_future()
            self._allocs[eid] = fut
            if not self._send(dst, um.FaReq(self.addr, eid, digest, qos)):
                self._allocs.pop(eid, None)
                why = why or f"no route to address {dst}"
                continue
            left = deadline - time.monotonic()
            try:  # the last one may take what is left; the others share it
                return await asyncio.wait_for(fut, left if i == len(addrs) - 1 else left / 2), dst
            except TimeoutError:
                why = f"address {dst} did not answer the flow request"
            finally:
                self._allocs.pop(eid, None)
        raise HandlerError(m.ETIMEDOUT if "answer" in why else m.ENOTCONN, why)

    async def _fa_arrived(self, req: um.FaReq) -> None:
        assert self.dt is not None
        app_end, mine = seqpacket_pair()
        try:
            flow_id, _ = await self.flow_arrived(req.hash, req.qos, self.mtu, app_end.fileno())
        except (RemoteError, HandlerError) as e:
            mine.close()
            self._send(req.src, um.FaReply(self.addr, 0, req.s_eid, um.E_NOENT if e.code == m.ENOENT else um.E_REFUSED))
            return
        finally:
            app_end.close()
        flow = UniFlow(self._new_eid(), mine, req.src, req.s_eid, flow_id, qos_cube(req.qos))
        self.flows[flow_id] = flow
        self.dt.add_flow(flow)
        self._send(req.src, um.FaReply(self.addr, flow.eid, req.s_eid))

    async def flow_dealloc(self, flow_id: int) -> None:
        flow = self.flows.pop(flow_id, None)
        if flow is not None and self.dt is not None:
            self.dt.remove_flow(flow.eid)
            flow.io.close()
            self._send(flow.dst, um.FaDealloc(self.addr, flow.eid, flow.remote_eid))

    def _end_flow(self, flow: UniFlow, down: bool) -> None:
        assert self.dt is not None
        self.flows.pop(flow.flow_id, None)
        self.unreachable.pop(flow.flow_id, None)
        self.dt.remove_flow(flow.eid)
        self.flow_ended(flow.flow_id, down, flow.io)

    # -- timers ----------------------------------------------------------------

    async def _tick(self) -> None:
        assert self.lsdb is not None and self.dir is not None and self.dt is not None
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            due, expired = self.lsdb.tick(now)
            if due is not None:
                self._flood(due)
            if expired:
                self._recompute()
            self._send_all(self.dir.tick(now))
            self._deliver_lookups()
            if self.auto and not self._auto_busy and (target := self._auto_target(now)):
                self.spawn(self._auto_connect(target, now))
            for flow in list(self.flows.values()):
                if flow.dst in self.dt.pff:
                    self.unreachable.pop(flow.flow_id, None)
                elif now - self.unreachable.setdefault(flow.flow_id, now) > PATH_GRACE:
                    log.info("%s: flow %d: no path to %d; down", self.name, flow.flow_id, flow.dst)
                    self._end_flow(flow, down=True)

    def _auto_target(self, now: float) -> str | None:
        """Whom to connect next on our own: with no neighbour, whoever answers to the name we
        enrolled through; then members reachable by name in the layers below (LAN neighbours).

        Of two members only the one with the lower address connects, so they never cross.
        """
        assert self.lsdb is not None
        if not self.neighbours:  # a bootstrapper waits to be connected to
            return self.via if self.via and self._auto_retry.get(self.via, 0.0) <= now else None
        if len(self.neighbours) >= AUTO_NEIGHBOURS:
            return None
        linked = {nb.name for nb in self.neighbours.values()}
        for addr, name in sorted(self.lsdb.names().items()):
            if addr > self.addr and addr not in self.neighbours and name not in linked \
                    and self._auto_retry.get(name, 0.0) <= now:
                return name
        return None

    async def _auto_connect(self, dst: str, now: float) -> None:
        self._auto_busy = True
        try:
            await self.connect(dst, "", "raw", True)
        except HandlerError as e:
            log.info("%s: automatic connect to %s failed: %s", self.name, dst, e.text)
            self._auto_retry[dst] = now + AUTO_RETRY
        finally:
            self._auto_busy = False

    async def stop(self) -> None:
        for flow in list(self.flows.values()):
            self._send(flow.dst, um.FaDealloc(self.addr, flow.eid, flow.remote_eid))
        for nb in list(self.neighbours.values()):
            self._drop_neighbour(nb, [um.MGMT, um.DT])
        if self.dt is not None:
            self.dt.stop()
        if self.irm is not None:
            self.irm.close()
