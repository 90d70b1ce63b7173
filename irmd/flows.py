"""Flows: allocation through the layers that reach a name, acceptance by a bound process (starting
one if need be), arrival from IPCPs, deallocation and teardown. Data never passes here; the IRMd
hands descriptors along and keeps a copy of each application's end to end flows it brokered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from typing import TYPE_CHECKING

from irmd import policy, views
from irmd.identity import read_peer
from irmd.limits import share
from irmd.reg import Flow, FlowEvent, FlowState, Ipcp
from irmd.reg.flow import try_next_layer, worse
from irmd.reg.ipcp import by_preference, settled
from proto import messages as m
from proto.errors import (
    FlowError,
    FlowTimeout,
    IpcpFailed,
    LimitReached,
    NotFound,
    ProtocolError,
    error_class,
)
from proto.names import check_name, name_hash
from proto.qos import QosSpec
from transports.channel import ChannelClosed, RemoteError
from transports.unix import close_own, seqpacket_fds
from transports.wire import Message

if TYPE_CHECKING:
    from collections.abc import Iterator

    from irmd.core import Irmd
    from irmd.server import Client

COUNTED = ["sent", "received", "dropped"]  # of m.FLOW_COUNTERS, those `irm flow list` shows
log = logging.getLogger("irmd")

QUERY_TIMEOUT = 3.0
ALLOC_TIMEOUT = 15.0
ACCEPT_TIMEOUT = 10.0  # how long an arriving flow waits for a process to accept it


def count(cell: str) -> int:
    """An IPCP's counter cell as a number; -1 if it is none (an IPCP's word is not trusted to be one)."""
    return int(cell) if cell.isdigit() and len(cell) <= 19 else -1


def teardown_fd(fd: int) -> None:
    """Shut the application's end down, so whoever holds it sees the flow end."""
    if fd < 0:
        return
    with contextlib.suppress(OSError):
        # family and type given: shutdown and close are all we do, and they need not be asked for
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fd)
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.close()


