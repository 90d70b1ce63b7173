"""FRCT, the flow and retransmission control of in-order flows, sans-IO and on C Ouroboros 0.23's wire:
SDUs and PDUs in, PDUs and SDUs out, time passed in (`receive(pdu, now)`, `handle_timer(now)`, `get_timer()`).

The 12-byte PCI, data runs opened by DRF after a random sequence number, cumulative acks, flow control
with a 24-bit right window edge and rendez-vous (RDVS) when it closes, as src/lib/frct.c. Loss recovery
(flowlib.recovery) and congestion control (flowlib.congestion) are their own modules. Ours beyond C's:
SACK blocks on pure acks and fragments of SDUs over the MTU (flags C 0.23 defines and ignores).
Every buffer is bounded: a peer that breaks the rules gets its flow reset (`error`), never our memory.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections import deque
from collections.abc import Callable

from flowlib.congestion import Window
from flowlib.fccntl import FRCTFLINGER, FRCTFRESCNTL, FRCTFRTX
from flowlib.recovery import SEQ_HALF, SEQ_MOD, Recovery, Resend, Sent, before, distance

# The PCI, as C's struct frct_pci: flags (8 bits) and the right window edge (24) in one word, seqno, ackno.
PCI = struct.Struct("!III")
PCI_SIZE = PCI.size
DATA, DRF, ACK, FC, RDVS, FFGM, MFGM = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
SACK = 0x80  # ours: a pure ack followed by blocks [start, end) of PDUs held out of order (RFC 2018's idea)
FLAG_NAMES = {DATA: "DATA", DRF: "DRF", ACK: "ACK", FC: "FC", RDVS: "RDVS", FFGM: "FFGM", MFGM: "MFGM", SACK: "SACK"}
RWE_MASK = 0xFFFFFF
SACK_BLOCK = struct.Struct("!II")
MAX_SACK_BLOCKS = 8


# C 0.23's constants (build/src/lib/config.h, frct.c).
RQ_SIZE = 256  # PDUs the receiver takes beyond the next one it expects
START_WINDOW = 64  # PDUs a sender may send into a new run before the receiver's first window update
DELT_A = 10.0  # s: a receiver acks only what arrived this recently
DELT_R = 120.0  # s: a PDU still unacknowledged this long after it was first sent takes the flow down
RDV_EVERY = 0.1  # s: a sender facing a closed window asks for an update this often
# Inactivity that ends a data run: C's (3 mpl + A + R) for senders and (2 mpl + A + R) for receivers. We
# take the layers' extremes (udp mpl 5 s, eth 0.1 s): our sender keeps a run at least as long as any C
# receiver, our receiver ends one no later than any C sender, so a run is never restarted on one side only.
SND_INACT = 146.0
RCV_INACT = 130.0

# Ours.
APP_MTU = 65535  # the largest SDU a reliable flow carries: longer ones are fragmented, reassembly stops here
RCV_BUF = 4 << 20  # bytes a receiver holds for its application (in order, out of order, half reassembled)
SPAN = 4 * RQ_SIZE  # the most PDUs a sender has outstanding from its oldest unacknowledged one
ACK_DELAY = 0.002  # s: a lone in-order PDU waits this long for data to carry its ack
# A window update that reopens our window is sent again, RDV_EVERY and then twice as long each time up
# to UPDATE_MAX, until data arrives or DELT_A passed: a C 0.23 writer blocked at our edge sends no
# rendez-vous (frct.c:559-575 waits without a timeout) and, all acknowledged, resends nothing, so a
# lost update would leave it waiting for good.
UPDATE_MAX = 1.0


@dataclasses.dataclass(slots=True)
class Reopened:
    """A window update that reopened our window, sent again until data comes (see UPDATE_MAX)."""

    due: float  # when to send it again
    gap: float  # ... and after that, twice this
    nxt: int  # rcv_nxt when it was sent: once data moved it, the peer heard
    until: float  # when to give up: the peer has nothing more to send


class FrctError(ValueError):
    """A PDU that does not parse."""


def flag_names(flags: int) -> str:
    return "|".join(name for bit, name in FLAG_NAMES.items() if flags & bit) or "0"


@dataclasses.dataclass(frozen=True)
class Pci:
    """One PCI, for tools and tests (the data path unpacks PCI directly)."""

    flags: int
    rwe: int  # the low 24 bits of the sender's receive window edge: valid with FC
    seqno: int  # valid with DATA
    ackno: int  # the next PDU the sender expects: valid with ACK

    def pack(self) -> bytes:
        return PCI.pack(self.flags << 24 | self.rwe & RWE_MASK, self.seqno, self.ackno)

    @classmethod
    def parse(cls, pdu: bytes | memoryview) -> Pci:
        if len(pdu) < PCI.size:
            raise FrctError(f"a PDU of {len(pdu)} bytes has no room for the {PCI.size}-byte FRCT PCI")
        word, seqno, ackno = PCI.unpack_from(pdu)
        return cls(word >> 24, word & RWE_MASK, seqno, ackno)

    def __str__(self) -> str:
        return f"{flag_names(self.flags)} rwe={self.rwe:#08x} seq={self.seqno:#010x} ack={self.ackno:#010x}"


@dataclasses.dataclass
class Counters:
    sent: int = 0
    retransmitted: int = 0
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    out_of_window: int = 0  # data past the edge we advertised: the peer ignores flow control
    no_run: int = 0  # data without DRF while no run was open (as C, dropped)
    dropped: int = 0  # late PDUs of flows without retransmission, and overflow of their queue
    malformed: int = 0  # too short, too long, impossible acks or flags
    rdvs: int = 0  # rendez-vous sent


def _random_seq() -> int:
    return int.from_bytes(os.urandom(4), "big")


def _pack(flags: int, rwe: int, seqno: int, ackno: int) -> bytes:
    return PCI.pack(flags << 24 | rwe & RWE_MASK, seqno, ackno)


class Frct:
    """One end of a flow with FRCT; `reliable` (qos loss 0) adds acks and retransmission to ordering."""

    def __init__(
        self,
        mtu: int,
        reliable: bool,
        *,
        rcv_buf: int = RCV_BUF,
        app_mtu: int = APP_MTU,
        r_timeout: float = DELT_R,
        isn: Callable[[], int] = _random_seq,
    ) -> None:
        if mtu <= PCI.size:
            raise ValueError(f"an MTU of {mtu} leaves no room for the {PCI.size}-byte FRCT PCI")
        self.reliable = reliable
        self.max_payload = mtu - PCI.size
        self._max_pdu = mtu
        self.app_mtu = app_mtu if reliable else min(app_mtu, self.max_payload)
        self.rcv_buf = max(rcv_buf, self.app_mtu + self.max_payload)  # room for one whole SDU at least
        self._half_window = min(RQ_SIZE, self.rcv_buf // self.max_payload) // 2  # of the most it opens to
        self.r_timeout = r_timeout
        self._isn = isn
        self.cflags = FRCTFRESCNTL | (FRCTFRTX | FRCTFLINGER if reliable else 0)
        self.counters = Counters()
        self.error: str | None = None  # the peer broke the protocol: the flow is to be reset
        self.pdus: deque[bytes] = deque()  # for the network
        self.sdus: deque[bytes] = deque()  # in order, for the application
        # sender
        self.recovery = Recovery(Window(RQ_SIZE * 4)) if reliable else None
        self.snd_nxt = 0
        self.snd_rwe = START_WINDOW
        self.snd_act = -float("inf")  # when we last sent a packet: a run ends after SND_INACT without
        self._rdvs_due: float | None = None  # while the peer's window is closed to data we hold
        # receiver
        self.rcv_nxt = 0  # C's rcv lwe: the next PDU we expect
        self.rcv_rwe = 0  # the right window edge we advertised (never pulled back)
        self.rcv_act = -float("inf")  # when data last arrived: a run ends after RCV_INACT without
        self.rcv_acked = 0  # the last ackno we sent
        self.ooo: dict[int, tuple[int, bytes]] = {}
        self.fragments: list[bytes] = []
        self._frag_bytes = 0
        self._held = 0  # bytes of ooo, fragments and sdus
        self.ack_due: float | None = None
        self._fc_due: float | None = None  # a window update owed to a rendez-vous
        self._fc_edge = 0  # the edge of our last window update, for unreliable flows (no acks)
        # One attribute for the repeated update: past 30 attributes CPython 3.11 stops sharing an
        # instance's dict keys, and every attribute access on the data path gets slower (10% of a flood).
        self._reopened: Reopened | None = None

    # -- the application's side ---------------------------------------------------------------------

    @property
    def snd_una(self) -> int:
        return self.recovery.una if self.recovery is not None else self.snd_nxt

    @property
    def unacked(self) -> dict[int, Sent]:
        return self.recovery.unacked if self.recovery is not None else {}

    @property
    def idle(self) -> bool:
        """Everything sent was acknowledged."""
        return not self.unacked

    def can_send(self, now: float) -> bool:
        """Whether an SDU may go now; a sender the peer's window holds back asks for an update (RDVS)."""
        rec = self.recovery
        nxt = self.snd_nxt
        # (before() and distance() inline: this runs for every SDU, at times twice)
        if rec is not None and (len(rec.unacked) >= rec.cc.window() or (nxt - rec.una) % SEQ_MOD >= SPAN):
            return False
        if (
            self.cflags & FRCTFRESCNTL
            and now - self.snd_act <= SND_INACT
            and not 0 < (self.snd_rwe - nxt) % SEQ_MOD < SEQ_HALF
        ):
            if self._rdvs_due is None:
                self._rdvs_due = now + RDV_EVERY
            return False
        return True

    def send(self, sdu: bytes | bytearray | memoryview, now: float) -> None:
        """Queue an SDU's PDUs: fragments if it exceeds the MTU (reliable flows only). Each PDU is a
        copy (header and payload joined), so the caller's buffer is free again once this returns."""
        n = len(sdu)
        if n > self.app_mtu:
            raise ValueError(f"SDU of {n} bytes exceeds the {self.app_mtu} this flow carries")
        self._open_run(now)
        mp = self.max_payload
        if n <= mp:  # the usual SDU: one PDU, no fragment flags
            self._send_pdu(DATA, sdu, now)
        else:
            last = (n - 1) // mp
            for i in range(last + 1):
                flags = DATA | (FFGM if i == 0 else 0) | (MFGM if i < last else 0)
                self._send_pdu(flags, sdu[i * mp : (i + 1) * mp], now)
        self.snd_act = now

    def _send_pdu(self, flags: int, chunk: bytes | bytearray | memoryview, now: float) -> None:
        seq = self.snd_nxt
        rec = self.recovery
        if rec is None or seq == rec.una:
            flags |= DRF  # nothing unacknowledged: a receiver without a run may start one here
        rwe = ackno = 0
        if (quiet := now - self.rcv_act) <= RCV_INACT:
            flags |= FC
            rwe = self._advertise()
            if rec is not None and quiet <= DELT_A:
                flags |= ACK
                ackno = self.rcv_acked = self.rcv_nxt
                self.ack_due = None  # the ack rides along
        pdu = _pack(flags, rwe, seq, ackno) + chunk
        self.snd_nxt = (seq + 1) % SEQ_MOD
        if rec is not None:
            rec.on_sent(seq, pdu, now)
        self.pdus.append(pdu)
        self.counters.sent += 1

    def _open_run(self, now: float) -> None:
        """As C: a fresh run, from a random seqno, once the peer has heard nothing from us for SND_INACT."""
        if now - self.snd_act > SND_INACT and self.snd_una == self.snd_nxt:
            self._new_run(self._isn() % SEQ_MOD)

    def _control(self, flags: int, rwe: int, ackno: int, now: float) -> bytes:
        """The PCI of a packet without data. A C receiver takes any packet as activity of the sender's
        run but opens a run only on DRF: one that heard an ack before our first data would drop that
        data for good. So ours carry DRF and the seqno a run opens at (the oldest unacknowledged)."""
        self._open_run(now)
        self.snd_act = now
        return _pack(flags | DRF, rwe, self.snd_una, ackno)

    def _new_run(self, seq: int) -> None:
        self.snd_nxt = seq
        self.snd_rwe = (seq + START_WINDOW) % SEQ_MOD
        if self.recovery is not None:
            self.recovery.start(seq)

    def taken(self, nbytes: int, now: float) -> None:
        """The application took `nbytes` of SDUs: if the window we advertised had nearly closed, reopen it."""
        self._held -= nbytes
        before_edge = self.rcv_rwe
        edge = self._advertise()
        if now - self.rcv_act > RCV_INACT:
            return
        half = self._half_window
        if self.reliable:
            nxt = self.rcv_nxt
            if (before_edge - nxt) % SEQ_MOD < half <= (edge - nxt) % SEQ_MOD:
                self._ack(now)
                self._reopened = Reopened(now + RDV_EVERY, RDV_EVERY, self.rcv_nxt, now + DELT_A)
        elif distance(self._fc_edge, edge) >= half:
            # Unreliable flows have no acks to carry the window: update it unasked, not only on RDVS as C.
            self._fc_edge = edge
            self.pdus.append(self._control(FC, edge, 0, now))

    def resize(self, rcv_buf: int, now: float) -> None:
        """Hold at most `rcv_buf` bytes for the application from now on (one whole SDU at least): a
        server keeps a small window for a peer it does not trust yet, the full one once it does. A
        window that grows is advertised at once; an edge advertised is never pulled back, so one that
        shrinks closes as data arrives."""
        self.rcv_buf = max(rcv_buf, self.app_mtu + self.max_payload)
        self._half_window = min(RQ_SIZE, self.rcv_buf // self.max_payload) // 2
        self.taken(0, now)

    def close(self, now: float) -> bool:
        """The application let go: a final ack if one is owed (as C's dealloc); whether to linger and
        retransmit what the peer has not acknowledged (FRCTFLINGER)."""
        if self.reliable and self.rcv_nxt != self.rcv_acked:
            self.pdus.append(self._control(ACK, 0, self.rcv_nxt, now))
            self.rcv_acked = self.rcv_nxt
        return bool(self.cflags & FRCTFLINGER) and not self.idle

    # -- the network's side ---------------------------------------------------------------------------

    def receive(self, pdu: bytes, now: float) -> None:
        if self.error is not None:
            return
        n = len(pdu)
        if n < PCI_SIZE:
            self.counters.malformed += 1
            return
        word, seq, ackno = PCI.unpack_from(pdu)
        flags = word >> 24
        # Header prediction, as TCP's: on a reliable flow most PDUs are the next one in order, whole,
        # inside the window of an open run, with an ack that moves nothing. Taken here in a few steps,
        # to the same effect as the general path below (_on_data, _accept).
        if (
            flags & ~(DRF | ACK | FC) == DATA
            and seq == self.rcv_nxt
            and self.reliable
            and PCI_SIZE < n <= self._max_pdu
            and 0 < (self.rcv_rwe - seq) % SEQ_MOD < SEQ_HALF
            and not self.ooo
            and not self.fragments
            and now - self.rcv_act <= RCV_INACT
            and (not flags & ACK or ackno == self.recovery.una)  # type: ignore[union-attr]
        ):
            self.rcv_act = now
            # (A one-way flow's data carries the same edge each time: _on_window would change nothing.)
            if flags & FC and ((word ^ self.snd_rwe) & RWE_MASK or self._rdvs_due is not None):
                self._on_window(word & RWE_MASK)
            self.counters.received += 1
            self.rcv_nxt = nxt = (seq + 1) % SEQ_MOD
            self._held += n - PCI_SIZE
            self.sdus.append(pdu[PCI_SIZE:])
            if (nxt - self.rcv_acked) % SEQ_MOD >= 2:
                self.ack_due = now  # every second PDU
            elif self.ack_due is None:
                self.ack_due = now + ACK_DELAY
            return
        if flags & DATA:
            if n - PCI.size > self.max_payload or n == PCI.size or flags & (RDVS | SACK):
                self.counters.malformed += 1
                return
            if now - self.rcv_act > RCV_INACT:  # no run open: only DRF opens one (as C)
                if not flags & DRF:
                    self.counters.no_run += 1
                    return
                self._new_rcv_run(seq)
            self.rcv_act = now
        if flags & RDVS:
            # The sender faces our closed window: tell it where the edge is (as C, an FC-only packet),
            # once per timer check however many rendez-vous came.
            self._fc_due = now
            return
        # (Data whose ack moves nothing, as in a one-way flood, has nothing for the recovery to do.)
        if flags & ACK and (rec := self.recovery) is not None and not (flags & DATA and ackno == rec.una):
            resend = self._on_ack(ackno, now, pure=not flags & DATA)
            if flags & SACK:
                self._on_sack(pdu, now)
            unacked = rec.unacked
            for lost, sent in resend:  # after the SACK blocks: none the same packet says the peer holds
                if lost in unacked:
                    self._resend(lost, sent, now)
        if flags & FC:
            self._on_window(word & RWE_MASK)
        if flags & DATA:
            self._on_data(flags, seq, pdu[PCI.size :], now)

    def _new_rcv_run(self, seq: int) -> None:
        self._held -= sum(len(p) for _, p in self.ooo.values()) + sum(len(f) for f in self.fragments)
        self.ooo.clear()
        self.fragments.clear()
        self._frag_bytes = 0
        self.rcv_nxt = self.rcv_acked = self.rcv_rwe = self._fc_edge = seq
        self._advertise()

    def _on_ack(self, ackno: int, now: float, pure: bool) -> Resend:
        rec = self.recovery
        assert rec is not None
        if before(self.snd_nxt, ackno):
            self.counters.malformed += 1  # acknowledges what was never sent: not from our peer
            return []
        return rec.on_ack(ackno, self.snd_nxt, now, pure)

    def _on_sack(self, pdu: bytes, now: float) -> None:
        rec = self.recovery
        assert rec is not None
        body = memoryview(pdu)[PCI.size :]
        if len(body) % SACK_BLOCK.size or len(body) > MAX_SACK_BLOCKS * SACK_BLOCK.size:
            self.counters.malformed += 1
            return
        blocks = list(SACK_BLOCK.iter_unpack(body))
        for seq, sent in rec.on_sack(blocks, self.snd_nxt, SPAN, now, complete=len(blocks) < MAX_SACK_BLOCKS):
            self._resend(seq, sent, now)

    def _on_window(self, rwe24: int) -> None:
        """The peer's receive window edge, 24 bits of it: the high byte is ours, with C's rollover rule."""
        old = self.snd_rwe
        rwe = (old & ~RWE_MASK) | rwe24
        if before(rwe, old) and old - rwe > 0x7FFFFF:
            rwe += 1 << 24
        self.snd_rwe = rwe % SEQ_MOD
        if before(self.snd_nxt, self.snd_rwe):
            self._rdvs_due = None

    def _on_data(self, flags: int, seq: int, payload: bytes, now: float) -> None:
        c = self.counters
        c.received += 1
        if not self.reliable:
            if before(seq, self.rcv_nxt):
                c.dropped += 1  # late: ordered but unreliable flows never go back
                return
            c.dropped += distance(self.rcv_nxt, seq)  # a gap never fills: skip it
            self.rcv_nxt = seq
            # The application does not keep up: unreliable flows may drop. Bounded in SDUs as well as in
            # bytes (a tiny SDU costs far more than its bytes), at the count our window never lets past.
            if self._held + len(payload) > self.rcv_buf or len(self.sdus) >= RQ_SIZE:
                c.dropped += 1
                self.rcv_nxt = (seq + 1) % SEQ_MOD
                return
            self._accept(flags & ~(FFGM | MFGM), payload)  # unreliable senders never fragment
            return
        if before(seq, self.rcv_nxt):
            c.duplicates += 1  # our ack was lost or late: repeat it
            self._ack_soon(now)
            return
        if not before(seq, self.rcv_rwe):
            c.out_of_window += 1  # past the edge we advertised: the peer ignores flow control
            self._ack_soon(now)
            return
        if seq != self.rcv_nxt:
            if seq in self.ooo:
                c.duplicates += 1
            else:
                c.out_of_order += 1
                self.ooo[seq] = (flags, payload)
                self._held += len(payload)
            self._ack_soon(now)
            return
        self._accept(flags, payload)
        ooo = self.ooo
        while self.error is None and self.rcv_nxt in ooo:
            f, p = ooo.pop(self.rcv_nxt)
            self._held -= len(p)
            self._accept(f, p)
        if ooo:
            self._ack_soon(now)  # a hole remains: say so at once
        elif distance(self.rcv_acked, self.rcv_nxt) >= 2:
            self._ack_soon(now)  # every second PDU
        elif self.ack_due is None:
            self.ack_due = now + ACK_DELAY

    def _accept(self, flags: int, payload: bytes) -> None:
        """The next PDU in order: an SDU, or a piece of one."""
        self.rcv_nxt = (self.rcv_nxt + 1) % SEQ_MOD
        self._held += len(payload)
        frags = self.fragments
        if flags & FFGM:
            if frags:
                return self._reset("a new fragmented SDU began before the last one ended")
        elif not frags:
            if flags & MFGM:
                return self._reset("a middle fragment arrived without a first one")
            self.sdus.append(payload)
            return None
        frags.append(payload)
        self._frag_bytes += len(payload)
        if self._frag_bytes > self.app_mtu:
            return self._reset(f"a fragmented SDU grew past the application MTU of {self.app_mtu} bytes")
        if not flags & MFGM:
            self.sdus.append(b"".join(frags))
            frags.clear()
            self._frag_bytes = 0
        return None

    def _reset(self, why: str) -> None:
        self.error = f"peer broke FRCT: {why}"
        self.sdus.clear()
        self.fragments.clear()
        self._frag_bytes = 0
        self.ooo.clear()
        self.pdus.clear()
        self._held = 0
        if self.recovery is not None:
            self.recovery.unacked.clear()

    def _advertise(self) -> int:
        """Our receive window's right edge, never pulled back: PDUs and bytes we can still hold."""
        room = RQ_SIZE - len(self.sdus) - len(self.fragments)
        if (by_bytes := (self.rcv_buf - self._held) // self.max_payload) < room:
            room = by_bytes
        edge = (self.rcv_nxt + room) % SEQ_MOD if room > 0 else self.rcv_nxt
        if 0 < (edge - (rwe := self.rcv_rwe)) % SEQ_MOD < SEQ_HALF:  # before(rwe, edge)
            self.rcv_rwe = rwe = edge
        return rwe

    def _ack_soon(self, now: float) -> None:
        """An ack at the next timer check: one for a burst of PDUs, not one each."""
        self.ack_due = now

    def _ack(self, now: float) -> None:
        """A pure ack (ACK|FC as C's; DRF as every packet without data), with SACK blocks while PDUs wait
        behind a hole."""
        rwe = self._advertise()
        if self.ooo:
            self.pdus.append(self._control(ACK | FC | SACK, rwe, self.rcv_nxt, now) + self._sack_blocks())
        else:
            self.pdus.append(self._control(ACK | FC, rwe, self.rcv_nxt, now))
        self.rcv_acked = self.rcv_nxt
        self.ack_due = None

    def _sack_blocks(self) -> bytes:
        """The first MAX_SACK_BLOCKS runs of PDUs held out of order, nearest the hole first."""
        nxt = self.rcv_nxt
        blocks: list[int] = []  # start, end offsets from nxt, alternating
        for off in sorted(distance(nxt, s) for s in self.ooo):
            if blocks and blocks[-1] == off:
                blocks[-1] = off + 1
            elif len(blocks) == 2 * MAX_SACK_BLOCKS:
                break
            else:
                blocks += (off, off + 1)
        return struct.pack(f"!{len(blocks)}I", *((nxt + off) % SEQ_MOD for off in blocks))

    def _resend(self, seq: int, sent: Sent, now: float) -> None:
        """A copy with the same flags and seqno; the ack and window refreshed (C refreshes the ack)."""
        word, _, ackno = PCI.unpack_from(sent.pdu)
        flags = word >> 24
        rwe = self._advertise() if flags & FC else 0
        if flags & ACK:
            ackno = self.rcv_acked = self.rcv_nxt
        self.pdus.append(_pack(flags, rwe, seq, ackno) + sent.pdu[PCI.size :])
        self.counters.retransmitted += 1
        self.snd_act = now  # a C receiver counts the copy as our run's activity: so do we

    # -- time -----------------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When handle_timer next has work: a delayed ack, a rendez-vous, a retransmission or the R timer."""
        due = self.ack_due  # (no list and min(): the engine asks after nearly every SDU)
        for d in (self._fc_due, self._rdvs_due):
            if d is not None and (due is None or d < due):
                due = d
        if (r := self._reopened) is not None and (due is None or r.due < due):
            due = r.due
        rec = self.recovery
        if rec is not None and (d := rec.deadline(self.r_timeout)) is not None and (due is None or d < due):
            due = d
        return due

    def handle_timer(self, now: float) -> None:
        if self.error is not None:
            return
        if self.ack_due is not None and now >= self.ack_due:
            self._ack(now)  # carries the window too
            self._fc_due = None
        if self._fc_due is not None and now >= self._fc_due:
            self._fc_due = None
            self.pdus.append(self._control(FC, self._advertise(), 0, now))
        if (r := self._reopened) is not None and now >= r.due:
            if self.rcv_nxt != r.nxt or now >= r.until:
                self._reopened = None  # data came: the peer heard; or it has nothing more to send
            else:
                self._ack(now)
                r.gap = min(2 * r.gap, UPDATE_MAX)
                r.due = now + r.gap
        if self._rdvs_due is not None and now >= self._rdvs_due:
            if before(self.snd_nxt, self.snd_rwe):
                self._rdvs_due = None
            else:  # the peer's window update may be lost: ask again (as C, every 100 ms)
                self._rdvs_due = now + RDV_EVERY
                self.pdus.append(self._control(RDVS, 0, 0, now))
                self.counters.rdvs += 1
        rec = self.recovery
        if rec is None:
            return
        oldest = rec.oldest()
        if oldest is not None and now - oldest.first >= self.r_timeout:
            self.error = f"the peer acknowledged nothing for {self.r_timeout:g} s"
            return
        for seq, sent in rec.on_timer(now, self.snd_nxt):
            self._resend(seq, sent, now)
