"""FRCT, the flow and retransmission control of reliable flows, sans-IO: SDUs and PDUs in,
PDUs and SDUs out, time as a parameter.

Sequence numbers, cumulative and selective acks, RTT estimation with RTO backoff
(RFC 6298), retransmission, a flow-control window, AIMD congestion control, in-order
delivery with duplicate suppression, and fragmentation of SDUs over the MTU.
"""

from __future__ import annotations

import dataclasses
import struct
from collections import deque

# The FRCT header, as Ouroboros's: flags, pad, window (PDUs), seqno, ackno.
HDR = struct.Struct("!BBHII")
DATA, DRF, ACK, FC, RDVS, FFGM, MFGM = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
# Ours, not Ouroboros's: a pure ack with SACK carries blocks [start, end) of PDUs held out of order,
# so one round trip repairs every hole of a window instead of one (RFC 2018's idea).
SACK = 0x80
SACK_BLOCK = struct.Struct("!II")
MAX_SACK_BLOCKS = 8
DUP_THRESH = 3  # a PDU this many places below a SACKed one is taken as lost (RFC 6675's DupThresh)
SEQ_MOD = 1 << 32
WINDOW = 1024  # PDUs the receiver buffers out of order and the sender keeps in flight
RTO_MIN, RTO_MAX, RTO_INIT = 0.01, 2.0, 0.2
RTO_G = 0.005  # the least margin over the smoothed RTT (RFC 6298's clock granularity G)
PROBE_EVERY = 0.2  # a sender facing a closed window asks for a window update this often
MAX_TRIES = 20  # retransmissions of one PDU before the flow is declared dead
ACK_DELAY = 0.002  # a lone in-order PDU waits this long for data to carry its ack (as TCP's delayed ack)


class FrctError(ValueError):
    """A PDU that does not parse."""


def _before(a: int, b: int) -> bool:
    """a < b in sequence space (wrapping)."""
    return 0 < (b - a) % SEQ_MOD < SEQ_MOD // 2


@dataclasses.dataclass
class _Sent:
    pdu: bytes
    sent: float
    tries: int = 0
    episode: int = -1  # the loss recovery that last resent it


@dataclasses.dataclass
class Counters:
    sent: int = 0
    retransmitted: int = 0
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    dropped: int = 0  # late PDUs of flows without retransmission, and malformed ones


