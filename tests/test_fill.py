"""A fill is a guard (``Handle.fill`` -> ``_core.Fill``): it stores at most once, nothing if the key
was removed, written or flushed or one of its tags invalidated since it began, and it ends (its
single-flight, its placeholder) however the code that holds it exits (``src/store/fill.rs``)."""

from __future__ import annotations

import gc
import itertools
import uuid
from typing import Any

import pytest

from django_rustcache import RustCache
from tests.test_early_refresh import ALMOST_ONE
from tests.test_fork import fork_and_wait


def make(**options: Any) -> RustCache:
    return RustCache(f"fill-{uuid.uuid4().hex}", {"OPTIONS": options})


# What get_or_set and early refresh gain ------------------------------------------------------


def test_a_delete_while_get_or_set_computes_makes_its_fill_store_nothing() -> None:
    c = make()

    def compute() -> str:
        c.delete("k")  # the data behind "k" changed meanwhile: its invalidation arrives
        return "computed from the old data"

    assert c.get_or_set("k", compute) == "computed from the old data"
    assert c.get("k") is None


def test_a_write_while_get_or_set_computes_wins() -> None:
    c = make()

    def compute() -> str:
        c.set("k", "written meanwhile")
        return "computed"

    assert c.get_or_set("k", compute) == "written meanwhile"
    assert c.get("k") == "written meanwhile"


def test_a_write_while_an_early_refresh_computes_wins_over_the_refresh() -> None:
    c = make()
    c._early_clock = itertools.count(0.0, 10.0).__next__  # every default() takes 10 s
    c._early_random = lambda: ALMOST_ONE  # the draw that refreshes anything expiring in 367 s
    assert c.get_or_set("k", lambda: "first", timeout=60, early_refresh=1) == "first"

    def refresh() -> str:
        c.set("k", "written meanwhile", timeout=60)
        return "refreshed"

    # The hit was refreshed (else "first" would come back), and the write made during the
    # refresh stays: it is newer than what the refresh computed.
    assert c.get_or_set("k", refresh, timeout=60, early_refresh=1) == "written meanwhile"
    assert c.get("k") == "written meanwhile"


def test_a_tag_invalidated_while_get_or_set_computes_makes_its_fill_store_nothing() -> None:
    c = make()

    def compute() -> str:
        c.invalidate_tags(["t"])
        return "stale"

    assert c.get_or_set("k", compute, tags=["t"]) == "stale"
    assert c.get("k") is None
    assert c.get_or_set("k", lambda: "fresh", tags=["t"]) == "fresh"
    assert c.get("k") == "fresh"


# The guard itself ----------------------------------------------------------------------------


def test_leaving_the_with_block_ends_the_fill_even_on_an_exception() -> None:
    c = make()
    made = c.make_key("k")
    with pytest.raises(RuntimeError), c._h.fill(made, wait=1.0) as fill:
        assert fill.leads and fill.open
        assert c._h.fill(made, exclusive=True) is None, "the key is being filled"
        raise RuntimeError("default() raised")
    assert not fill.open
    assert fill.put("k", "late", 60) is False, "an ended fill stores nothing"
    assert c.get("k") is None
    with c._h.fill(made, exclusive=True) as again:
        assert again is not None, "the flight ended with the block"
    assert c.stats()["bytes"] == 0, "no placeholder is left behind"


def test_a_fill_dropped_without_put_or_with_ends_too() -> None:
    c = make()
    made = c.make_key("k")
    fill = c._h.fill(made, wait=1.0)
    assert fill is not None and fill.leads
    del fill
    gc.collect()
    assert c._h.fill(made, exclusive=True) is not None
    assert c.stats()["bytes"] == 0


def test_a_fill_stores_once_and_only_its_own_key() -> None:
    c = make()
    with c._h.fill(c.make_key("k"), wait=1.0) as fill:
        with pytest.raises(ValueError, match="begun for"):
            fill.put("other", 1, 60)
        assert fill.open
        assert fill.put("k", 1, 60, replace=False) is True
        assert fill.put("k", 2, 60) is False
    assert c.get("k") == 1
    assert c.get("other") is None


def test_a_nested_fill_of_a_key_this_thread_leads_keeps_the_outer_flight() -> None:
    c = make()
    made = c.make_key("k")
    with c._h.fill(made, wait=1.0) as outer:
        with c._h.fill(made, wait=1.0) as inner:
            assert inner is not None and not inner.leads
            assert inner.put("k", "inner", 60) is True
        assert c._h.fill(made, exclusive=True) is None, "still the outer fill's flight"
        assert outer.put("k", "outer", 60) is False
    assert c.get("k") == "inner"


@pytest.mark.filterwarnings("ignore:.*fork\\(\\):DeprecationWarning")
def test_a_fill_begun_before_a_fork_is_inert_in_the_child() -> None:
    c = make()
    made = c.make_key("k")
    fill = c._h.fill(made, wait=1.0)

    def child() -> bool:
        inert = not fill.open and fill.put("k", "child", 60) is False and c.get("k") is None
        fill.release()
        # The child leads the key itself.
        with c._h.fill(made, exclusive=True) as own:
            return inert and own is not None and own.put("k", "mine", 60) and c.get("k") == "mine"

    assert fork_and_wait(child) == "ok"
    assert fill.open
    assert fill.put("k", "parent", 60) is True
    assert c.get("k") == "parent"
