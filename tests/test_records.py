"""Records (transports.records) behave as the dataclasses they replace: the same repr, equality,
hashing and frozenness, field options included."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

import pytest

from transports.records import FrozenRecord, Record, frozen_record, record


@record
class Rec(Record):
    a: int
    b: list[int] = field(default_factory=list)
    hidden: str = field(default="h", repr=False)
    ignored: int = field(default=0, compare=False)


@dataclasses.dataclass
class Dc:
    a: int
    b: list[int] = field(default_factory=list)
    hidden: str = field(default="h", repr=False)
    ignored: int = field(default=0, compare=False)


@frozen_record
class Frozen(FrozenRecord):
    a: int
    b: tuple[int, ...] = ()
    unhashed: int = field(default=0, hash=False)


@dataclasses.dataclass(frozen=True)
class FrozenDc:
    a: int
    b: tuple[int, ...] = ()
    unhashed: int = field(default=0, hash=False)


def same_repr(record: Any, dc: Any) -> bool:
    return repr(record).removeprefix(type(record).__qualname__) == repr(dc).removeprefix(type(dc).__qualname__)


def test_a_record_s_repr_shows_its_repr_fields_as_a_dataclass_s() -> None:
    assert same_repr(Rec(1, [2], "x", 3), Dc(1, [2], "x", 3))
    assert repr(Rec(1)) == "Rec(a=1, b=[], ignored=0)"


def test_a_record_is_equal_by_its_compared_fields_and_only_to_its_own_class() -> None:
    assert Rec(1, [2], ignored=5) == Rec(1, [2], ignored=6)
    assert Rec(1) != Rec(2)
    assert Rec(1).__eq__(Dc(1)) is NotImplemented
    assert Rec(1) != Dc(1)


def test_a_record_is_unhashable_as_a_dataclass_with_eq() -> None:
    with pytest.raises(TypeError):
        hash(Rec(1))
    with pytest.raises(TypeError):
        hash(Dc(1))


def test_a_frozen_record_hashes_as_a_frozen_dataclass() -> None:
    assert hash(Frozen(1, (2,), 3)) == hash(FrozenDc(1, (2,), 3)) == hash(Frozen(1, (2,), 4))
    assert Frozen(1, (2,)) == Frozen(1, (2,)) and Frozen(1) != Frozen(2)
    assert same_repr(Frozen(1, (2,), 3), FrozenDc(1, (2,), 3))


def test_a_frozen_record_refuses_changes() -> None:
    f = Frozen(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.a = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del f.a  # type: ignore[misc]
    assert dataclasses.replace(f, a=2) == Frozen(2)


def test_a_record_in_itself_is_shown_as_dots() -> None:
    r = Rec(1)
    r.b.append(r)  # type: ignore[arg-type]
    assert repr(r) == "Rec(a=1, b=[...], ignored=0)"