class Frct:
    """One end of a flow with FRCT; `reliable` adds acks and retransmission to ordering."""

    def __init__(self, mtu: int, reliable: bool) -> None:
        if mtu <= HDR.size:
            raise ValueError(f"an MTU of {mtu} leaves no room for the {HDR.size}-byte FRCT header")
        self.reliable = reliable
        self.max_payload = mtu - HDR.size
        self.counters = Counters()
        # sender
        self.snd_nxt = 0
        self.snd_una = 0
        self.unacked: dict[int, _Sent] = {}
        self.cwnd = 16.0
        self.ssthresh = float(WINDOW)
        self.peer_window = WINDOW
        self.dupacks = 0
        self.recover: int | None = None  # snd_nxt when a loss was found; partial acks until then resend
        self.episode = 0  # counts loss recoveries: a hole is resent once in each
        self.high_sacked: int | None = None  # one past the highest PDU the peer holds out of order
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = RTO_INIT
        self.failed = False  # a PDU went unacknowledged MAX_TRIES times
        # receiver
        self.rcv_nxt = 0
        self.ooo: dict[int, tuple[int, bytes]] = {}
        self.ooo_span = 0  # distance past rcv_nxt of the furthest PDU held out of order
        self.fragments: list[bytes] = []
        self.ack_due: float | None = None
        self.rx_unacked = 0
        self._advertised = WINDOW
        self._probe_due: float | None = None
        self.sdus: deque[bytes] = deque()  # in order, for the application
        self.pdus: deque[bytes] = deque()  # for the network

    # -- sending -----------------------------------------------------------

    def can_send(self) -> bool:
        if not self.reliable:
            return True
        return len(self.unacked) < min(int(self.cwnd), self.peer_window, WINDOW)

    def send(self, sdu: bytes, now: float) -> None:
        """Queue an SDU's PDUs (fragments if it exceeds the MTU, on reliable flows only)."""
        if not self.reliable and len(sdu) > self.max_payload:
            # A lost piece could not be told from a whole SDU: unreliable flows do not fragment.
            raise ValueError(f"SDU of {len(sdu)} bytes exceeds the {self.max_payload} an unreliable flow carries")
        chunks = [sdu[i : i + self.max_payload] for i in range(0, len(sdu), self.max_payload)]
        last = len(chunks) - 1
        for i, chunk in enumerate(chunks):
            flags = DATA | ACK
            if last:
                flags |= (FFGM if i == 0 else 0) | (MFGM if i < last else 0)
            seq = self.snd_nxt
            self.snd_nxt = (seq + 1) % SEQ_MOD
            self._advertised = self._window()
            pdu = HDR.pack(flags, 0, self._advertised, seq, self.rcv_nxt) + chunk
            self.ack_due, self.rx_unacked = None, 0  # the ack rides along
            if self.reliable:
                self.unacked[seq] = _Sent(pdu, now)
            self.pdus.append(pdu)
            self.counters.sent += 1

    def _window(self) -> int:
        """PDUs we can still buffer: SDUs the application has not taken count against it.

        Out-of-order PDUs do not: they are bounded by their distance from rcv_nxt, and a
        window that shrank with every one would hide the duplicate acks that reveal a hole.
        """
        return max(WINDOW - len(self.sdus), 0)

    def taken(self) -> None:
        """The application took SDUs: if our window had closed, say it is open again."""
        if self.reliable and self._advertised < WINDOW // 2 <= self._window():
            self._ack()

    # -- receiving ---------------------------------------------------------

    def receive(self, pdu: bytes, now: float) -> None:
        if len(pdu) < HDR.size:
            self.counters.dropped += 1
            return
        flags, _, window, seq, ackno = HDR.unpack_from(pdu)
        if flags & ACK and self.reliable:
            self._acked(ackno, window, now, pure=not flags & DATA)
            if flags & SACK and not flags & DATA:
                self._sacked(pdu, now)
        if flags & RDVS and self.reliable:
            self._ack()  # the sender faces a closed window: tell it ours
        if not flags & DATA:
            return
        self.counters.received += 1
        payload = pdu[HDR.size :]
        in_order = seq == self.rcv_nxt
        if in_order:
            self._accept(flags, payload)
            while self.rcv_nxt in self.ooo:
                self._accept(*self.ooo.pop(self.rcv_nxt))
            self.ooo_span = max(self.ooo_span - (self.rcv_nxt - seq) % SEQ_MOD, 0) if self.ooo else 0
        elif _before(seq, self.rcv_nxt):
            self.counters.duplicates += 1  # our ack was lost or late: repeat it below
        elif not self.reliable:
            # Ordered but unreliable: a gap never fills, so skip to what arrived.
            self.counters.dropped += (seq - self.rcv_nxt) % SEQ_MOD
            self.fragments.clear()
            self.rcv_nxt = seq
            self._accept(flags, payload)
        elif (distance := (seq - self.rcv_nxt) % SEQ_MOD) < WINDOW:
            self.counters.out_of_order += 1
            self.ooo.setdefault(seq, (flags, payload))
            self.ooo_span = max(self.ooo_span, distance)
        if self.reliable:
            self.rx_unacked += 1
            if not in_order or self.ooo or self.rx_unacked >= 2:
                self._ack()  # every second PDU, and at once on gaps and duplicates
            elif self.ack_due is None:
                self.ack_due = now + ACK_DELAY

    def _ack(self) -> None:
        self._advertised = self._window()
        if self.ooo:
            blocks = self._sack_blocks()
            self.pdus.append(HDR.pack(ACK | SACK, 0, self._advertised, self.snd_nxt, self.rcv_nxt) + blocks)
        else:
            self.pdus.append(HDR.pack(ACK, 0, self._advertised, self.snd_nxt, self.rcv_nxt))
        self.ack_due, self.rx_unacked = None, 0

    def _sack_blocks(self) -> bytes:
        """The first MAX_SACK_BLOCKS runs of PDUs held out of order, nearest the hole first."""
        out = bytearray()
        start: int | None = None
        nxt, ooo = self.rcv_nxt, self.ooo
        for off in range(1, self.ooo_span + 2):
            seq = (nxt + off) % SEQ_MOD
            if seq in ooo:
                if start is None:
                    start = seq
            elif start is not None:
                out += SACK_BLOCK.pack(start, seq)
                start = None
                if len(out) == MAX_SACK_BLOCKS * SACK_BLOCK.size:
                    break
        return bytes(out)

    def _accept(self, flags: int, payload: bytes) -> None:
        self.rcv_nxt = (self.rcv_nxt + 1) % SEQ_MOD
        if flags & FFGM:  # the first of several fragments
            self.fragments = [payload]
        elif self.fragments:
            self.fragments.append(payload)
        else:
            self.sdus.append(payload)
            return
        if not flags & MFGM:  # the last one
            self.sdus.append(b"".join(self.fragments))
            self.fragments = []

    def _acked(self, ackno: int, window: int, now: float, pure: bool) -> None:
        if _before(self.snd_nxt, ackno):
            self.counters.dropped += 1  # acknowledges what was never sent: not from our peer
            return
        opened = window != self.peer_window
        self.peer_window = window
        if window == 0:
            self._probe_due = self._probe_due or now + PROBE_EVERY
        else:
            self._probe_due = None
        if not _before(self.snd_una, ackno):
            # Only a pure ack that changes nothing hints at a hole; data and window updates do not.
            if ackno == self.snd_una and self.unacked and pure and not opened:
                self.dupacks += 1
                if self.dupacks == DUP_THRESH:  # fast retransmit, and halve as on loss
                    self._lost(now, self.snd_una)
            return
        self.dupacks = 0
        oldest = self.unacked.get(self.snd_una)
        # Sample only the oldest PDU: later ones may have waited behind a hole. Karn: never a resent one.
        if oldest is not None and oldest.tries == 0:
            self._sample(now - oldest.sent)
        seq = self.snd_una
        while seq != ackno:
            if self.unacked.pop(seq, None) is not None:
                self.cwnd += 1.0 if self.cwnd < self.ssthresh else 1.0 / self.cwnd
            seq = (seq + 1) % SEQ_MOD
        self.snd_una = ackno
        if self.high_sacked is not None and not _before(ackno, self.high_sacked):
            self.high_sacked = None
        if self.srtt is not None:  # progress: drop the backoff
            self.rto = self._rto()
        if self.recover is not None:
            if _before(ackno, self.recover) and (sent := self.unacked.get(ackno)) is not None:
                if sent.episode != self.episode:  # NewReno: a partial ack shows the next hole
                    self._resend(ackno, sent, now)
            else:
                self.recover = None

    def _sacked(self, pdu: bytes, now: float) -> None:
        """SACK blocks: what the peer holds needs no resending; what lies well below it was lost."""
        body = memoryview(pdu)[HDR.size :]
        if len(body) % SACK_BLOCK.size or len(body) > MAX_SACK_BLOCKS * SACK_BLOCK.size:
            self.counters.dropped += 1
            return
        news = False
        for start, end in SACK_BLOCK.iter_unpack(body):
            # Only blocks inside what is in flight, and no longer than a window: never trust more.
            if not (_before(self.snd_una, start) and _before(start, end)) or _before(self.snd_nxt, end) \
                    or (end - start) % SEQ_MOD > WINDOW:
                continue
            seq = start
            while seq != end:
                if self.unacked.pop(seq, None) is not None:
                    news = True
                seq = (seq + 1) % SEQ_MOD
            if self.high_sacked is None or _before(self.high_sacked, end):
                self.high_sacked = end
        if not news or self.high_sacked is None or not _before(self.snd_una, self.high_sacked):
            return
        lost_below = (self.high_sacked - DUP_THRESH) % SEQ_MOD
        holes = []
        seq = self.snd_una
        while seq != lost_below and _before(seq, lost_below):
            sent = self.unacked.get(seq)
            if sent is not None and sent.episode != self.episode:
                holes.append((seq, sent))
            seq = (seq + 1) % SEQ_MOD
        if not holes:
            return
        if self.recover is None:  # a new loss: halve once, then repair every hole found
            self.episode += 1
            self.recover = self.snd_nxt
            self.ssthresh = max(self.cwnd / 2, 2.0)
            self.cwnd = self.ssthresh
        for seq, sent in holes:
            if sent.episode != self.episode:
                self._resend(seq, sent, now)

    def _sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = self._rto()

    def _rto(self) -> float:
        assert self.srtt is not None
        return min(max(self.srtt + max(RTO_G, 4 * self.rttvar), RTO_MIN), RTO_MAX)

    def _lost(self, now: float, seq: int) -> None:
        sent = self.unacked.get(seq)
        if sent is None or self.recover is not None:
            return
        self.episode += 1
        self.recover = self.snd_nxt
        self.ssthresh = max(self.cwnd / 2, 2.0)
        self.cwnd = self.ssthresh
        self._resend(seq, sent, now)

    def _resend(self, seq: int, sent: _Sent, now: float) -> None:
        sent.tries += 1
        sent.sent = now
        sent.episode = self.episode
        if sent.tries > MAX_TRIES:
            self.failed = True
        flags, pad, _, _, _ = HDR.unpack_from(sent.pdu)
        self.pdus.append(HDR.pack(flags, pad, self._window(), seq, self.rcv_nxt) + sent.pdu[HDR.size :])
        self.counters.retransmitted += 1

    # -- time --------------------------------------------------------------

    def next_deadline(self) -> float | None:
        oldest = self.unacked.get(self.snd_una)
        candidates = (self.ack_due, oldest.sent + self.rto if oldest else None, self._probe_due)
        return min((d for d in candidates if d is not None), default=None)

    def handle_timer(self, now: float) -> None:
        """Send a delayed ack that is due; if the oldest unacknowledged PDU timed out, back off and resend it."""
        if self.ack_due is not None and now >= self.ack_due:
            self._ack()
        if self._probe_due is not None and now >= self._probe_due:
            # Persist: the peer's window update may be lost, so ask for it (Ouroboros's RDVS).
            self._probe_due = now + PROBE_EVERY
            self.pdus.append(HDR.pack(RDVS, 0, self._window(), self.snd_nxt, self.rcv_nxt))
        sent = self.unacked.get(self.snd_una)
        if sent is None or now < sent.sent + self.rto:
            return
        self.rto = min(self.rto * 2, RTO_MAX)
        self.ssthresh = max(self.cwnd / 2, 2.0)
        self.cwnd = 2.0
        self.episode += 1  # after a timeout every hole may be resent again
        self.recover = self.snd_nxt
        self._resend(self.snd_una, sent, now)

    @property
    def idle(self) -> bool:
        """Everything sent was acknowledged."""
        return not self.unacked
