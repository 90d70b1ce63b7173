"""Loss recovery of FRCT senders, sans-IO: the PDUs in flight, the RTT estimate and its backed-off
retransmission timeout (RFC 6298), loss found from duplicate and selective acks (NewReno, RFC 6675),
lost repairs found by time and probes (RACK and TLP, RFC 8985).

It says which PDUs to send again; the connection (flowlib.frct) builds the copies and sends them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from flowlib.congestion import Window

SEQ_MOD = 1 << 32
SEQ_HALF = SEQ_MOD // 2
RTO_MIN, RTO_MAX, RTO_INIT = 0.01, 2.0, 0.2
RTO_G = 0.005  # the least margin over the smoothed RTT (RFC 6298's clock granularity G)
GUESSES = 3  # RTT guesses from resent PDUs per flow while it has no valid sample
DUP_THRESH = 3  # a PDU this many places below an acked one is taken as lost (RFC 6675's DupThresh)
PROBES = 3  # probes of one oldest PDU before the RTO takes over: at 20% loss each way, repair and probe
# or their acks are lost a third of the time; three probes leave the RTO (and its backoff) 1 in 60 holes
PTO_MIN = 0.001  # the least wait before a probe in recovery (RFC 8985's tail loss probe, 2 RTTs)
GO_BACK = 16  # PDUs the first ack that moves after a timeout may resend, beyond two per PDU it acks
CREDIT_MAX = 4 * GO_BACK  # second repairs (and go-back resends) banked by arrivals, two each
FREE_REPAIRS = 8  # repairs a flow may make before any arrival has paid for them


def before(a: int, b: int) -> bool:
    """a < b in 32-bit sequence space (wrapping), as C's before()."""
    return 0 < (b - a) % SEQ_MOD < SEQ_HALF


def distance(a: int, b: int) -> int:
    """How far b lies past a in sequence space."""
    return (b - a) % SEQ_MOD


@dataclasses.dataclass(slots=True)
class Sent:
    pdu: bytes
    first: float  # first sent: the R timer runs from here
    sent: float  # last sent
    tries: int = 0
    episode: int = -1  # the loss recovery that last resent it


