"""A member gone bad against the unicast layer's cores, with messages that are well formed and
validly signed but push state where nobody checked it: LSUs renaming their member again and again,
a layer full of (made-up) members at 8-byte addresses answering an enrollment, hellos whose
member names are no IPCP names. Each must leave the core's tables bounded, raise nothing it does
not declare, and keep the legitimate use beside it working.
"""

from __future__ import annotations

import dataclasses

import pytest

from ipcp.unicast import auth
from ipcp.unicast import messages as um
from ipcp.unicast.routing import Lsdb


def signed_lsu(ident: auth.Identity, src: int, seqno: int, name: str, neighbours: list[int]) -> um.Lsu:
    lsu = um.Lsu(src, seqno, neighbours, name, 0.0, ident.pub)
    return dataclasses.replace(lsu, sig=ident.sign(um.signed_part(lsu)))


@pytest.mark.timeout(60)
def test_a_member_renaming_itself_in_its_lsus_holds_one_name_at_a_time() -> None:
    """Each LSU of a member under a new name bound that name to its key for good: thousands of LSUs,
    thousands of names held (memory without bound), each refused to the member really called so."""
    lsdb = Lsdb(1, name="n1")
    rogue = auth.Identity.generate()
    for seqno in range(1, 3001):
        assert lsdb.receive(signed_lsu(rogue, 7, seqno, f"member{seqno}", [1]), 0.0)
    assert set(lsdb.bindings.by_name) == {"n1", "member3000"}
    assert set(lsdb._named) == {"n1", "member3000"}
    # a member that is called member5 joins: its name is its own, its LSU taken and its links routed
    real = auth.Identity.generate()
    assert lsdb.receive(signed_lsu(real, 9, 1, "member5", [1]), 0.0)
    lsdb.set_neighbours({7, 9}, 0.0)
    assert lsdb.names()[9] == "member5" and lsdb.table()[9] == [9]
    # ... and the rogue's current name is still its own alone
    with pytest.raises(auth.Forged, match="name 'member3000'"):
        lsdb.receive(signed_lsu(auth.Identity.generate(), 11, 1, "member3000", [1]), 0.0)