class Flows:
    def __init__(self, irmd: Irmd) -> None:
        self.irmd = irmd
        self.reg = irmd.reg
        self.under_way: Counter[int] = Counter()  # users' allocations under way, by uid (admins' not counted)
        self.parked: Counter[int] = Counter()  # users' flow_accept calls waiting, by uid (admins' not counted)

    # -- applications ----------------------------------------------------

    async def proc_announce(self, c: Client, msg: m.ProcAnnounce, _: list[int]) -> m.Ok:
        c.prog = msg.prog  # a label only: who it is, the kernel says (read again: it may have exec'd)
        if c.conn_id:
            admin = policy.is_admin(c.uid, self.irmd.uid)  # the ids are the socket's: they stay
            fresh = read_peer(c.pid, c.uid, c.peer.gid, c.peer.groups, argv=admin)
            if fresh.start == c.peer.start:
                c.peer = fresh
        await self.irmd.notify_acceptors()
        return m.Ok()

    def limit_flows(self, uid: int, ipcp: Ipcp | None = None) -> None:
        """A user other than root and the IRMd's holds at most flows_per_uid flows, either end, and
        all of them together flows_total. Of an IPCP with a flow capacity of its own (a shim's
        endpoints: eth-llc has 62), a user holds at most ipcp_share_per_uid percent and all users
        together ipcp_share_users: one user's flows, allocated or accepted, once took all of them."""
        if policy.is_admin(uid, self.irmd.uid):
            return
        limits = self.irmd.limits
        held = self.reg.flows_of_uid(uid)
        if held >= limits.flows_per_uid:
            raise LimitReached(f"uid {uid} holds {held} flows (limit flows_per_uid={limits.flows_per_uid})")

        def admin(u: int) -> bool:
            return policy.is_admin(u, self.irmd.uid)

        users = self.reg.flows_of_users(admin)
        if users >= limits.flows_total:
            raise LimitReached(f"users hold {users} flows (limit flows_total={limits.flows_total})")
        if ipcp is None or ipcp.flows <= 0:
            return
        of = f"of ipcp {ipcp.name!r} (layer {ipcp.layer!r}), which holds {ipcp.flows} flows at most"
        most = share(ipcp.flows, limits.ipcp_share_per_uid)
        if (held := self.reg.flows_of_uid_at(uid, ipcp.name)) >= most:
            raise LimitReached(
                f"uid {uid} holds {held} flows {of} (limit ipcp_share_per_uid={limits.ipcp_share_per_uid}%: {most})"
            )
        most = share(ipcp.flows, limits.ipcp_share_users)
        if (users := self.reg.flows_of_users(admin, ipcp.name)) >= most:
            raise LimitReached(
                f"users hold {users} flows {of} (limit ipcp_share_users={limits.ipcp_share_users}%: {most})"
            )

    def limit_remote(self, ipcp: Ipcp, peer: str) -> None:
        """A remote peer holds at most flows_per_peer flows of an IPCP, whoever accepts them, admins too:
        one peer allocating to a server that takes every flow held all of a udp shim's 4,096 flows (and as
        many descriptors of the IRMd's), and nobody else got one."""
        most = self.irmd.limits.flows_per_peer
        if (held := self.reg.flows_of_remote(ipcp.name, peer)) >= most:
            raise LimitReached(
                f"{peer} holds {held} flows of ipcp {ipcp.name!r} (layer {ipcp.layer!r}) (limit flows_per_peer={most})"
            )

    @contextlib.contextmanager
    def allocating(self, uid: int) -> Iterator[None]:
        """Hold one of the user's places among the allocations under way, or refuse with EDQUOT. An
        allocation holds places in pools its IPCP shares among all users (a shim's outstanding name
        queries, a unicast layer's directory lookups): allocations to names nobody answers, kept
        coming, once held all of them, and everyone's names went unresolved. Admins are not counted."""
        with self.holding(self.under_way, uid, "allocations under way", "allocs"):
            yield

    @contextlib.contextmanager
    def holding(self, held: Counter[int], uid: int, what: str, key: str) -> Iterator[None]:
        """Count one more of `what` for `uid` in `held` while the block runs, or refuse with EDQUOT past
        the limits `{key}_per_uid` and `{key}_total`. Admins are not counted."""
        if policy.is_admin(uid, self.irmd.uid):
            yield
            return
        per_uid, total = f"{key}_per_uid", f"{key}_total"
        if (mine := held[uid]) >= (most := getattr(self.irmd.limits, per_uid)):
            raise LimitReached(f"uid {uid} has {mine} {what} (limit {per_uid}={most})")
        if (users := held.total()) >= (most := getattr(self.irmd.limits, total)):
            raise LimitReached(f"users have {users} {what} (limit {total}={most})")
        held[uid] += 1
        try:
            yield
        finally:
            held[uid] -= 1
            if not held[uid]:
                del held[uid]

    async def flow_alloc(self, c: Client, msg: m.FlowAlloc, _: list[int]) -> tuple[m.FlowReply, list[int]]:
        check_name(msg.name)
        self.limit_flows(c.uid)
        with self.allocating(c.uid):
            return await self._alloc(c, msg)

    async def _alloc(self, c: Client, msg: m.FlowAlloc) -> tuple[m.FlowReply, list[int]]:
        timeout = msg.timeout if msg.timeout and msg.timeout > 0 else ALLOC_TIMEOUT
        deadline = time.monotonic() + timeout
        error: FlowError = NotFound(f"name {msg.name!r} not found in any layer")
        if msg.join:
            hits = [i for i in self.reg.operational() if i.type == "broadcast" and i.layer == msg.name]
            if not hits:
                raise NotFound(f"no broadcast layer {msg.name!r} here to join")
        else:
            hits = await self.resolve(msg.name, min(timeout, QUERY_TIMEOUT))
        for ipcp in hits:
            try:
                return await self.alloc_via(c, msg, ipcp, deadline)
            except FlowError as e:
                if e.code is None:
                    raise
                if worse(error.code or "", e.code):
                    error = e
                if not try_next_layer(e.code):
                    break
        raise error

    async def alloc_via(
        self,
        c: Client,
        msg: m.FlowAlloc,
        ipcp: Ipcp,
        deadline: float,
    ) -> tuple[m.FlowReply, list[int]]:
        """Allocate through one IPCP: it reaches the name's hash in its layer. A flow that stays on this
        host (the local layer's: made by its IPCP, or by us as direct IPC) comes with both ends: the
        accepting one arrives here at once."""
        assert ipcp.channel is not None
        digest = name_hash(ipcp.hash, msg.name)
        # Checked again where the flow is counted: the allocations a user sent at once all passed the
        # first check while their names were being resolved (several layers asked), none counted yet;
        # and only here is the IPCP known, whose flows a user may hold a share of.
        self.limit_flows(c.uid, ipcp)
        flow = self.reg.new_flow(
            owner=c.conn_id, pid=c.pid, uid=c.uid, gid=c.peer.gid, groups=c.peer.groups, name=msg.name,
            layer=ipcp.layer, ipcp=ipcp.name, qos=msg.qos, role="src",
        )  # fmt: skip
        remaining = max(deadline - time.monotonic(), 0.1)
        where = f"flow to {msg.name!r} via {ipcp.layer!r}"
        # OAP: a fresh header each attempt, signed with the name's client certificate for admins only
        attempt = self.irmd.oap.request(msg.name, msg.qos, msg.join, host=c.caller.admin)
        reply: Message
        try:
            if self.direct(c, ipcp, digest):
                reply, fds = m.IpcpFlow(ipcp.mtu), list(seqpacket_fds())
            else:
                reply, fds = await ipcp.channel.request(
                    m.IpcpFlowAlloc(flow.flow_id, digest, msg.qos, remaining, attempt.data), timeout=remaining + 1.0
                )
        except RemoteError as e:
            self.reg.drop_flow(flow)
            raise error_class(e.code)(f"{where}: {e.text}") from None
        except (TimeoutError, ChannelClosed) as e:
            self.reg.drop_flow(flow)
            raise FlowTimeout(f"{where}: {str(e) or 'timed out'}") from None
        # Both ends only from the local layer: its pairs alone may arrive here with the allocator as peer.
        if not isinstance(reply, m.IpcpFlow) or len(fds) != (2 if ipcp.type == "local" else 1):
            close_own(fds)
            self.reg.drop_flow(flow)
            raise IpcpFailed(f"ipcp {ipcp.name} answered the allocation wrongly")
        answer = reply.data
        if len(fds) == 2:
            try:
                answer = await self.arrive_here(ipcp, flow, digest, reply.mtu, fds.pop(), attempt.data, deadline)
            except FlowError as e:
                close_own(fds)
                raise error_class(e.code or "EIO")(f"{where}: {e}") from None
            except BaseException:
                close_own(fds)
                raise
        flow.fd, flow.mtu = os.dup(fds[0]), reply.mtu
        if flow.advance(FlowEvent.ALLOCATED) is not FlowState.ALLOCATED:
            self.end_flow(flow, FlowEvent.DOWN)  # it ended before its answer came: the application sees the end
        try:
            if c.conn_id not in self.irmd.clients:  # the application left while we waited
                raise ChannelClosed("client gone")
            outcome = self.irmd.oap.complete(attempt, answer)  # OAP: the peer's answer checked
        except BaseException:  # whatever failed (a peer's answer included), the flow and its fds go
            close_own(fds)
            await self.release(flow)
            raise
        local = ipcp.type == "local"
        return outcome.reply(m.FlowReply(flow.flow_id, flow.layer, flow.mtu, flow.qos, msg.name, no_wire=local)), fds

    def direct(self, c: Client, ipcp: Ipcp, digest: bytes) -> bool:
        """Direct IPC, as 0.23's (on unless built without): a flow of the local layer between processes of
        one user is a socket pair the IRMd makes itself, the IPCP not asked, when every process ready to
        accept the name is that user's; else (another user's server, none ready yet) the IPCP makes it.
        The arrival is served the same either way (acceptor, limits, OAP, the peer's uid and pid)."""
        if ipcp.type != "local":
            return False
        entry = self.reg.name_for_hash(ipcp.name, ipcp.hash, digest)
        if entry is None:
            return False
        ready = [a for a in self.irmd.clients.values() if a.accepting and self.reg.bound(entry, a.acceptor)]
        return bool(ready) and all(a.uid == c.uid for a in ready)

    async def arrive_here(
        self, ipcp: Ipcp, src: Flow, digest: bytes, mtu: int, fd: int, data: bytes, deadline: float
    ) -> bytes:
        """The accepting end of a flow that stays on this host, served as an arrival from `ipcp` would be;
        the two ends know each other here (see release_pair). Returns the OAP answer; fails as the arrival
        does."""
        assert ipcp.channel is not None
        try:
            peer_id, answer = await self.arrive(ipcp, digest, src.qos, mtu, fd, data, src, deadline=deadline)
        except BaseException:
            self.reg.drop_flow(src)
            raise
        finally:
            close_own([fd])
        src.peer, self.reg.flows[peer_id].peer = peer_id, src.flow_id
        return answer

    async def resolve(self, name: str, timeout: float) -> list[Ipcp]:
        """The operational IPCPs that reach `name`, the most local first."""
        candidates = self.reg.operational()
        if not candidates:
            raise NotFound(f"name {name!r} not found: no layers are up")
        if len(candidates) == 1:  # no layer to choose: its allocation resolves the name (ENOENT if it cannot)
            return candidates

        async def query(ipcp: Ipcp) -> Ipcp | None:
            assert ipcp.channel is not None
            try:
                await ipcp.channel.request(m.IpcpQuery(name_hash(ipcp.hash, name)), timeout=timeout)
            except (RemoteError, TimeoutError, ChannelClosed):
                return None
            return ipcp

        # Answers come in any order; stop waiting once no pending layer would be tried first.
        pending = {asyncio.ensure_future(query(i)): i for i in candidates}
        hits: list[Ipcp] = []
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del pending[task]
                    if (hit := task.result()) is not None:
                        hits.append(hit)
                if settled(hits, pending.values()):
                    break
        finally:
            for task in pending:
                task.cancel()
        if not hits:
            raise NotFound(f"name {name!r} not found in any layer")
        return by_preference(hits)

    async def flow_accept(self, c: Client, msg: m.FlowAccept, _: list[int]) -> tuple[m.FlowReply, list[int]]:
        waiting, limit = sum(1 for f in c.accepts if not f.done()), self.irmd.limits.accepts_per_conn
        if waiting >= limit:
            raise LimitReached(
                f"{waiting} accepts are waiting on this connection already (limit accepts_per_conn={limit})"
            )
        # Each waiting accept holds the IRMd's memory; a user's connections together once parked
        # accepts_per_conn times conns_per_uid of them.
        with self.holding(self.parked, c.uid, "accepts waiting", "accepts"):
            fut: asyncio.Future[tuple[m.FlowReply, int]] = asyncio.get_running_loop().create_future()
            c.accepts.append(fut)
            c.serves, c.cypher_s = True, msg.cypher_s
            await self.irmd.notify_acceptors()
            try:
                reply, fd = await asyncio.wait_for(fut, msg.timeout if msg.timeout and msg.timeout > 0 else None)
            except TimeoutError:
                raise FlowTimeout(f"no flow arrived within {msg.timeout} s") from None
            finally:
                with contextlib.suppress(ValueError):
                    c.accepts.remove(fut)
        return reply, [fd]

    async def flow_listen(self, c: Client, msg: m.FlowListen, _: list[int]) -> m.Ok:
        c.listening, c.cypher_s = msg.enabled, msg.cypher_s
        c.serves |= msg.enabled
        await self.irmd.notify_acceptors()
        return m.Ok()

    async def flow_dealloc(self, c: Client, msg: m.FlowDealloc, _: list[int]) -> m.Ok:
        """The flow is the owner's no more at once (its limits, its lists); its IPCP and its peer learn
        of it in the background, so the request (a notice, from flowlib) never waits on the layer."""
        flow = self._held(c, msg.flow_id)
        if flow.peer:
            self.release_pair(flow)
        else:
            self.reg.drop_flow(flow)
            self.irmd.spawn_task(self.release(flow))
        return m.Ok()

    async def flow_info(self, c: Client, msg: m.FlowInfo, _: list[int]) -> m.FlowInfo:
        """How the flow stands; asked with `counters`, also what its IPCP counted of its SDUs."""
        flow = self.reg.flows.get(msg.flow_id)
        if flow is None or flow.owner != c.conn_id:
            return m.FlowInfo(msg.flow_id, FlowState.DEALLOC.value)
        if not msg.counters:
            return m.FlowInfo(msg.flow_id, flow.state.value)
        row = (await self.counts([flow])).get(flow.flow_id)
        if row is None:
            return m.FlowInfo(msg.flow_id, flow.state.value, ipcp=flow.ipcp)
        sent, received, dropped, drops = row
        if sent == m.DIRECT:
            return m.FlowInfo(msg.flow_id, flow.state.value, ipcp=flow.ipcp, data=m.DIRECT)
        return m.FlowInfo(
            msg.flow_id,
            flow.state.value,
            ipcp=flow.ipcp,
            data="ipcp",
            sent=count(sent),
            received=count(received),
            dropped=count(dropped),
            drops=drops,
        )

    async def flow_peer(self, c: Client, msg: m.FlowPeer, _: list[int]) -> m.FlowPeer:
        """The remote host a flow the caller holds came from, as its layer named it (m.FlowPeer)."""
        return m.FlowPeer(msg.flow_id, self._held(c, msg.flow_id).remote)

    def _held(self, c: Client, flow_id: int) -> Flow:
        """The flow `flow_id` if the caller's connection holds it, else NotFound (whoever else's it is)."""
        flow = self.reg.flows.get(flow_id)
        if flow is None or flow.owner != c.conn_id:
            raise NotFound(f"flow {flow_id} not found")
        return flow

    async def flow_list(self, c: Client, msg: m.FlowList, _: list[int]) -> m.Table:
        flows = [f for f in list(self.reg.flows.values()) if policy.visible(c.caller, f.uid)]
        counted = await self.counts(flows)
        rows = (
            (f.flow_id, {"id": str(f.flow_id), "pid": str(f.pid), "name": f.name, "role": f.role,
                         "layer": f.layer, "ipcp": f.ipcp, "state": f.state.value, "mtu": str(f.mtu),
                         "qos": "reliable" if f.qos.reliable else "best-effort",
                         **dict(zip(COUNTED, counted.get(f.flow_id, ["-"] * len(COUNTED)), strict=False))})
            for f in flows
        )  # fmt: skip
        return views.page(
            ["id", "pid", "name", "role", "layer", "ipcp", "state", "mtu", "qos", *COUNTED], rows, msg.start
        )

    async def counts(self, flows: list[Flow]) -> dict[int, list[str]]:
        """Flow id -> its m.FLOW_COUNTERS after flow and dst (sent, received, dropped, drops) where its
        IPCP said them: DIRECT for the local layer's flows, whose SDUs go from one application's
        socket to the other's without a process between them."""
        out: dict[int, list[str]] = {}
        asked: list[Flow] = []
        for f in flows:
            ipcp = self.reg.ipcps.get(f.ipcp)
            if ipcp is not None and ipcp.type == "local":
                out[f.flow_id] = [m.DIRECT] * 3 + [""]
            else:
                asked.append(f)
        counted = await self._counters({f.ipcp for f in asked})
        for f in asked:
            if (row := counted.get((f.ipcp, f.flow_id))) is not None:
                out[f.flow_id] = row
        return out

    async def _counters(self, names: set[str]) -> dict[tuple[str, int], list[str]]:
        """The per-flow counters of the IPCPs that keep them: (ipcp, flow id) -> FLOW_COUNTERS[2:]. Each
        IPCP's info is shared with whoever asks it meanwhile (Ipcps.infos); the caller keeps the rows of
        the flows it asked of, which are those it may see."""
        ipcps = [i for name in sorted(names) if (i := self.reg.ipcps.get(name)) is not None]
        infos = await asyncio.gather(*(self._info(i) for i in ipcps))
        counted: dict[tuple[str, int], list[str]] = {}
        width = len(m.FLOW_COUNTERS)
        for ipcp, info in zip(ipcps, infos, strict=True):
            for section in info.sections if info is not None else []:
                if section.name == "flows" and tuple(section.columns[:width]) == m.FLOW_COUNTERS:
                    for row in section.rows:
                        if len(row) >= width and row[0].isdigit():
                            counted[(ipcp.name, int(row[0]))] = row[2:width]
        return counted

    async def _info(self, ipcp: Ipcp) -> m.IpcpInfo | None:
        try:
            return await asyncio.wait_for(self.irmd.ipcps.infos.get(ipcp), QUERY_TIMEOUT)
        except (FlowError, TimeoutError) as e:
            log.debug("counters of %s: %s", ipcp.name, e)
            return None

    # -- ends of flows --------------------------------------------------------

    async def release(self, flow: Flow) -> None:
        """The owner is done with the flow: tell its IPCP, then tear our copy down. While the flow is up,
        the IPCP's answer is awaited: by then its peer knows the flow was deallocated (FlowPeerDealloc),
        before it sees its end close; a flow that ended already just lets the IPCP know."""
        if flow.peer:
            self.release_pair(flow)
            return
        self.reg.drop_flow(flow)
        ipcp = self.reg.ipcps.get(flow.ipcp)
        if (
            flow.state is not FlowState.PENDING
            and ipcp is not None
            and ipcp.channel is not None
            and not self.irmd.stopping
        ):
            if flow.state is not FlowState.ALLOCATED:
                ipcp.channel.notify(m.IpcpFlowDealloc(flow.flow_id))
            else:
                try:
                    await ipcp.channel.request(m.IpcpFlowDealloc(flow.flow_id), timeout=QUERY_TIMEOUT)
                except (RemoteError, TimeoutError, ChannelClosed) as e:
                    log.debug("dealloc of flow %d at %s: %s", flow.flow_id, ipcp.name, e)
        teardown_fd(flow.fd)
        flow.fd = -1

    def release_pair(self, flow: Flow) -> None:
        """An end of a flow whose two ends the local layer handed to us (it keeps nothing of them): the
        other end learns here that its peer let go (FlowInfo, then its socket ends), as FlowPeerDealloc
        from a layer would tell it. One shutdown ends a socket pair both ways: the other end's, so this
        end's copy is only closed (when the other end went first, it is closed already)."""
        self.reg.drop_flow(flow)
        peer = self.reg.flows.get(flow.peer)
        if peer is not None and peer.state is FlowState.ALLOCATED:
            self.end_flow(peer, FlowEvent.PEER_DEALLOC)
            close_own([flow.fd])
        else:
            teardown_fd(flow.fd)
        flow.fd = -1

    async def release_all(self, c: Client) -> None:
        for flow in list(self.reg.flows_of(owner=c.conn_id)):
            await self.release(flow)

    def end_flow(self, flow: Flow, event: FlowEvent) -> None:
        """The flow ended under its owner: record how, tell the owner (so it need not ask when it sees
        the end: the notice goes first), and tear it down."""
        flow.advance(event)
        owner = self.irmd.clients.get(flow.owner)
        if owner is not None and owner.channel is not None and flow.fd >= 0:
            owner.channel.notify(m.FlowInfo(flow.flow_id, flow.state.value))
        teardown_fd(flow.fd)
        flow.fd = -1

    def ipcp_gone(self, ipcp: Ipcp) -> None:
        for flow in self.reg.flows_of(ipcp=ipcp.name):
            self.end_flow(flow, FlowEvent.DOWN)

    def tear_down_all(self) -> None:
        for flow in list(self.reg.flows.values()):
            teardown_fd(flow.fd)

    async def flow_peer_dealloc(self, c: Client, msg: m.FlowPeerDealloc, _: list[int]) -> m.Ok:
        flow = self.reg.flows.get(msg.flow_id)
        if flow is not None and c.ipcp is not None and flow.ipcp == c.ipcp.name:
            self.end_flow(flow, FlowEvent.DOWN if msg.down else FlowEvent.PEER_DEALLOC)
        return m.Ok()

    # -- flows arriving from IPCPs -----------------------------------------

    async def flow_req_arrived(self, c: Client, msg: m.FlowReqArrived, fds: list[int]) -> m.IpcpFlowAccepted:
        """A peer asks, through IPCP `c`, for a flow to a name registered in its layer."""
        ipcp = c.ipcp
        assert ipcp is not None
        if len(fds) != 1:
            raise ProtocolError("FlowReqArrived must carry exactly one fd")
        src = self.local_source(ipcp, msg.src_flow)
        flow_id, answer = await self.arrive(ipcp, msg.hash, msg.qos, msg.mtu, fds[0], msg.data, src, msg.peer)
        return m.IpcpFlowAccepted(flow_id, answer)

    async def arrive(
        self,
        ipcp: Ipcp,
        digest: bytes,
        qos: QosSpec,
        mtu: int,
        fd: int,
        data: bytes,
        src: Flow | None,
        peer: str = "",
        deadline: float | None = None,
    ) -> tuple[int, bytes]:
        """Hand an arriving flow (`fd`, the application's end; the caller keeps its copy) to a process that
        accepts its name, once OAP checked the request `data`; the new flow's id and the OAP answer.
        `src`: the allocating end, when it is on this host; `deadline`: its allocation's."""
        entry = self.reg.name_for_hash(ipcp.name, ipcp.hash, digest)
        if entry is None:
            raise NotFound("no name with that hash is registered here")
        in_flight = self.irmd.oap.startup(
            ipcp.layer, peer, src.uid if src else None, src is not None and policy.is_admin(src.uid, self.irmd.uid)
        )
        with in_flight:  # OAP: in flight, bounded
            acceptor = await self.wait_acceptor(entry.name, deadline)
            self.limit_flows(acceptor.uid, ipcp)  # the flows a user's server accepts are its own
            remote = peer if src is None else ""  # a peer on a wire (a local allocator is a user: counted)
            if remote:
                self.limit_remote(ipcp, remote)
            # OAP: checked, answered; a request from this host's own allocation was never on a wire
            answer, outcome = self.irmd.oap.serve(entry.name, data, acceptor.cypher_s, replay=src is None)
        flow = self.reg.new_flow(
            owner=acceptor.conn_id, pid=acceptor.pid, uid=acceptor.uid, gid=acceptor.peer.gid,
            groups=acceptor.peer.groups, name=entry.name, layer=ipcp.layer, ipcp=ipcp.name, qos=qos, role="dst",
            mtu=mtu, remote=remote,
        )  # fmt: skip
        flow.advance(FlowEvent.ALLOCATED)
        flow.fd = os.dup(fd)
        reply = outcome.reply(
            m.FlowReply(
                flow.flow_id,
                flow.layer,
                flow.mtu,
                flow.qos,
                entry.name,
                src.uid if src else -1,
                src.pid if src else 0,
                no_wire=ipcp.type == "local",
                peer_gid=src.gid if src else -1,
                peer_groups=list(src.groups) if src and src.groups is not None else None,
            )
        )
        waiting = next((f for f in acceptor.accepts if not f.done()), None)
        if waiting is not None:
            waiting.set_result((reply, os.dup(fd)))
        elif acceptor.channel is not None:
            acceptor.channel.notify(reply, [fd])
        return flow.flow_id, answer

    def local_source(self, ipcp: Ipcp, src_flow: int) -> Flow | None:
        """The allocating end of a flow that never left this host: only the local IPCP can name it,
        and only a flow that IPCP is serving counts, so an IPCP cannot lend another flow's identity."""
        src = self.reg.flows.get(src_flow) if ipcp.type == "local" and src_flow else None
        return src if src is not None and src.ipcp == ipcp.name and src.role == "src" else None

    async def wait_acceptor(self, name: str, deadline: float | None = None) -> Client:
        """A process to take a flow for `name`, starting the bound program if need be; waiting at most
        ACCEPT_TIMEOUT, and not past `deadline`."""
        entry = self.reg.get_name(name)

        def ready() -> Client | None:
            clients = {c.conn_id: c for c in self.irmd.clients.values() if c.accepting}
            pick = self.reg.pick(entry, [c.acceptor for c in clients.values()])
            return clients[pick.conn_id] if pick else None

        def start() -> float:
            """Start the bound program if no server of the name is alive (one that accepted before,
            or a process bound by pid); how long it is held back after failing (0: it is not)."""
            if any(
                (c.serves or c.pid in entry.procs) and self.reg.bound(entry, c.acceptor)
                for c in self.irmd.clients.values()
            ):  # fmt: skip
                return 0.0
            if (prog := entry.auto_program()) is None:
                raise NotFound(f"no process is accepting flows for {name!r}")
            self.irmd.programs.start(name, prog)
            return self.irmd.programs.held(name)

        if (found := ready()) is not None:
            return found
        held = start()
        # Loop: between the wake-up and our turn, another arrival may take the acceptor. A program held
        # back after failing is started by the arrivals waiting for it once its time is up.
        deadline = min(time.monotonic() + ACCEPT_TIMEOUT, deadline or float("inf"))
        while (found := ready()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FlowTimeout(f"no process accepted the flow for {name!r}")
            with contextlib.suppress(TimeoutError):
                await self.irmd.acceptors_changed(min(left, held) if held else left)
            if held:
                held = self.irmd.programs.held(name) or start()
        return found
