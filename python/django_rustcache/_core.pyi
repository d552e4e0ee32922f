"""Type stubs for the native module built from ``src/`` (the Rust store)."""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, final

__all__ = [
    "Handle",
    "Fill",
    "TagSnapshot",
    "FastMethod",
    "Near",
    "near",
    "sentinel_switches",
    "compress",
    "decompress",
    "fork_generation",
    "__version__",
]

__version__: str

def fork_generation() -> int:
    """How many fork()s separate this process from the one that loaded the module."""

def sentinel_switches() -> int:
    """How many master switches (Sentinel's ``+switch-master``) this process's listeners acted
    on; the data path drops its connections to the old master when it sees it move."""

def compress(data: bytes, codec: str) -> bytes:
    """``data`` compressed with ``codec`` ("zstd" or "lz4") as a frame naming its codec."""

def decompress(frame: bytes, max_size: int) -> bytes:
    """A frame's content; ValueError if malformed or above ``max_size`` bytes (bounded)."""

@final
class TagSnapshot:
    """Tag versions taken before computing a value; storing with it is refused if any moved."""

    def is_current(self) -> bool: ...
    def __len__(self) -> int: ...

@final
class Fill:
    """One fill of a key (``Handle.fill``): ``put`` stores once unless it was cancelled; leaving
    the ``with`` block (or ``release``) ends it, waking the callers waiting for the key."""

    def put(
        self,
        key: Any,
        value: Any,
        timeout: Any,
        version: Any = None,
        delta: float = 0.0,
        replace: bool = True,
        *,
        pickled: bytes | None = None,
    ) -> bool: ...
    def release(self) -> None: ...
    @property
    def leads(self) -> bool: ...
    @property
    def open(self) -> bool: ...
    def __enter__(self) -> Fill: ...
    def __exit__(self, *_exc: object) -> bool: ...

@final
class FastMethod:
    """Descriptor: the instance's bound Rust method stored under ``slot`` if any, else ``func``."""

    def __new__(cls, func: Callable[..., Any], slot: str) -> FastMethod: ...
    def __get__(self, obj: object, owner: type | None = None, /) -> Callable[..., Any]: ...
    @property
    def __wrapped__(self) -> Callable[..., Any]: ...

@final
class Handle:
    """One backend instance's view of the store named ``location`` (one per name per process)."""

    def __new__(
        cls,
        location: str,
        sentinel: object,
        warn: Callable[[str], object],
        shards: int | None = None,
        policy: str | None = None,
        max_entries: int = 300,
    ) -> Handle: ...
    @property
    def location(self) -> str: ...
    @property
    def eviction_policy(self) -> str: ...
    def configure(
        self, prefix: object, version: object, default_timeout: float | None, raw: bool
    ) -> None: ...
    def set_limits(
        self, max_entries: int, cull_frequency: int, max_bytes: int | None = None
    ) -> None: ...
    def make_key(self, key: Any, version: Any = None) -> str: ...
    def get(self, key: Any, default: Any = None, version: Any = None) -> Any: ...
    def set(
        self,
        key: Any,
        value: Any,
        timeout: Any,
        version: Any = None,
        tags: Iterable[str] | TagSnapshot | None = None,
    ) -> bool: ...
    def set_value(
        self,
        key: Any,
        value: Any,
        timeout: Any = ...,
        version: Any = None,
        tags: Iterable[str] | TagSnapshot | None = None,
    ) -> None: ...
    def add(
        self,
        key: Any,
        value: Any,
        timeout: Any,
        version: Any = None,
        tags: Iterable[str] | TagSnapshot | None = None,
    ) -> bool: ...
    def delete(self, key: Any, version: Any = None) -> bool: ...
    def has_key(self, key: Any, version: Any = None) -> bool: ...
    def touch(self, key: Any, timeout: Any, version: Any = None) -> bool: ...
    def incr(self, key: Any, delta: Any, version: Any = None) -> Any: ...
    def get_many(self, keys: Iterable[Any], version: Any = None) -> dict[Any, Any]: ...
    def set_many(
        self,
        data: Mapping[Any, Any],
        timeout: Any,
        version: Any = None,
        tags: Iterable[str] | TagSnapshot | None = None,
    ) -> list[Any]: ...
    def delete_many(self, keys: Iterable[Any], version: Any = None) -> None: ...
    def clear(self) -> None: ...
    def invalidate_tags(self, tags: Iterable[str]) -> int: ...
    def get_early(
        self, key: Any, default: Any, version: Any, beta: float, u: float
    ) -> tuple[Any, bool]: ...
    def snapshot_tags(self, tags: Iterable[str] | TagSnapshot) -> TagSnapshot: ...
    def keys(self, version: Any = None) -> list[str]: ...
    def expiry(self, key: Any, version: Any = None) -> float | None: ...
    def ttl(self, key: Any, version: Any = None) -> float | None: ...
    def fill(
        self,
        key: str,
        wait: float | None = None,
        exclusive: bool = False,
        tags: Iterable[str] | TagSnapshot | None = None,
    ) -> Fill | None: ...
    def invalidate_made(self, made_keys: Iterable[str]) -> int: ...
    def near_attach(
        self,
        near: Near,
        tagged: type,
        miss: object,
        stale: object,
        fallback: Callable[[Any, Any, Any, Any], Any],
    ) -> None: ...
    def near_detach(self) -> None: ...
    def near_get(self, key: Any, default: Any = None, version: Any = None) -> Any: ...
    def near_peek(self, key: Any, version: Any = None) -> Any: ...
    def near_many(
        self, keys: Iterable[Any], version: Any = None
    ) -> tuple[dict[Any, Any], dict[str, Any], list[str]] | None: ...
    def locked(self) -> bool: ...
    def stats(self) -> dict[str, Any]: ...
    def __len__(self) -> int: ...

@final
class Near:
    """The invalidation listener and lease of one L1 store; one per (process, l1_location)."""

    def __new__(
        cls,
        l1_location: str,
        *,
        host: str | None,
        port: int,
        unix_path: str | None,
        username: str | None,
        password: str | None,
        prefix: str,
        lease: float,
        mode: str,
        channel: str,
        connect_timeout: float,
        tls: dict[str, Any] | None = None,
        sentinel: dict[str, Any] | None = None,
    ) -> Near: ...
    @property
    def l1_location(self) -> str: ...
    def ensure_started(self) -> None: ...
    def fresh(self) -> bool: ...
    def wait_fresh(self, timeout: float) -> bool: ...
    def stats(self) -> dict[str, object]: ...
    def note_writes(self, keys: Iterable[str]) -> None: ...
    def applied_ns(self, key: str) -> int | None: ...
    def master_switch(self) -> tuple[int, tuple[str, int], tuple[str, int]] | None:
        """Behind Sentinel: the last switch acted on, ``(epoch, new master, announcing
        sentinel)``, or None."""
    def close(self) -> None: ...

def near(
    l1_location: str,
    *,
    host: str | None,
    port: int,
    unix_path: str | None,
    username: str | None,
    password: str | None,
    prefix: str,
    lease: float,
    mode: str,
    channel: str,
    connect_timeout: float,
    tls: dict[str, Any] | None = None,
    sentinel: dict[str, Any] | None = None,
) -> Near: ...
