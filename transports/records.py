"""Dataclasses cheap to make at import: a family's classes share one __repr__, __eq__ and __hash__
instead of the methods `dataclasses` compiles for every class (~0.1 ms each; a tool makes 50-100 classes as it starts).
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform

T = TypeVar("T", bound=type)


_NAMES: dict[tuple[Any, str], tuple[str, ...]] = {}


def _names(cls: Any, use: str) -> tuple[str, ...]:
    """The fields `dataclasses` would put in the method for `use`: repr, compare or hash."""
    names = _NAMES.get((cls, use))
    if names is None:
        fields = dataclasses.fields(cls)
        if use == "hash":  # as dataclasses: a field's hash, else its compare
            names = tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash))
        else:
            names = tuple(f.name for f in fields if getattr(f, use))
        _NAMES[cls, use] = names
    return names


class Record:
    """Base of a `record` class: repr and equality as a dataclass's, field by field; unhashable."""

    __slots__ = ()

    @reprlib.recursive_repr()  # as dataclasses' own: "..." for a record met again inside itself
    def __repr__(self) -> str:
        cls = type(self)
        return f"{cls.__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in _names(cls, 'repr'))})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        names = _names(type(self), "compare")
        return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)


class FrozenRecord(Record):
    """Base of a `frozen_record` class: also hashable, by its fields, as a frozen dataclass."""

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, n) for n in _names(type(self), "hash")))


_record: Callable[[Any], Any] = dataclasses.dataclass(repr=False, eq=False)
_frozen: Callable[[Any], Any] = dataclasses.dataclass(repr=False, eq=False, frozen=True)


@dataclass_transform(field_specifiers=(dataclasses.field,))
def record(cls: T) -> T:
    """@dataclass for a subclass of Record; only __init__ is compiled."""
    assert issubclass(cls, Record), cls
    made: T = _record(cls)
    return made


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def frozen_record(cls: T) -> T:
    """@dataclass(frozen=True) for a subclass of FrozenRecord; __init__, __setattr__ and __delattr__
    are compiled."""
    assert issubclass(cls, FrozenRecord), cls
    made: T = _frozen(cls)
    return made
