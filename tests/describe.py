"""A type-exact description of a value, for comparing what `get` returns with what pickle gives.

Shared by the plain-value and plain-instance tests: ``True`` and ``1``, ``1.0`` and ``1``, list
and tuple, key and attribute orders, ``[x, x]`` against ``[x, copy(x)]`` (containers and
instances are numbered by identity) and whether an attribute name is interned all describe
differently. Atoms are described by value only: their identity is not observable.
"""

from __future__ import annotations

import enum
import sys
from typing import Any


def shape(obj: Any, ids: dict[int, int] | None = None) -> Any:
    """Describe ``obj`` (see the module docstring); ``ids`` numbers what was already met."""
    if ids is None:
        ids = {}
    t = type(obj)
    if t is float:
        return ("float", obj.hex())
    if t in (str, bytes, int, bool, type(None)):
        return (t.__name__, obj)
    first = id(obj) not in ids
    if first:
        ids[id(obj)] = len(ids)
    tag = (t.__module__, t.__qualname__, ids[id(obj)])
    if not first:
        return ("seen", tag)
    if isinstance(obj, enum.Enum):
        return (tag, obj.name)
    attrs = getattr(obj, "__dict__", None)
    state = (
        [
            (shape(k, ids), type(k) is str and sys.intern(k) is k, shape(v, ids))
            for k, v in attrs.items()
        ]
        if isinstance(attrs, dict)
        else None
    )
    if isinstance(obj, dict):
        return (tag, state, [(shape(k, ids), shape(v, ids)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (tag, state, [shape(x, ids) for x in obj])
    if isinstance(obj, (str, bytes, int, float)):
        return (tag, state, t.__mro__[-2](obj))
    slots = [
        (name, shape(getattr(obj, name), ids))
        for name in getattr(t, "__slots__", ())
        if name != "__dict__" and hasattr(obj, name)
    ]
    args = [shape(a, ids) for a in obj.args] if isinstance(obj, BaseException) else None
    return (tag, state, slots, args)
