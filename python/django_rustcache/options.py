"""Settings of a ``RustCache`` alias, checked when the cache is first used.

Django silently ignores a misspelled cache setting; we raise ``ImproperlyConfigured`` naming it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: Every OPTIONS key RustCache understands, with its default.
OPTION_DEFAULTS: dict[str, Any] = {
    "MAX_ENTRIES": 300,
    "CULL_FREQUENCY": 3,
    "MAX_BYTES": None,
    "STAMPEDE_WAIT": 10.0,
    #: None: "lru" up to 65,536 entries, "tinylfu" above (decided by a LOCATION's first alias).
    "EVICTION_POLICY": None,
    "EARLY_REFRESH": 0.0,
}

#: Values of OPTIONS["EVICTION_POLICY"]: Django's LRU cull, scan-resistant S3-FIFO, or adaptive
#: W-TinyLFU (scan- and loop-resistant).
EVICTION_POLICIES = ("lru", "s3fifo", "tinylfu")

#: Top-level keys of a CACHES entry that Django's BaseCache reads (besides BACKEND and LOCATION,
#: which Django takes out before building the backend).
TOP_LEVEL_KEYS = frozenset(
    {
        "TIMEOUT",
        "KEY_PREFIX",
        "VERSION",
        "KEY_FUNCTION",
        "OPTIONS",
        "timeout",
        "max_entries",
        "cull_frequency",
    }
)


_INF = float("inf")

#: Real numbers of seconds or betas: ``numbers.Real`` (int, float, Fraction) and Decimal.
_REALS = (numbers.Real, Decimal)

#: The largest MAX_ENTRIES / MAX_BYTES the store takes (a signed 64-bit count); a larger setting
#: means "no bound" and is clamped to it.
STORE_INT_MAX = 2**63 - 1

#: The longest STAMPEDE_WAIT, in seconds (a year): a larger one, ``inf`` included, is clamped to it.
STAMPEDE_WAIT_MAX = 365 * 24 * 3600.0


def _django_int(where: str, name: str, value: Any, fallback: int | None) -> int:
    """``int(value)``, as Django's BaseCache parses MAX_ENTRIES, CULL_FREQUENCY and TIMEOUT.

    Where ``int()`` raises ValueError or TypeError, Django silently uses ``fallback`` (None: not
    a Django setting); where it raises OverflowError (``inf``), Django raises it. Both are
    ImproperlyConfigured here.
    """
    try:
        return int(value)
    except (ValueError, TypeError):
        django = "" if fallback is None else f" (Django would silently use {fallback})"
        raise ImproperlyConfigured(
            f"{where}: {name} must be an integer (anything int() accepts, as Django reads it), "
            f"not {type(value).__name__} {value!r}{django}."
        ) from None
    except OverflowError:
        raise ImproperlyConfigured(f"{where}: {name} must be finite, not {value!r}.") from None


def _read(
    params: dict[str, Any], options: dict[str, Any], name: str, default: Any
) -> tuple[str, Any]:
    """Where Django's BaseCache reads a setting from, and its value: the top-level lowercase key
    (``max_entries``, ``cull_frequency``, ``timeout``) wins over ``OPTIONS`` (or top-level TIMEOUT).
    """
    lower = name.lower()
    if lower in params:
        return lower, params[lower]
    where = name if options is params else f"OPTIONS[{name!r}]"
    return where, options.get(name, default)


def clamp_store_int(value: int) -> int:
    """MAX_ENTRIES or CULL_FREQUENCY as Django parsed it, clamped to what the store takes."""
    return max(-STORE_INT_MAX - 1, min(value, STORE_INT_MAX))


def int_option(where: str, name: str, value: Any, minimum: int) -> int:
    """``OPTIONS[name]`` read as Django reads MAX_ENTRIES (anything ``int()`` takes), at least
    ``minimum``, clamped to what the store takes (NearCache's L1 options)."""
    number = _django_int(where, f"OPTIONS[{name!r}]", value, None)
    if number < minimum:
        raise ImproperlyConfigured(
            f"{where}: OPTIONS[{name!r}] must be >= {minimum}, not {number}."
        )
    return clamp_store_int(number)


def _seconds(where: str, name: str, value: Any) -> float:
    """A real number of seconds >= 0 (not bool, not NaN) as a float, at most STAMPEDE_WAIT_MAX."""
    if isinstance(value, bool) or not isinstance(value, _REALS):
        raise ImproperlyConfigured(
            f"{where}: {name} must be a number of seconds >= 0, not {type(value).__name__} "
            f"{value!r}."
        )
    try:
        seconds = float(value)
    except OverflowError:
        seconds = _INF  # an int past a float's range
    except ValueError:
        seconds = float("nan")  # Decimal('sNaN')
    if not seconds >= 0:
        raise ImproperlyConfigured(
            f"{where}: {name} must be a number of seconds >= 0, not {value!r}."
        )
    return min(seconds, STAMPEDE_WAIT_MAX)


@dataclass(frozen=True)
class RustCacheOptions:
    """The validated settings that the Rust store needs besides Django's own."""

    location: str
    max_bytes: int | None
    stampede_wait: float
    #: None: the store's, or for a new store "lru" up to 65,536 entries and "tinylfu" above.
    eviction_policy: str | None = None
    #: XFetch beta for ``get_or_set`` (0: off); see ``check_early_refresh``.
    early_refresh: float = 0.0

    @classmethod
    def from_params(cls, location: Any, params: dict[str, Any]) -> RustCacheOptions:
        """Check a CACHES entry (as Django passes it to the backend) and extract our options."""
        where = f"RustCache LOCATION {location!r}"
        if not isinstance(location, str):
            raise ImproperlyConfigured(
                f"{where}: LOCATION must be a string, not {type(location).__name__}."
            )
        unknown = sorted(set(params) - TOP_LEVEL_KEYS)
        if unknown:
            raise ImproperlyConfigured(
                f"{where}: unknown setting {unknown[0]!r}; "
                f"expected one of {', '.join(sorted(k for k in TOP_LEVEL_KEYS if k.isupper()))}."
            )
        options = params.get("OPTIONS", {})
        if not isinstance(options, dict):
            raise ImproperlyConfigured(
                f"{where}: OPTIONS must be a dict, not {type(options).__name__}."
            )
        unknown = sorted(set(options) - set(OPTION_DEFAULTS))
        if unknown:
            raise ImproperlyConfigured(
                f"{where}: unknown OPTIONS key {unknown[0]!r}; "
                f"expected one of {', '.join(OPTION_DEFAULTS)}."
            )
        policy = options.get("EVICTION_POLICY", OPTION_DEFAULTS["EVICTION_POLICY"])
        given = "EVICTION_POLICY" in options
        if given and (not isinstance(policy, str) or policy not in EVICTION_POLICIES):
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['EVICTION_POLICY'] must be one of "
                f"{', '.join(map(repr, EVICTION_POLICIES))}, not {policy!r}."
            )
        # What Django's BaseCache reads: a top-level lowercase key wins over the OPTIONS one.
        name, max_entries = _read(params, options, "MAX_ENTRIES", 300)
        max_entries = _django_int(where, name, max_entries, 300)
        # S3-FIFO and W-TinyLFU take MAX_ENTRIES as the capacity: it must hold at least one entry.
        if policy not in ("lru", None) and max_entries < 1:
            raise ImproperlyConfigured(
                f"{where}: {name} must be >= 1 under EVICTION_POLICY {policy!r}, not {max_entries}."
            )
        name, cull = _read(params, options, "CULL_FREQUENCY", 3)
        cull = _django_int(where, name, cull, 3)
        if cull < 0:
            # LocMemCache would never cull (a negative count): the store would grow unbounded.
            raise ImproperlyConfigured(f"{where}: {name} must be >= 0, not {cull}.")
        name, timeout = _read(params, params, "TIMEOUT", 300)
        if timeout is not None:
            timeout = _django_int(where, name, timeout, 300)
            try:
                float(timeout)
            except OverflowError:
                # LocMemCache would raise OverflowError from every set using the default.
                raise ImproperlyConfigured(
                    f"{where}: TIMEOUT {timeout} is past a float's range; use None for never."
                ) from None
        max_bytes = options.get("MAX_BYTES")
        if max_bytes is not None:
            max_bytes = _django_int(where, "OPTIONS['MAX_BYTES']", max_bytes, None)
            if max_bytes < 1:
                raise ImproperlyConfigured(
                    f"{where}: OPTIONS['MAX_BYTES'] must be >= 1 (or None), not {max_bytes}."
                )
            max_bytes = min(max_bytes, STORE_INT_MAX)
        wait = _seconds(
            where,
            "OPTIONS['STAMPEDE_WAIT']",
            options.get("STAMPEDE_WAIT", OPTION_DEFAULTS["STAMPEDE_WAIT"]),
        )
        try:
            early = check_early_refresh(options.get("EARLY_REFRESH", 0.0))
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"{where}: OPTIONS['EARLY_REFRESH']: {exc}") from None
        return cls(
            location=location,
            max_bytes=max_bytes,
            stampede_wait=wait,
            eviction_policy=policy,
            early_refresh=early,
        )


def check_early_refresh(beta: Any) -> float:
    """The XFetch ``beta`` as a float: a finite real number >= 0 (0 turns early refresh off).

    TypeError for a non-number (bool included), ValueError for a negative, NaN or infinite one.
    """
    if type(beta) is float and 0.0 <= beta < _INF:
        return beta  # the common case, without the slower ABC check below
    if isinstance(beta, bool) or not isinstance(beta, _REALS):
        raise TypeError(f"early refresh beta must be a number >= 0, not {type(beta).__name__}")
    try:
        beta = float(beta)
    except OverflowError:
        beta = _INF  # an int past a float's range
    if not 0.0 <= beta < _INF:
        raise ValueError(f"early refresh beta must be a finite number >= 0, not {beta!r}")
    return beta
