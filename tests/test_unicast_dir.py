"""The directory of the unicast IPCP, sans-IO: a DHT of signed stores, where a member stores only
its own address and holders replicate what they hold as it was signed.

Directory instances are wired by hand and their messages delivered by a tiny in-memory network,
through the codec as on the wire; time is passed explicitly: no process, socket or sleep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
from collections import deque
from collections.abc import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowlib.qos import QosSpec
from ipcp.unicast import auth
from ipcp.unicast import dir as dir_mod
from ipcp.unicast import messages as um
from ipcp.unicast.dir import CACHE_TTL, LOOKUP_TIMEOUT, DhtParams, Directory, node_id
from ipcp.unicast.messages import signed_part
from transports.wire import HEADER, MAGIC, VERSION, Message, WireError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def ident_of(n: int) -> auth.Identity:
    return auth.Identity.generate()


def store(src: int, key: bytes, ttl: float, seq: int = 1, ident: auth.Identity | None = None) -> um.DhtStore:
    """A store as member `src` (or the holder of `ident`) signs it, for its own address."""
    ident = ident or ident_of(src)
    unsigned = um.DhtStore(src, key, src, ttl, seq, ident.pub)
    return dataclasses.replace(unsigned, sig=ident.sign(signed_part(unsigned)))


def frame(code: int, body: bytes, version: int = VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, code, 0, len(body)) + body


class Dht:
    """Directory instances wired by hand; out-messages are delivered until quiet."""

    def __init__(self, addrs: Iterable[int], **kw: float) -> None:
        self.params = DhtParams(**kw)  # type: ignore[arg-type]
        self.bindings = auth.Bindings()  # as every member's LSDB would have them
        self.d = {a: self.member(a) for a in addrs}
        self.now = 0.0
        self.log: list[tuple[int, int, Message]] = []  # (from, to, msg)
        self.down: set[int] = set()
        for a in self.d:
            self.d[a].set_members(self.d, self.now)

    def deliver(self, src: int, out: list[tuple[int, Message]]) -> None:
        queue = deque((src, dst, msg) for dst, msg in out)
        while queue:
            frm, to, msg = queue.popleft()
            self.log.append((frm, to, msg))
            if to in self.down or to not in self.d:
                continue
            # through the wire, as the IPCP does
            msg = um.CODEC.decode(um.CODEC.encode(msg)).msg
            queue.extend((to, dst, reply) for dst, reply in self.d[to].receive(msg, self.now))

    def member(self, addr: int) -> Directory:
        self.bindings.admit(addr, "", ident_of(addr).pub)
        return Directory(addr, self.params, ident_of(addr), self.bindings)

    def register(self, addr: int, key: bytes, on: bool = True) -> None:
        self.deliver(addr, self.d[addr].register(key, on, self.now))

    def lookup(self, addr: int, key: bytes) -> list[int] | None:
        d = self.d[addr]
        found = d.local(key, self.now)
        if found is not None:
            return found
        d.resolved.clear()
        _, out = d.lookup(key, self.now)
        self.deliver(addr, out)
        results = [addrs for k, addrs in d.resolved if k == key]
        return results[0] if results else None

    def holders(self, key: bytes) -> set[int]:
        return {a for a, d in self.d.items() if key in d.store}

    def tick(self, t: float) -> None:
        self.now = t
        for a, d in self.d.items():
            if a not in self.down:
                self.deliver(a, d.handle_timer(t))


ADDRS = [3, 17, 99, 1000, 4242, 65536, 70000, 123456, 0xDEADBEEF, 7, 8, 9]
KEY = hashlib.sha3_256(b"pong").digest()


def xor_closest(addrs: Iterable[int], key: bytes, k: int) -> list[int]:
    target = int.from_bytes(hashlib.sha3_256(key).digest(), "big")
    return sorted(addrs, key=lambda a: int.from_bytes(hashlib.sha3_256(a.to_bytes(8, "big")).digest(), "big") ^ target)[
        :k
    ]


def test_dir_node_ids_are_distinct_and_stable() -> None:
    ids = [node_id(a) for a in ADDRS]
    assert len(set(ids)) == len(ids) and ids == [node_id(a) for a in ADDRS]


def test_dir_register_publishes_to_the_k_xor_closest_members() -> None:
    dht = Dht(ADDRS)
    out = dht.d[3].register(KEY, True, 0.0)
    assert all(isinstance(msg, um.DhtStore) and msg.addr == 3 and msg.ttl > 0 for _, msg in out)
    expected = xor_closest(ADDRS, KEY, 8)
    assert [dst for dst, _ in out] == expected == dht.d[3].closest(KEY)
    dht.deliver(3, out)
    assert dht.holders(KEY) == set(expected)
    for a in expected:
        assert dht.d[a].local(KEY, 0.0) == [3]


def test_dir_fewer_members_than_k_all_hold_the_entry() -> None:
    dht = Dht(ADDRS[:4])
    dht.register(99, KEY)
    assert dht.holders(KEY) == set(ADDRS[:4])


def test_dir_lookup_from_a_non_holder_goes_through_find_and_found() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.d[asker].local(KEY, 0.0) is None
    assert dht.lookup(asker, KEY) == [3]
    kinds = [type(msg).__name__ for frm, _, msg in dht.log if frm == asker or _ == asker]
    assert "DhtFind" in kinds and "DhtFound" in kinds
    assert dht.d[asker].local(KEY, 0.0) == [3]  # cached now
    assert dht.d[asker].local(KEY, CACHE_TTL + 1) is None  # for a while


def test_dir_two_registrants_are_both_found() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    dht.register(17, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY) and a not in (3, 17))
    assert sorted(dht.lookup(asker, KEY) or []) == [3, 17]


def test_dir_lookup_of_an_unknown_key_resolves_empty() -> None:
    dht = Dht(ADDRS)
    assert dht.lookup(3, b"nobody") == []


def test_dir_lookup_asks_the_next_closest_when_the_first_ones_are_gone() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    holders = xor_closest(ADDRS, KEY, 8)
    asker = next(a for a in ADDRS if a not in holders)
    dht.down = set(holders[:2])  # two holders do not answer
    dht.d[asker].resolved.clear()
    _, out = dht.d[asker].lookup(KEY, 0.0)
    dht.deliver(asker, out)
    assert (KEY, [3]) in dht.d[asker].resolved


def test_dir_lookup_skips_members_without_a_route() -> None:
    dht = Dht(ADDRS)
    registrant = next(a for a in ADDRS if a not in xor_closest(ADDRS, KEY, 8))
    dht.register(registrant, KEY)
    holders = xor_closest(ADDRS, KEY, 8)
    asker = next(a for a in ADDRS if a not in holders and a != registrant)
    unroutable = set(holders[:3])
    dht.d[asker].reachable = lambda addr: addr not in unroutable
    _, out = dht.d[asker].lookup(KEY, 0.0)
    assert out and not {dst for dst, _ in out} & unroutable
    dht.deliver(asker, out)
    assert (KEY, [registrant]) in dht.d[asker].resolved
    nobody = Directory(asker)
    nobody.set_members(ADDRS, 0.0)
    nobody.reachable = lambda addr: False
    _, out = nobody.lookup(KEY, 0.0)
    assert out == [] and nobody.resolved == [(KEY, [])]  # resolved at once, not after a timeout


def test_dir_lookup_times_out_empty_when_nobody_answers() -> None:
    dht = Dht(ADDRS[:3])
    dht.register(3, KEY)
    dht.down = {17, 99}
    d = dht.d[3]
    d.mine.clear()  # so 3 must ask
    d.store.clear()
    _, out = d.lookup(KEY, 0.0)
    dht.deliver(3, out)
    assert d.resolved == []
    dht.tick(LOOKUP_TIMEOUT + 0.1)
    assert d.resolved == [(KEY, [])]


def test_dir_found_with_an_unknown_cookie_is_ignored() -> None:
    d = Directory(1)
    d.set_members([1, 2], 0.0)
    assert d.receive(um.DhtFound(2, KEY, 42, [store(2, KEY, 9.0)]), 0.0) == []
    assert d.resolved == [] and d.local(KEY, 0.0) is None


def test_dir_unregister_withdraws_the_entry_everywhere() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    dht.register(17, KEY)
    dht.register(3, KEY, on=False)
    stores = [msg for frm, _, msg in dht.log if frm == 3 and isinstance(msg, um.DhtStore) and msg.ttl == 0]
    assert len(stores) == 8
    asker = next(a for a in ADDRS if a not in dht.holders(KEY) and a not in (3, 17))
    assert dht.lookup(asker, KEY) == [17]
    dht.register(17, KEY, on=False)
    assert dht.holders(KEY) == set()
    dht.now = CACHE_TTL + 1  # the asker cached [17] a moment ago
    assert dht.lookup(asker, KEY) == []
    assert KEY not in dht.d[3].mine


def test_dir_entries_expire_by_tick_unless_refreshed() -> None:
    dht = Dht(ADDRS, t_expire=100.0, t_refresh=1e9, t_replicate=1e9)
    dht.tick(0.0)  # the first tick publishes (nothing registered yet)
    registrant = next(a for a in ADDRS if a not in xor_closest(ADDRS, KEY, 8))  # so it is never asked
    dht.register(registrant, KEY)
    holders = dht.holders(KEY)
    assert len(holders) == 8
    dht.tick(99.0)
    assert dht.holders(KEY) == holders
    dht.tick(100.5)
    assert dht.holders(KEY) == set()
    assert all(not d._schedule for d in dht.d.values())  # the schedule is drained too
    asker = next(a for a in ADDRS if a != registrant)
    assert dht.lookup(asker, KEY) == []


def test_dir_registrations_are_refreshed_before_they_expire() -> None:
    dht = Dht(ADDRS, t_expire=100.0, t_refresh=40.0)
    dht.register(3, KEY)
    for t in range(0, 400, 10):
        dht.tick(float(t))
    assert len(dht.holders(KEY)) == 8
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.lookup(asker, KEY) == [3]


def test_dir_results_are_filtered_to_current_members() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    dht.register(17, KEY)
    gone = [a for a in ADDRS if a != 3]
    for a in gone:  # 3 left the layer: every member's LSDB lost it
        dht.d[a].set_members(gone, 0.0)
    for a in gone:
        assert dht.d[a].local(KEY, 0.0) in (None, [17]), a
    asker = next(a for a in gone if a not in dht.holders(KEY) and a != 17)
    assert dht.lookup(asker, KEY) == [17]


def test_dir_an_answer_counts_only_members_that_signed_their_own_store() -> None:
    d = Directory(1)
    for a in (2, 3, 77):
        d.bindings.admit(a, "", ident_of(a).pub)
    d.set_members([1, 2, 3], 0.0)
    cookie, out = d.lookup(KEY, 0.0)
    assert {dst for dst, _ in out} == {2, 3}
    assert d.receive(um.DhtFound(2, KEY, cookie, [store(77, KEY, 9.0)]), 0.0) == []  # 77 is no member: ask on
    assert d.resolved == []
    lies = [
        dataclasses.replace(store(3, KEY, 9.0), sig=b"\x00" * 64),  # a holder's invention
        store(3, KEY, 9.0, ident=ident_of(99)),  # signed, by a key not 3's
        store(3, b"other", 9.0),
    ]  # 3's, but for another name
    d.receive(um.DhtFound(3, KEY, cookie, [*lies, store(2, KEY, 9.0)]), 0.0)
    assert d.resolved == [(KEY, [2])] and d.forged == 2


def test_dir_cached_results_are_filtered_to_current_members() -> None:
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.lookup(asker, KEY) == [3]  # cached at the asker
    dht.d[asker].set_members([a for a in ADDRS if a != 3], 0.0)
    assert dht.d[asker].local(KEY, 1.0) in (None, [])


def test_dir_membership_change_republishes_to_the_new_closest() -> None:
    members = ADDRS[:9]
    dht = Dht(members)
    dht.register(3, KEY)
    before = dht.holders(KEY)
    newcomer = next(a for a in range(10_000, 20_000) if a in xor_closest([*members, a], KEY, 8))
    dht.d[newcomer] = dht.member(newcomer)
    everyone = [*members, newcomer]
    for a in everyone:
        dht.deliver(a, dht.d[a].set_members(everyone, 0.0))
    assert newcomer in dht.holders(KEY)
    assert dht.holders(KEY) >= set(xor_closest(everyone, KEY, 8))
    assert before - dht.holders(KEY) <= set(before)  # old holders may keep a copy until it expires


def test_dir_a_nan_ttl_does_not_stop_other_entries_from_expiring() -> None:
    with pytest.raises(WireError, match="NaN"):  # the codec refuses it on the wire
        um.CODEC.decode(frame(um.DhtStore.TYPE, b'{"src":2,"key":"aa","addr":2,"ttl":NaN}'))
    d = Directory(1, DhtParams(t_expire=100.0))
    d.set_members([1, 2, 3], 0.0)
    nan_store = store(2, b"\xaa", math.nan)  # and the directory, were one to get through
    d.receive(store(3, b"\xbb", 5.0), 0.0)
    d.receive(nan_store, 0.0)
    d.receive(store(3, b"\xcc", 1.0, seq=2), 0.0)
    d.handle_timer(10.0)
    assert b"\xbb" not in d.store and b"\xcc" not in d.store


DHT_MSGS = st.one_of(
    st.builds(um.DhtStore, st.integers(0, 20), st.binary(max_size=4), st.integers(0, 20), st.floats(allow_nan=False)),
    st.builds(store, st.integers(0, 4), st.binary(max_size=4), st.floats(allow_nan=False), st.integers(-5, 8)),
    st.builds(um.DhtFind, st.integers(0, 20), st.binary(max_size=4), st.integers(-5, 2**64)),
    st.builds(
        um.DhtFound,
        st.integers(0, 20),
        st.binary(max_size=4),
        st.integers(-5, 2**64),
        st.lists(
            st.builds(store, st.integers(0, 12), st.just(KEY), st.floats(allow_nan=False), st.integers(-5, 8)),
            max_size=5,
        ),
    ),
    st.builds(um.Lsu, st.integers(0, 5), st.integers(0, 5), st.lists(st.integers(0, 5), max_size=3)),
)


@FUZZ
@given(st.lists(DHT_MSGS, max_size=25))
def test_fuzz_directory_takes_any_message_without_raising(msgs: list[Message]) -> None:
    d = Directory(1, DhtParams(t_expire=50.0, t_refresh=20.0, t_replicate=30.0))
    d.set_members(range(1, 12), 0.0)
    d.register(b"mine", True, 0.0)
    cookie, _ = d.lookup(KEY, 0.0)
    for t, msg in enumerate(msgs):
        if isinstance(msg, um.DhtFound) and t % 2:
            msg = um.DhtFound(msg.src, KEY, cookie, msg.stores)
        with contextlib.suppress(auth.Forged):
            for dst, reply in d.receive(msg, float(t)):
                assert isinstance(dst, int) and isinstance(reply, um.DhtStore | um.DhtFind | um.DhtFound)
        d.handle_timer(float(t))
    d.handle_timer(1e6)
    assert all(h.expiry > 1e6 for entries in d.store.values() for h in entries.values())
    for _, addrs in d.resolved:
        assert set(addrs) <= d.members


def test_dir_a_member_stores_only_its_own_address_signed_by_its_own_key() -> None:
    d = Directory(1)
    d.bindings.admit(2, "n2", ident_of(2).pub)
    d.set_members([1, 2, 3], 0.0)
    with pytest.raises(auth.Forged, match="stores for address 3"):
        d.receive(dataclasses.replace(store(2, KEY, 100.0), addr=3), 0.0)
    with pytest.raises(auth.Forged, match="another member's key"):
        d.receive(store(2, KEY, 100.0, ident=ident_of(99)), 0.0)  # 2's address, someone else's key
    with pytest.raises(auth.Forged):
        d.receive(dataclasses.replace(store(2, KEY, 100.0), ttl=1e9), 0.0)  # altered on its way
    with pytest.raises(auth.Forged):
        d.receive(um.DhtStore(2, KEY, 2, 100.0), 0.0)  # unsigned
    assert d.forged == 4 and d.size == 0
    d.receive(store(3, KEY, 100.0, ident=ident_of(33)), 0.0)  # 3 is not bound yet: held, but not believed
    assert d.size == 1 and d.local(KEY, 0.0) is None
    d.bindings.admit(3, "n3", ident_of(33).pub)  # its LSU arrives, under the same key
    assert d.local(KEY, 0.0) == [3]


def test_dir_a_replayed_store_never_undoes_a_newer_one() -> None:
    d = Directory(1)
    d.bindings.admit(2, "", ident_of(2).pub)
    d.set_members([1, 2], 0.0)
    registered, withdrawn = store(2, KEY, 100.0, seq=5), store(2, KEY, 0.0, seq=6)
    d.receive(registered, 0.0)
    d.receive(withdrawn, 1.0)
    assert d.local(KEY, 1.0) is None
    d.receive(registered, 2.0)  # replayed by someone who kept it
    assert d.local(KEY, 2.0) is None
    d.receive(store(2, KEY, 100.0, seq=7), 3.0)  # the member registers again
    assert d.local(KEY, 3.0) == [2]


def test_dir_a_members_removals_by_the_thousand_never_make_room_for_anothers_replay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Removals cost a member no entry, only a seqno kept: past its share it forgets its own oldest,
    never another's withdrawal (whose old store would then be taken again)."""
    monkeypatch.setattr(dir_mod, "SEQS_PER_MEMBER", 8, raising=False)
    monkeypatch.setattr(dir_mod, "MAX_ENTRIES", 4)  # (a small layer-wide bound: the seqnos' once followed it)
    d = Directory(1)
    for a in (2, 3):
        d.bindings.admit(a, "", ident_of(a).pub)
    d.set_members([1, 2, 3], 0.0)
    registered = store(2, KEY, 100.0, seq=5)
    d.receive(registered, 0.0)
    d.receive(store(2, KEY, 0.0, seq=6), 1.0)  # the victim withdraws
    for i in range(50):  # the bad member's signed removals of keys it never held
        d.receive(store(3, hashlib.sha256(b"%d" % i).digest(), 0.0, seq=1), 2.0)
    assert len([slot for slot in d.seqs if slot[1] == 3]) == 8
    d.receive(registered, 3.0)  # the victim's old store, replayed
    assert d.local(KEY, 3.0) is None


