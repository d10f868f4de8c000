"""Traffic splits (ragops.serve.routing): weights, sticky assignment, the registry's route store."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from ragops.errors import InputError
from ragops.serve.routing import RouteStore, assign, check_weights, parse_weights
from ragops.storage import Storage


def test_parse_weights_reads_the_cli_form() -> None:
    assert parse_weights("sft-v3=0.9, ppo-v1=0.1") == {"sft-v3": 0.9, "ppo-v1": 0.1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a=0.5,b=0.4", "sum to 0.9"),
        ("a=0.5,a=0.5", "given twice"),
        ("a=-0.5,b=1.5", "negative"),
        ("a,b=1", "not VARIANT=WEIGHT"),
        ("a=x,b=1", "not a number"),
        ("", "at least one variant"),
        ("a=nan,b=1", "must be a number"),
    ],
)
def test_bad_weights_are_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_weights(text)


def test_unknown_variants_are_refused() -> None:
    with pytest.raises(InputError, match="unknown variant.*'ghost'"):
        check_weights({"real": 0.5, "ghost": 0.5}, known=lambda n: n == "real")


def test_the_same_user_always_gets_the_same_variant() -> None:
    weights = {"a": 0.5, "b": 0.5}
    for user in ("alice", "bob", "carol", "key:0123"):
        first = assign("prod", weights, user)
        assert all(assign("prod", weights, user) == first for _ in range(20))
    # The order the weights are written in does not move anyone.
    assert all(assign("prod", {"b": 0.5, "a": 0.5}, f"u{i}") == assign("prod", weights, f"u{i}") for i in range(200))


def test_users_spread_by_weight() -> None:
    counts = Counter(assign("prod", {"a": 0.9, "b": 0.1}, f"user-{i}") for i in range(10_000))
    assert 0.08 < counts["b"] / 10_000 < 0.12


def test_growing_a_canary_only_moves_users_onto_it() -> None:
    before = {f"u{i}": assign("prod", {"a": 0.9, "b": 0.1}, f"u{i}") for i in range(2000)}
    after = {u: assign("prod", {"a": 0.5, "b": 0.5}, u) for u in before}
    assert all(after[u] == "b" for u, v in before.items() if v == "b")
    assert sum(after[u] == "b" for u in before) > sum(v == "b" for v in before.values())


def test_zero_weight_is_never_chosen_and_no_user_draws_per_request() -> None:
    rng = random.Random(3)
    picks = Counter(assign("prod", {"a": 0.0, "b": 0.7, "c": 0.3}, None, rng=rng) for _ in range(2000))
    assert picks["a"] == 0 and picks["b"] > picks["c"] > 0


def test_route_store_keeps_a_log_and_clears(tmp_path: Path) -> None:
    store = RouteStore(Storage(tmp_path / "registry"))
    assert store.weights() == {}
    store.set("prod", {"a": 0.9, "b": 0.1}, by="test", note="canary")
    store.set("prod", {"a": 0.5, "b": 0.5}, by="test")
    assert store.weights() == {"prod": {"a": 0.5, "b": 0.5}}
    assert store.clear("prod") == {"a": 0.5, "b": 0.5}
    assert store.weights() == {} and store.clear("prod") is None
    log = store.history("prod")
    assert [e["to"] for e in log] == [{"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.5}, None]
    assert log[0]["note"] == "canary" and log[0]["from"] is None


def test_route_store_refuses_invalid_weights_and_keeps_the_old_ones(tmp_path: Path) -> None:
    store = RouteStore(Storage(tmp_path / "registry"))
    store.set("prod", {"a": 1.0})
    with pytest.raises(InputError):
        store.set("prod", {"a": 0.7})
    assert store.weights() == {"prod": {"a": 1.0}}


def test_config_routes_are_validated() -> None:
    from ragops.config import load_settings
    from ragops.errors import ConfigError

    ok = load_settings([], ["serve.routes={prod: {a: 0.9, b: 0.1}}"], environ={})
    assert ok.serve.routes == {"prod": {"a": 0.9, "b": 0.1}}
    with pytest.raises(ConfigError, match="routes.prod.*sum to 0.5"):
        load_settings([], ["serve.routes={prod: {a: 0.4, b: 0.1}}"], environ={})


def test_catalog_overlays_stored_routes_on_the_config(tmp_path: Path) -> None:
    from ragops.config import load_settings
    from ragops.serve.models import ModelCatalog

    settings = load_settings([], ["serve.routes={prod: {ragops: 1.0}}"], data_dir=tmp_path, environ={})
    catalog = ModelCatalog(settings)
    assert catalog.route("prod", "u1") == ("", "ragops")  # the base model answers, named as in the split
    result = catalog.set_route("prod", {"ragops": 0.5, settings.generator.model: 0.5}, by="test")
    assert result["source"] == "registry" and result["previous"] is None
    assert ModelCatalog(settings).routes()["prod"] == {"ragops": 0.5, settings.generator.model: 0.5}
    with pytest.raises(InputError, match="unknown variant"):
        catalog.set_route("prod", {"ragops": 0.5, "ghost": 0.5}, by="test")
    catalog.set_route("prod", None, by="test")
    assert ModelCatalog(settings).routes()["prod"] == {"ragops": 1.0}  # the config's split again
