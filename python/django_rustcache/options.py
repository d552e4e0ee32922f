"""Settings of a ``RustCache`` alias, checked when the cache is first used.

Django silently ignores a misspelled cache setting; we raise ``ImproperlyConfigured`` naming it.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

#: Every OPTIONS key RustCache understands, with its default.
OPTION_DEFAULTS: dict[str, Any] = {
    "MAX_ENTRIES": 300,
    "CULL_FREQUENCY": 3,
    "MAX_BYTES": None,
    "STAMPEDE_WAIT": 10.0,
    "EVICTION_POLICY": "lru",
    "EARLY_REFRESH": 0.0,
}

#: Values of OPTIONS["EVICTION_POLICY"]: Django's LRU cull, or scan-resistant S3-FIFO.
EVICTION_POLICIES = ("lru", "s3fifo")

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


def _int_option(where: str, name: str, value: Any, minimum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImproperlyConfigured(
            f"{where}: OPTIONS[{name!r}] must be an integer, not {type(value).__name__} {value!r}."
        )
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{where}: OPTIONS[{name!r}] must be >= {minimum}, not {value}.")
    return value


@dataclass(frozen=True)
class RustCacheOptions:
    """The validated settings that the Rust store needs besides Django's own."""

    location: str
    max_bytes: int | None
    stampede_wait: float
    eviction_policy: str = "lru"
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
        if not isinstance(policy, str) or policy not in EVICTION_POLICIES:
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['EVICTION_POLICY'] must be one of "
                f"{', '.join(map(repr, EVICTION_POLICIES))}, not {policy!r}."
            )
        if "MAX_ENTRIES" in options:
            # S3-FIFO takes MAX_ENTRIES as the capacity: it must hold at least one entry.
            minimum = 1 if policy == "s3fifo" else None
            _int_option(where, "MAX_ENTRIES", options["MAX_ENTRIES"], minimum)
        if "CULL_FREQUENCY" in options:
            _int_option(where, "CULL_FREQUENCY", options["CULL_FREQUENCY"], 0)
        max_bytes = options.get("MAX_BYTES")
        if max_bytes is not None:
            max_bytes = _int_option(where, "MAX_BYTES", max_bytes, 1)
        wait = options.get("STAMPEDE_WAIT", OPTION_DEFAULTS["STAMPEDE_WAIT"])
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            raise ImproperlyConfigured(
                f"{where}: OPTIONS['STAMPEDE_WAIT'] must be a number of seconds >= 0, not {wait!r}."
            )
        try:
            early = check_early_refresh(options.get("EARLY_REFRESH", 0.0))
        except (TypeError, ValueError) as exc:
            raise ImproperlyConfigured(f"{where}: OPTIONS['EARLY_REFRESH']: {exc}") from None
        return cls(
            location=location,
            max_bytes=max_bytes,
            stampede_wait=float(wait),
            eviction_policy=policy,
            early_refresh=early,
        )


_INF = float("inf")


def check_early_refresh(beta: Any) -> float:
    """The XFetch ``beta`` as a float: a finite real number >= 0 (0 turns early refresh off).

    TypeError for a non-number (bool included), ValueError for a negative, NaN or infinite one.
    """
    if type(beta) is float and 0.0 <= beta < _INF:
        return beta  # the common case, without the slower ABC check below
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"early refresh beta must be a number >= 0, not {type(beta).__name__}")
    beta = float(beta)
    if not 0.0 <= beta < _INF:
        raise ValueError(f"early refresh beta must be a finite number >= 0, not {beta!r}")
    return beta