def test_dir_many_members_removals_take_seqnos_from_the_one_holding_most(monkeypatch: pytest.MonkeyPatch) -> None:
    """Members joining forces past the layer-wide bound: the member holding the most seqnos gives up
    its oldest, never the victim with its one withdrawal."""
    monkeypatch.setattr(dir_mod, "SEQS_PER_MEMBER", 8)
    monkeypatch.setattr(dir_mod, "MAX_SEQS", 16)
    d = Directory(1)
    for a in range(2, 6):
        d.bindings.admit(a, "", ident_of(a).pub)
    d.set_members(list(range(1, 6)), 0.0)
    registered = store(2, KEY, 100.0, seq=5)
    d.receive(registered, 0.0)
    d.receive(store(2, KEY, 0.0, seq=6), 1.0)
    for i in range(40):
        d.receive(store(3 + i % 3, hashlib.sha256(b"%d" % i).digest(), 0.0, seq=1), 2.0)
    assert len(d.seqs) <= 16 and (KEY, 2) in d.seqs
    d.receive(registered, 3.0)
    assert d.local(KEY, 3.0) is None


def test_dir_holders_replicate_the_signed_store_to_new_homes() -> None:
    dht = Dht(ADDRS[:4], t_replicate=60.0, t_refresh=1e9)
    dht.register(3, KEY)
    newcomer = next(a for a in range(10_000, 20_000) if a in xor_closest([*ADDRS[:4], a], KEY, 2))
    dht.d[newcomer] = dht.member(newcomer)
    everyone = [*ADDRS[:4], newcomer]
    for a in everyone:
        dht.d[a].set_members(everyone, 0.0)  # no republish by the registrant: only replication reaches it
    dht.d[3].mine.clear()
    dht.tick(60.0)
    assert newcomer in dht.holders(KEY)
    held = dht.d[newcomer].store[KEY][3].store
    assert held.src == 3 and held.pub == ident_of(3).pub  # as 3 signed it, whoever passed it on


