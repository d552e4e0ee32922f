"""NearCache's ``COMPRESS``: pickles above ``COMPRESS_MIN_SIZE`` stored compressed (zstd or lz4,
``_core.compress``), signed over the compressed bytes, decoded by marker whatever the reader's
own setting, decompression bounded by ``COMPRESS_MAX_SIZE`` (a bad or oversized frame is a
logged miss, never an exception or unbounded memory), never of a value whose signature fails."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_rustcache import NearCache, _core
from django_rustcache import near as near_mod
from tests.test_near import FakeListener

#: A 20 KB-ish page and a dict: both compress well.
PAGE = "".join(
    f"<li class='product'><a href='/p/{i}/'>apple pie {i}</a></li>\n" for i in range(400)
)
RECORDS = {"results": [{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(300)]}
SMALL = {"id": 1, "name": "apple"}

_made = 0


@pytest.fixture
def make(near_server, raw, monkeypatch):
    """``make(compress, **options)``: a NearCache with that COMPRESS (a real L1 under a fake
    lease that is always fresh); ``key_prefix=`` shares another cache's keys, and then L1 is
    emptied (it is one store per process and prefix, shared with the other cache): the new one
    reads what is in Redis, as another process would."""
    monkeypatch.setattr(near_mod, "LISTENER_FACTORY", lambda *a, **k: FakeListener())

    def make(compress=False, key_prefix=None, **options):
        global _made
        _made += 1
        params = {
            "KEY_PREFIX": key_prefix or f"z{_made}",
            "OPTIONS": {"COMPRESS": compress, **options},
        }
        cache = NearCache(near_server.url, params)
        if key_prefix:
            cache._h.clear()
        return cache

    return make


@pytest.fixture
def decompressions(monkeypatch):
    """Counts calls of ``_core.decompress`` (as NearCache makes them)."""
    calls = []
    real = _core.decompress

    def counting(frame, max_size):
        calls.append(len(frame))
        return real(frame, max_size)

    monkeypatch.setattr(near_mod._core, "decompress", counting)
    return calls


def made(cache, key):
    return f"{cache.key_prefix}:1:{key}"


def body(cache, stored):
    """What the value holds behind the signature (the stored bytes if unsigned)."""
    if cache._options.signed:
        assert stored.startswith(near_mod.SIGNED_MAGIC)
        return stored[len(near_mod.SIGNED_MAGIC) + 32 :]
    return stored


# Options ------------------------------------------------------------------------------------


def test_compress_options_are_read_and_checked(make):
    assert make()._options.compress is None
    assert make(True)._options.compress == "zstd"
    assert make("zstd")._options.compress == "zstd"
    assert make("lz4")._options.compress == "lz4"
    o = make("lz4", COMPRESS_MIN_SIZE=0, COMPRESS_MAX_SIZE=10)._options
    assert (o.compress_min_size, o.compress_max_size) == (0, 10)
    assert make(COMPRESS_MAX_SIZE=2**80)._options.compress_max_size == sys.maxsize
    defaults = make()._options
    assert (defaults.compress_min_size, defaults.compress_max_size) == (1024, 64 * 2**20)
    for bad in ("zlib", "ZSTD", 1, "", ["zstd"]):
        with pytest.raises(ImproperlyConfigured, match=r"OPTIONS\['COMPRESS'\] must be"):
            make(bad)
    for name, value in [
        ("COMPRESS_MIN_SIZE", -1),
        ("COMPRESS_MIN_SIZE", 1.5),
        ("COMPRESS_MIN_SIZE", True),
        ("COMPRESS_MAX_SIZE", 0),
        ("COMPRESS_MAX_SIZE", "64MB"),
    ]:
        with pytest.raises(ImproperlyConfigured, match=rf"OPTIONS\['{name}'\] must be"):
            make("zstd", **{name: value})
    with pytest.raises(ImproperlyConfigured, match="COMPRESS_MIN_SIZE'\\] \\(100\\) is above"):
        make("zstd", COMPRESS_MIN_SIZE=100, COMPRESS_MAX_SIZE=99)


# The native codec ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "codec,magic", [("zstd", near_mod.ZSTD_MAGIC), ("lz4", near_mod.LZ4_MAGIC)], ids=["zstd", "lz4"]
)
def test_native_frames_carry_the_markers_near_reads(codec, magic):
    data = pickle.dumps(PAGE)
    frame = _core.compress(data, codec)
    assert frame.startswith(magic) and len(frame) < len(data) / 3
    assert _core.decompress(frame, len(data)) == data
    with pytest.raises(ValueError, match="more than the limit"):
        _core.decompress(frame, len(data) - 1)
    big = os.urandom(100) * 2000  # past the size at which the GIL is released
    assert _core.decompress(_core.compress(big, codec), len(big)) == big
    with pytest.raises(ValueError, match="unknown codec"):
        _core.compress(data, "zlib")
    with pytest.raises(ValueError, match="not a compressed frame"):
        _core.decompress(data, 10**6)
    with pytest.raises(TypeError):
        _core.decompress(bytearray(frame), 10**6)  # mutable: never read without the GIL


# Round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(
    "codec,magic", [("zstd", near_mod.ZSTD_MAGIC), ("lz4", near_mod.LZ4_MAGIC)], ids=["zstd", "lz4"]
)
def test_values_above_the_threshold_are_stored_compressed_and_read_back(
    make, raw, codec, magic, signed
):
    cache = make(codec, SIGNED=signed)
    cache.set("page", PAGE)
    cache.set("small", SMALL)
    stored = raw.get(made(cache, "page"))
    assert body(cache, stored).startswith(magic)
    assert len(stored) < len(pickle.dumps(PAGE)) / 3
    small = body(cache, raw.get(made(cache, "small")))
    assert small == pickle.dumps(SMALL, pickle.HIGHEST_PROTOCOL)  # below 1 KB: as before
    assert cache.get("page") == PAGE  # L1
    cache._h.clear()
    assert cache.get("page") == PAGE  # from Redis, decompressed, into L1
    assert cache.get("small") == SMALL
    assert cache.stats()["l2_hits"] == 2
    assert cache._h.get(made(cache, "page")) == PAGE  # L1 holds the value, not the frame
    # Another process (a cache with an empty L1) reads the same bytes.
    assert make(codec, key_prefix=cache.key_prefix, SIGNED=signed).get("page") == PAGE


def test_the_threshold_and_incompressible_values(make, raw):
    repeated = "ab" * 100  # a 200-character string: below the default threshold
    assert len(pickle.dumps(repeated)) < 1024
    below = make("zstd")
    below.set("small", repeated)
    assert body(below, raw.get(made(below, "small"))) == pickle.dumps(repeated, 5)
    cache = make("zstd", COMPRESS_MIN_SIZE=0)
    cache.set("small", repeated)
    assert body(cache, raw.get(made(cache, "small"))).startswith(near_mod.ZSTD_MAGIC)
    assert make("zstd", key_prefix=cache.key_prefix).get("small") == repeated
    # Random bytes do not shrink: stored as a plain (signed) pickle.
    noise = os.urandom(5000)
    cache.set("noise", noise)
    assert body(cache, raw.get(made(cache, "noise"))) == pickle.dumps(noise, 5)
    # Above COMPRESS_MAX_SIZE a value is stored uncompressed, so its own readers can read it.
    capped = make("zstd", COMPRESS_MAX_SIZE=2000)
    capped.set("page", PAGE)
    assert body(capped, raw.get(made(capped, "page"))) == pickle.dumps(PAGE, 5)
    capped._h.clear()
    assert capped.get("page") == PAGE


def test_a_value_the_codec_refuses_is_stored_as_it_is(make, raw, monkeypatch):
    cache = make("lz4")

    def refuse(data, codec):
        raise ValueError("4294967296 bytes are too many for one frame")  # as LZ4 past 4 GiB

    monkeypatch.setattr(near_mod._core, "compress", refuse)
    cache.set("page", PAGE)
    assert body(cache, raw.get(made(cache, "page"))) == pickle.dumps(PAGE, 5)
    assert make("lz4", key_prefix=cache.key_prefix).get("page") == PAGE


def test_ints_stay_raw_for_incr_whatever_their_size(make, raw):
    cache = make("zstd", COMPRESS_MIN_SIZE=0)
    cache.set("n", 41)
    assert raw.get(made(cache, "n")) == b"41"
    assert cache.incr("n") == 42
    huge = 10**1500  # 1501 digits, above the threshold
    cache.set("huge", huge)
    assert raw.get(made(cache, "huge")) == str(huge).encode()
    cache._h.clear()
    assert cache.get("huge") == huge


def test_values_written_with_and_without_compression_read_either_way(make, raw):
    plain = make(False)
    zstd = make("zstd", key_prefix=plain.key_prefix)
    lz4 = make("lz4", key_prefix=plain.key_prefix)
    plain.set("old", PAGE)  # written before COMPRESS was turned on
    zstd.set("new", RECORDS)
    lz4.set("lz", PAGE)
    assert body(plain, raw.get(made(plain, "old"))) == pickle.dumps(PAGE, 5)
    for reader in (
        make(False, key_prefix=plain.key_prefix),
        make("lz4", key_prefix=plain.key_prefix),
    ):
        assert reader.get_many(["old", "new", "lz"]) == {"old": PAGE, "new": RECORDS, "lz": PAGE}
    # Unsigned too (decode by marker, not by setting).
    u_plain = make(False, SIGNED=False)
    u_zstd = make("zstd", key_prefix=u_plain.key_prefix, SIGNED=False)
    u_plain.set("old", PAGE)
    u_zstd.set("new", PAGE)
    assert raw.get(made(u_plain, "new")).startswith(near_mod.ZSTD_MAGIC)
    fresh = make(False, key_prefix=u_plain.key_prefix, SIGNED=False)
    assert fresh.get_many(["old", "new"]) == {"old": PAGE, "new": PAGE}


def test_tagged_values_are_compressed_inside_their_header(make, raw):
    cache = make("zstd")
    cache.set("t", PAGE, tags=["products"])
    stored = raw.get(made(cache, "t"))
    assert stored.startswith(near_mod.TAGGED_MAGIC)
    n = int(stored[5:13], 16)
    assert body(cache, stored[13 + n :]).startswith(near_mod.ZSTD_MAGIC)
    reader = make(False, key_prefix=cache.key_prefix)
    assert reader.get("t") == PAGE
    assert reader.get_many(["t"]) == {"t": PAGE}
    assert cache.get_or_set("u", lambda: RECORDS, tags=["products"]) == RECORDS
    assert make(False, key_prefix=cache.key_prefix).get("u") == RECORDS
    cache.invalidate_tags(["products"])
    assert reader.get("t", "gone") == "gone"
    assert reader.get("u", "gone") == "gone"


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_many_and_async_paths(make, raw, codec):
    cache = make(codec)
    assert cache.set_many({"a": PAGE, "b": RECORDS, "c": SMALL}) == []
    for key in ("a", "b"):
        assert body(cache, raw.get(made(cache, key)))[:5] in near_mod._COMPRESSED
    reader = make(False, key_prefix=cache.key_prefix)
    assert reader.get_many(["a", "b", "c"]) == {"a": PAGE, "b": RECORDS, "c": SMALL}

    async def scenario():
        await cache.aset("x", PAGE)
        assert await cache.aset_many({"y": RECORDS}) == []
        assert await cache.aadd("z", PAGE)
        other = make(False, key_prefix=cache.key_prefix)
        return (
            await other.aget("x"),
            await other.aget_many(["x", "y", "z"]),
            await other.aget_or_set("w", lambda: PAGE),
        )

    x, many, w = asyncio.run(scenario())
    assert x == PAGE and many == {"x": PAGE, "y": RECORDS, "z": PAGE} and w == PAGE
    assert body(cache, raw.get(made(cache, "z")))[:5] in near_mod._COMPRESSED
    assert body(cache, raw.get(made(cache, "w"))) == pickle.dumps(PAGE, 5)  # other: COMPRESS off


# Bad frames and bombs -----------------------------------------------------------------------


def lz4_frame(declared, block=b""):
    return near_mod.LZ4_MAGIC + declared.to_bytes(4, "little") + block


@pytest.mark.parametrize(
    "frame,why",
    [
        (near_mod.ZSTD_MAGIC + b"not zstd at all", "not a zstd frame"),
        (near_mod.LZ4_MAGIC + b"\x01", "truncated"),
        (lz4_frame(2**32 - 1), "more than the limit"),  # 9 bytes declaring 4 GiB
        (_core.compress(b"\0" * (2 * 2**20), "zstd"), "more than the limit"),  # a real 2 MB bomb
        (lz4_frame(100, b"\x1f" + b"x"), "malformed"),  # a block shorter than it declares
    ],
    ids=["not-zstd", "truncated-lz4", "lz4-declares-4GiB", "zstd-2MB-of-zeros", "lz4-short"],
)
def test_a_bad_or_oversized_frame_is_a_logged_miss(make, raw, caplog, frame, why):
    # SIGNED=False: whatever is in Redis is decompressed, so the bound is what protects us.
    cache = make("zstd", SIGNED=False, COMPRESS_MAX_SIZE=2**20)
    raw.set(made(cache, "k"), frame)
    raw.set(made(cache, "ok"), cache._encode(made(cache, "ok"), PAGE))
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        assert cache.get("k", "miss") == "miss"
        assert cache.get_many(["k", "ok"]) == {"ok": PAGE}

        async def aget():
            return await cache.aget("k", "miss")

        assert asyncio.run(aget()) == "miss"
    assert why in caplog.text and made(cache, "k") in caplog.text
    assert cache.stats()["bad_frames"] == 3
    assert cache.stats()["misses"] == 3
    assert cache._h.get(made(cache, "k"), "none") == "none"  # nothing kept in L1


def test_a_frame_that_inflates_past_its_declared_size_is_a_miss(make, raw, caplog):
    cache = make("lz4", SIGNED=False)
    frame = _core.compress(pickle.dumps("y" * 100_000), "lz4")
    forged = frame[:5] + (1000).to_bytes(4, "little") + frame[9:]  # declares 1 KB
    raw.set(made(cache, "k"), forged)
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        assert cache.get("k", "miss") == "miss"
    assert "malformed" in caplog.text
    assert cache.stats()["bad_frames"] == 1


def test_a_signed_value_over_the_readers_limit_is_a_logged_miss(make, raw, caplog):
    writer = make("zstd")
    writer.set("k", PAGE)
    # The bound holds with COMPRESS off too (reads decode by marker).
    reader = make(False, key_prefix=writer.key_prefix, COMPRESS_MAX_SIZE=1000)
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        assert reader.get("k", "miss") == "miss"
    assert "COMPRESS_MAX_SIZE" in caplog.text
    assert reader.stats()["bad_frames"] == 1
    assert reader.stats()["bad_signatures"] == 0


# The signature comes first ------------------------------------------------------------------


def test_a_forged_compressed_value_is_never_decompressed(make, raw, caplog, decompressions):
    cache = make("zstd")
    key = made(cache, "k")
    cache.set("k", PAGE)
    genuine = raw.get(key)
    cache._h.clear()
    assert cache.get("k") == PAGE
    assert len(decompressions) == 1  # a genuine value is decompressed once verified
    frame = body(cache, genuine)
    forged = [
        near_mod.SIGNED_MAGIC + b"\0" * 32 + frame,  # a wrong MAC
        genuine[:-1] + bytes([genuine[-1] ^ 1]),  # the frame changed under a genuine MAC
        frame,  # an unsigned frame in a SIGNED cache
        near_mod.SIGNED_MAGIC + b"\0" * 32 + lz4_frame(2**32 - 1),  # a bomb, unsigned
        lz4_frame(2**32 - 1),
    ]
    with caplog.at_level(logging.WARNING, logger="django_rustcache.near"):
        for value in forged:
            raw.set(key, value)
            cache._h.clear()
            assert cache.get("k", "miss") == "miss"
            assert cache.get_many(["k"]) == {}
    assert len(decompressions) == 1
    assert cache.stats()["bad_signatures"] == 2 * len(forged)
    assert cache.stats()["bad_frames"] == 0
    assert "signature does not verify" in caplog.text and "not signed" in caplog.text
    # A frame moved to another key does not verify there either.
    raw.set(made(cache, "other"), genuine)
    assert cache.get("other", "miss") == "miss"
    assert len(decompressions) == 1