class Rtt:
    """The smoothed RTT, its variance and the retransmission timeout (RFC 6298)."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = RTO_INIT
        self.guesses = 0  # samples taken from a copy's time while no valid one existed (see Recovery.on_ack)
        self.guessed = False  # srtt rests on such a guess: a timeout withdraws it
        self._unguessed_rto = RTO_INIT

    def sample(self, rtt: float) -> None:
        """A valid sample (Karn's rule: of a PDU never resent)."""
        self.guessed = False
        self._update(rtt)

    def guess(self, rtt: float) -> None:
        """A sample from a resent PDU's last copy, taken only while no valid one exists, GUESSES times."""
        if self.srtt is None and self.guesses < GUESSES:
            self._unguessed_rto = self.rto
            self._update(rtt)
            self.guesses += 1
            self.guessed = True

    def withdraw(self) -> None:
        """A timeout before any valid sample: the guess goes, and its short RTO with it."""
        if self.guessed:
            self.srtt, self.guessed = None, False
            self.rto = max(self.rto, self._unguessed_rto)

    def _update(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.settle()

    def settle(self) -> None:
        """Progress: drop any backoff. Without a sample, to RTO_INIT while guesses remain; then kept (RFC
        6298 5.7): on a path slower than RTO_INIT every ack would cover a copy sent on a timeout."""
        if self.srtt is None:
            if self.guesses < GUESSES:
                self.rto = RTO_INIT
        else:
            self.rto = min(max(self.srtt + max(RTO_G, 4 * self.rttvar), RTO_MIN), RTO_MAX)

    def backoff(self) -> None:
        self.rto = min(self.rto * 2, RTO_MAX)


Resend = list[tuple[int, Sent]]


class Recovery:
    """The sender's PDUs in flight, from `una` (the oldest not acknowledged) up to the connection's next."""

    def __init__(self, cc: Window) -> None:
        self.cc = cc
        self.rtt = Rtt()
        self.unacked: dict[int, Sent] = {}
        self.una = 0
        self.dupacks = 0
        self.recover: int | None = None  # the next seqno when a loss was found; partial acks until then resend
        self.episode = 0  # counts loss recoveries: a hole is resent once in each
        self.high_sacked: int | None = None  # one past the highest PDU the peer holds out of order
        self.timeouts = 0  # retransmission timeouts since the last ack that moved
        # RACK: when the latest-sent PDU known to have arrived was sent (first transmissions only, as
        # an ack of a copy cannot say which copy arrived). A repair sent well before it is lost again.
        self.delivered_sent = -float("inf")
        self.probed: int | None = None  # `una` when its last probe went
        self.probed_times = 0  # ... and how many probes it had: PROBES at most per oldest PDU
        self.probes = 0
        self.timed_out = False  # this recovery began with a timeout
        # Resends beyond a hole's first repair: two per PDU the peer newly acknowledges, so that forged
        # acks buy little (after a timeout, GO_BACK to start with).
        self.credit = FREE_REPAIRS
        self.last_resend = -float("inf")  # when anything was last sent again

    def start(self, seq: int) -> None:
        """A new data run begins at `seq` (nothing is in flight)."""
        self.una = seq
        self.recover = self.high_sacked = None
        self.timed_out = False
        self.dupacks = 0

    def on_sent(self, seq: int, pdu: bytes, now: float) -> None:
        self.unacked[seq] = Sent(pdu, now, now)

    def _resending(self, resend: Resend, now: float) -> Resend:
        """What the caller is to send again, marked as resent now (so the SACK blocks of the same
        packet, looked at after its ack, do not name them a second time)."""
        if resend:
            self.last_resend = now
        for _, sent in resend:
            sent.tries += 1
            sent.sent = now
            sent.episode = self.episode
        return resend

    def oldest(self) -> Sent | None:
        return self.unacked.get(self.una)

    def on_ack(self, ackno: int, nxt: int, now: float, pure: bool) -> Resend:
        return self._resending(self._on_ack(ackno, nxt, now, pure), now)

    def on_sack(self, blocks: list[tuple[int, int]], nxt: int, limit: int, now: float, complete: bool) -> Resend:
        """`complete`: the blocks name every run the peer holds (it had room for them all)."""
        return self._resending(self._on_sack(blocks, nxt, limit, now, complete), now)

    def on_timer(self, now: float, nxt: int) -> Resend:
        return self._resending(self._on_timer(now, nxt), now)

    def _on_ack(self, ackno: int, nxt: int, now: float, pure: bool) -> Resend:
        """A cumulative ack (`ackno`: the next PDU the peer expects; the caller checked it is not past `nxt`)."""
        if not before(self.una, ackno):
            # Only a pure ack that moves nothing hints at a hole; data and window updates do not.
            if ackno == self.una and pure and self.unacked:
                self.dupacks += 1
                if self.dupacks == DUP_THRESH:
                    return self._lost(self.una, nxt)
            return []
        self.dupacks = 0
        self.timeouts = 0
        oldest = self.unacked.get(self.una)
        # Sample only the oldest PDU: later ones may have waited behind a hole. Karn: never a resent one,
        # but while no sample exists (the first PDUs lost, a receiver that drops what follows until a
        # run opens, every ack covering a repair), a few guesses from the last copy's time: it errs
        # short at worst, and a timeout before a valid sample withdraws it. Without them the RTO stays
        # backed off at seconds per loss.
        if oldest is not None and oldest.tries == 0:
            self.rtt.sample(now - oldest.sent)
        elif oldest is not None:
            self.rtt.guess(now - oldest.sent)
        acked, seq, unacked, latest = 0, self.una, self.unacked, self.delivered_sent
        while seq != ackno:
            if (sent := unacked.pop(seq, None)) is not None:
                acked += 1
                if sent.tries == 0 and sent.sent > latest:
                    latest = sent.sent
            seq = (seq + 1) % SEQ_MOD
        self.delivered_sent = latest
        # Past PDUs the peer held out of order and acked selectively before: the oldest still in flight.
        while seq not in unacked and before(seq, nxt):
            seq = (seq + 1) % SEQ_MOD
        self.una = seq
        if acked:
            self.cc.on_acked(acked)
        if self.high_sacked is not None and not before(seq, self.high_sacked):
            self.high_sacked = None
        self.rtt.settle()
        if self.recover is not None:
            if before(seq, self.recover) and (sent := unacked.get(seq)) is not None:
                if self.timed_out:
                    # After a timeout everything sent before it is taken as lost, as TCP does: each
                    # ack that moves resends two PDUs for each it acknowledged, not one per round trip.
                    self.credit = min(self.credit + 2 * acked, CREDIT_MAX)
                    out = self._stale_below(self.recover, min(self.cc.window(), self.credit), now)
                    self.credit -= len(out)
                    return out
                if sent.episode != self.episode:  # NewReno: a partial ack shows the next hole
                    return [(seq, sent)]
            else:
                self.recover = None
                self.timed_out = False
        return []

    def _below(self, end: int) -> Iterator[tuple[int, Sent]]:
        """What is in flight below `end`, in seqno order (PDUs enter `unacked` as they are first sent)."""
        for seq, sent in self.unacked.items():
            if not before(seq, end):
                return
            yield seq, sent

    def _stale_below(self, end: int, most: int, now: float) -> Resend:
        """Up to `most` PDUs below `end` not yet resent in this recovery, oldest first, of those sent
        more than an RTT ago (younger ones may still arrive: a timeout on a paced or jittery path)."""
        young = now - (self.rtt.srtt + self._reordering() if self.rtt.srtt is not None else 0.0)
        out: Resend = []
        for seq, sent in self._below(end):
            if len(out) >= most:
                break
            if sent.episode != self.episode and sent.sent <= young:
                out.append((seq, sent))
        return out

    def _on_sack(self, blocks: list[tuple[int, int]], nxt: int, limit: int, now: float, complete: bool) -> Resend:
        """SACK blocks [start, end): held by the peer, so not resent; what lies well below them was lost."""
        news = fresh = False  # fresh: a PDU never resent arrived, later sent than any known to have
        # The highest PDU the blocks name, if they newly do and it was never resent: with every run the
        # peer holds named, it is the latest arrival, which the SACK answers at once: a valid RTT sample
        # (Karn) where the oldest PDU, always a repair under heavy loss, never gives one.
        top: tuple[int, Sent] | None = None
        budget = limit  # PDUs all blocks together may name: a forged ack costs at most one window's work
        for start, end in blocks:
            # Only blocks inside what is in flight and no longer than the sender keeps: never trust more.
            if (
                not (before(self.una, start) and before(start, end))
                or before(nxt, end)
                or distance(start, end) > budget
            ):
                continue
            span = distance(start, end)
            budget -= span
            if len(self.unacked) < span:  # walk whichever is shorter: the block or what is in flight
                held = [s for s in self.unacked if not before(s, start) and before(s, end)]
            else:
                held = [s for i in range(span) if (s := (start + i) % SEQ_MOD) in self.unacked]
            last = (end - 1) % SEQ_MOD
            for seq in held:
                sent = self.unacked.pop(seq)
                if seq == last and sent.tries == 0 and (top is None or before(top[0], end)):
                    top = end, sent
                if sent.tries == 0 and sent.sent > self.delivered_sent:
                    self.delivered_sent = sent.sent
                    fresh = True
                news = True
                self.credit = min(self.credit + 2, CREDIT_MAX)
            if self.high_sacked is None or before(self.high_sacked, end):
                self.high_sacked = end
        # ... sent after the last resend: else a SACK set off by a repair may name a PDU that arrived
        # long before (its own SACK lost), and count the whole wait.
        if complete and top is not None and top[0] == self.high_sacked and top[1].sent >= self.last_resend:
            self.rtt.sample(now - top[1].sent)
        if fresh:  # a PDU never resent arrived: the path works, so the next timeout is not a repeat
            self.timeouts = 0
        if not news or self.high_sacked is None or not before(self.una, self.high_sacked):
            return []
        edge = self.high_sacked
        # A hole resent in this recovery is lost again if a PDU first sent after the repair (by more
        # than a reordering allowance) has arrived, or an RTO passed while later PDUs still arrive:
        # resend it now, without the timeout's backoff, since acks show the path works.
        stale = max(now - self.rtt.rto, self.delivered_sent - self._reordering())
        # ... but never before the copy had a round trip to arrive (RFC 8985): a peer that acks fast
        # and SACKs each new PDU would otherwise draw every hole again on every packet.
        stale = min(stale, now - max(self.rtt.srtt or RTO_INIT, PTO_MIN))
        below = list(self._below(edge))  # in flight below the highest PDU the peer holds
        holes: Resend = []
        for i, (seq, sent) in enumerate(below):
            # Lost once DUP_THRESH PDUs above it are held (RFC 6675's IsLost): the places above it,
            # less those still in flight. Every repair is paid for by PDUs that arrived, so a forged
            # SACK buys a few copies, not the flight.
            if distance(seq, edge) - (len(below) - i) < DUP_THRESH or self.credit <= 0:
                break
            if sent.episode != self.episode or sent.sent < stale:
                self.credit -= 1
                holes.append((seq, sent))
        if not holes:
            return []
        if self.recover is None:  # a new loss: tell congestion control once, then repair every hole found
            self.episode += 1
            self.recover = nxt
            self.cc.on_loss()
        return holes

    def _reordering(self) -> float:
        """How much later than a repair a PDU may be sent and still arrive first, without a loss (RACK's
        reordering window: a quarter of the RTT)."""
        return (self.rtt.srtt if self.rtt.srtt is not None else RTO_INIT) / 4

    def _lost(self, seq: int, nxt: int) -> Resend:
        sent = self.unacked.get(seq)
        if sent is None or self.recover is not None:
            return []
        self.episode += 1
        self.recover = nxt
        self.cc.on_loss()
        return [(seq, sent)]

    def deadline(self, r_timeout: float) -> float | None:
        """When the oldest PDU in flight is due for a probe or a retransmission, or the flow fails
        for want of any ack (`r_timeout` after its first copy), whichever comes first."""
        oldest = self.unacked.get(self.una)
        if oldest is None:
            return None
        due = oldest.sent + self.rtt.rto
        if (fail := oldest.first + r_timeout) < due:
            due = fail
        if self.recover is not None and (probe := self._probe_at(oldest)) is not None and probe < due:
            due = probe  # (only in recovery: the call is spared the flood's every look)
        return due

    def _probe_at(self, oldest: Sent) -> float | None:
        """In recovery, the oldest PDU is sent again two RTTs after its last copy, PROBES times at most:
        when its repair was lost with the window full, no later PDU can arrive to show it (RACK), and
        the RTO would stall the flow several RTTs and back off. Not a timeout: no backoff, no window cost."""
        if self.recover is None or self.rtt.srtt is None or (self.probed == self.una and self.probed_times >= PROBES):
            return None
        return oldest.sent + max(2 * self.rtt.srtt, PTO_MIN)

    def _on_timer(self, now: float, nxt: int) -> Resend:
        """If the oldest PDU timed out: back off, tell congestion control, resend it; or probe (above)."""
        oldest = self.unacked.get(self.una)
        if oldest is None:
            return []
        if now < oldest.sent + self.rtt.rto:
            if (probe := self._probe_at(oldest)) is None or now < probe:
                return []
            self.probed_times = self.probed_times + 1 if self.probed == self.una else 1
            self.probed = self.una
            self.probes += 1
            return [(self.una, oldest)]
        self.rtt.withdraw()
        self.rtt.backoff()
        self.cc.on_timeout(repeated=self.timeouts > 0)
        self.timeouts += 1
        self.episode += 1  # after a timeout every hole may be resent again
        self.recover = nxt
        self.timed_out = True
        self.credit = GO_BACK
        return [(self.una, oldest)]