def test_dir_stores_are_bounded_per_member(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dir_mod, "MAX_PER_MEMBER", 5)
    d = Directory(1)
    d.set_members([1, 2], 0.0)
    for i in range(20):
        d.receive(store(2, bytes([i]), 100.0, seq=i + 1), 0.0)
    assert d.size == 5 and d.refused == 15


def test_qos_spec_survives_the_fa_req_codec() -> None:
    req = um.FaReq(1, 2, b"\x01" * 32, QosSpec(delay=5, loss=0, in_order=1))
    got = um.CODEC.decode(um.CODEC.encode(req)).msg
    assert isinstance(got, um.FaReq) and got.qos == req.qos and got.qos.reliable


def test_dir_a_registration_goes_to_new_homes_as_signed_and_to_all_once_membership_settles() -> None:
    key = hashlib.sha3_256(b"settle").digest()
    d = Directory(1, DhtParams(k=3), ident_of(1), now=0.0)
    first = d.register(key, True, 0.0)
    assert [a for a, _ in first] == [1]  # alone: its own home
    signed = first[0][1]
    out = d.set_members(range(1, 4), 0.1)  # two members more: they are new homes
    assert sorted(a for a, _ in out) == [2, 3] and all(msg is signed for _, msg in out)  # not re-signed
    out = d.set_members(range(1, 50), 0.2)  # homes change again: only the new ones are sent to
    homes = d.closest(key)
    assert {a for a, _ in out} == set(homes) - {1, 2, 3}
    assert d.get_timer() == pytest.approx(0.2 + dir_mod.SETTLE)
    out = d.handle_timer(0.2 + dir_mod.SETTLE)  # settled: once more to every home, as signed
    assert sorted(a for a, _ in out) == sorted(homes) and all(msg is signed for _, msg in out)
    assert d.handle_timer(1.0) == []
    for n in range(60, 200):  # churn that never settles is still followed within MAX_SETTLE
        d.set_members(range(1, n), 1.0 + (n - 60) * 0.1)
        if d.get_timer() <= 1.0 + (n - 60) * 0.1:
            break
    assert d.get_timer() <= 1.0 + dir_mod.MAX_SETTLE


