"""Key names: one hash slot per queue, and the same key order in Python and in the Lua prelude."""

from __future__ import annotations

import re
from importlib import resources

import pytest
from redis.crc import key_slot

from conveyor.keys import SCRIPT_KEY_NAMES, Keyspace


@pytest.mark.parametrize("name", ["", "a b", "a:b", "a{b", "b}", "tab\there"])
def test_a_queue_name_that_would_break_the_hash_tag_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="queue name"):
        Keyspace(name)


def test_every_key_of_a_queue_lands_in_one_cluster_slot() -> None:
    keys = Keyspace("billing", prefix="acme")
    names = [
        *keys.script_keys,
        keys.job("0000000000001-0000000000000001"),
        keys.errors("x"),
        keys.ready("critical"),
        keys.group("low", "tenant:{42}"),
        keys.delayed("high"),
        keys.lease("normal"),
        keys.wake("low"),
        keys.dedup("order-{7}"),
        keys.rate("tenant"),
        keys.worker("host:1"),
        keys.schedule("nightly"),
        keys.dead,
        keys.limits,
        keys.paused,
        keys.events,
        keys.counts,
        keys.config,
        keys.workers,
    ]
    assert {key_slot(name.encode()) for name in names} == {key_slot(b"{billing}")}
    assert all(name.startswith("acme:{billing}:") for name in names)


def test_two_queues_or_two_prefixes_never_share_a_key() -> None:
    a, b, c = Keyspace("a"), Keyspace("b"), Keyspace("a", prefix="other")
    assert not set(a.script_keys) & set(b.script_keys)
    assert not set(a.script_keys) & set(c.script_keys)


def test_the_lua_prelude_builds_the_key_names_python_lists_in_the_same_order() -> None:
    prelude = (resources.files("conveyor") / "lua" / "_prelude.lua").read_text()
    suffixes = re.search(r"local KEY_SUFFIXES = \{(.*?)\}", prelude, re.S)
    declaration = re.search(r"(K_[A-Z_,\s]+?)\s*=\s*keyspace\(keys\[1\]\)", prelude)
    assert suffixes is not None
    assert declaration is not None
    assert re.findall(r"'([^']*)'", suffixes.group(1)) == list(SCRIPT_KEY_NAMES)
    lua_names = [name.strip() for name in declaration.group(1).split(",")]
    python_names = ["K_" + name.rstrip(":").upper() for name in SCRIPT_KEY_NAMES]
    assert lua_names == python_names


def test_the_key_helpers_are_the_base_and_the_script_suffixes() -> None:
    keys = Keyspace("q")
    assert keys.script_keys == [keys.base]
    slots = {name: keys.base + name for name in SCRIPT_KEY_NAMES}
    assert keys.job("id") == slots["job:"] + "id"
    assert keys.errors("id") == slots["err:"] + "id"
    assert keys.group("low", "g") == slots["group:"] + "low:g"
    assert keys.delayed("low") == slots["delayed:"] + "low"
    assert keys.lease("low") == slots["lease:"] + "low"
    assert keys.dedup("k") == slots["dedup:"] + "k"
    assert keys.dead == slots["dead"]
    assert keys.dead_class == slots["dead_class"]
    assert keys.counts == slots["counts"]
    assert keys.config == slots["config"]