def test_dir_a_lookup_is_answered_only_by_the_member_it_asks() -> None:
    """A lookup names the member asked, under the asker's signature: a forwarder that copied one and
    sent it to every member had each answer the asker with up to MAX_FOUND signed stores, a flood on
    it (the signature was there to stop lookups in another's name doing just that)."""
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.lookup(asker, KEY) == [3]
    find = next(msg for frm, _, msg in dht.log if frm == asker and isinstance(msg, um.DhtFind))
    answered = [a for a in ADDRS if a not in (asker, find.dst) and dht.d[a].receive(find, dht.now)]
    assert answered == []
    assert sum(dht.d[a].misdirected for a in ADDRS) == len(ADDRS) - 2
    fresh = dataclasses.replace(find, cookie=find.cookie ^ 1)  # (it answered `find` in the lookup)
    assert dht.d[find.dst].receive(fresh, dht.now)  # the member asked still answers


def test_dir_a_lookup_sent_again_to_the_member_it_asks_is_answered_once() -> None:
    """A forwarder that kept a lookup and sends it again to the member it names had that member
    answer the asker with up to MAX_FOUND signed stores each time: a flood on the asker."""
    dht = Dht(ADDRS)
    dht.register(3, KEY)
    asker = next(a for a in ADDRS if a not in dht.holders(KEY))
    assert dht.lookup(asker, KEY) == [3]
    find = next(msg for frm, _, msg in dht.log if frm == asker and isinstance(msg, um.DhtFind))
    asked = dht.d[find.dst]
    assert all(asked.receive(find, dht.now) == [] for _ in range(100))  # answered already, above
    assert asked.replayed == 100
    assert dht.lookup(asker, KEY) == [3]  # a new lookup (a new cookie) is answered
    again = dataclasses.replace(find, cookie=find.cookie + 1)
    assert asked.receive(again, dht.now) and asked.receive(again, dht.now) == []


@pytest.mark.timeout(120)
def test_dir_stores_for_made_up_addresses_fill_no_holder_and_members_still_register() -> None:
    """A store is held for any address that signs its own (its LSU may come later), and each address
    had 1,024 entries: one member storing for 16 made-up addresses filled every holder's 16,384 for
    dht_t_expire (a day), refusing every registration after it. A full directory now gives the place
    of an address no LSU binds, then of the member holding the most, to a member's store."""
    d = Directory(1)
    for member in (2, 3):  # members: their LSUs bound their keys
        d.bindings.admit(member, f"n{member}", ident_of(member).pub)
    d.set_members([1, 2, 3], 0.0)
    assert d.receive(store(3, b"early", 100.0), 0.0) == []
    made_up = range(1000, 1000 + dir_mod.MAX_ENTRIES // dir_mod.MAX_PER_MEMBER + 1)
    for addr in made_up:
        for i in range(dir_mod.MAX_PER_MEMBER):
            d.receive(store(addr, b"junk%d.%d" % (addr, i), 1e9), 0.0)
    assert d.size == dir_mod.MAX_ENTRIES and d.refused >= dir_mod.MAX_PER_MEMBER - 1
    for i in range(3):  # members register beside them, and keep what they had
        d.receive(store(2, b"name%d" % i, 100.0), 1.0)
        assert d.local(b"name%d" % i, 1.0) == [2]
    assert d.local(b"early", 1.0) == [3]
    assert d.size == dir_mod.MAX_ENTRIES


def test_dir_a_full_directory_shares_its_entries_among_members(monkeypatch: pytest.MonkeyPatch) -> None:
    """Among members whose LSUs bound them, the one holding the most gives way to the one holding
    fewer, and never to one that would then hold as many."""
    monkeypatch.setattr(dir_mod, "MAX_ENTRIES", 10)
    d = Directory(1)
    for member in (2, 3):
        d.bindings.admit(member, f"n{member}", ident_of(member).pub)
    d.set_members([1, 2, 3], 0.0)
    for i in range(10):
        d.receive(store(2, b"a%d" % i, 100.0), 0.0)
    for i in range(6):
        d.receive(store(3, b"b%d" % i, 100.0), 0.0)
    assert d._per_member == {2: 5, 3: 5} and d.size == 10 and d.refused == 1
    assert d.local(b"a0", 0.0) is None and d.local(b"a9", 0.0) == [2]  # 2's oldest went first


def test_dir_the_lookup_cache_is_bounded_and_sheds_what_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every answered lookup stayed in the cache for good (its TTL was checked on reading only): names
    members registered by the thousand, looked up one after the other, grew every asker's memory."""
    monkeypatch.setattr(dir_mod, "MAX_CACHE", 16, raising=False)
    dht = Dht(ADDRS)
    keys = [hashlib.sha3_256(b"name%d" % i).digest() for i in range(40)]
    for key in keys:
        dht.register(3, key)
    dht.register(3, KEY)
    asker = next(a for a in ADDRS if a != 3 and a not in dht.holders(KEY) | dht.holders(keys[-1]))
    for i, key in enumerate(keys):
        dht.now = i * 0.01
        assert dht.lookup(asker, key) == [3]
    cache = dht.d[asker].cache
    assert len(cache) <= 16 and keys[-1] in cache
    dht.now += CACHE_TTL + 1
    assert dht.lookup(asker, KEY) == [3] and list(cache) == [KEY]  # the expired all gone


@pytest.mark.timeout(120)
def test_dir_a_full_directory_ranks_who_gives_way_once_not_for_every_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full directory of 16,384 addresses holding one entry each (made up: no LSU needed) had every
    member's store walk all of them to find whom to take a place from (5 ms a store, for a member
    100 times what it costs to check its signature). They are ranked at most once a second."""
    d = Directory(1)
    d.bindings.admit(2, "n2", ident_of(2).pub)
    d.set_members([1, 2], 0.0)
    junk = auth.Identity.generate()
    for addr in range(1000, 1000 + dir_mod.MAX_ENTRIES):
        d.receive(store(addr, b"k%d" % addr, 1e9, ident=junk), 0.0)
    assert d.size == dir_mod.MAX_ENTRIES
    looks = 0
    bound = Directory._bound

    def counted(self: Directory, addr: int) -> bool:
        nonlocal looks
        looks += 1
        return bound(self, addr)

    monkeypatch.setattr(Directory, "_bound", counted)
    for i in range(300):  # the member registers name after name, each in a made-up address's place
        d.receive(store(2, b"m%d" % i, 100.0, seq=i + 1), 0.0)
        assert d.local(b"m%d" % i, 0.0) == [2]
    assert looks < 2 * dir_mod.MAX_ENTRIES, f"{looks} looks at addresses for 300 stores"
    assert d.size == dir_mod.MAX_ENTRIES and d._per_member[2] == 300
