"""Bounded JSON: nesting past the limit, NaN and infinities are ValueErrors, not crashes."""

from __future__ import annotations

import pytest

from berth.registry import bounded_json


def test_ordinary_documents_decode() -> None:
    assert bounded_json.decode(b'{"a": [1, 2.5, {"b": null}], "c": "x"}') == {"a": [1, 2.5, {"b": None}], "c": "x"}


@pytest.mark.parametrize("levels", [bounded_json.MAX_DEPTH + 1, 5000, 100_000])
def test_deep_nesting_is_a_value_error(levels: int) -> None:
    with pytest.raises(bounded_json.TooDeep, match=f"more than {bounded_json.MAX_DEPTH} levels"):
        bounded_json.decode("[" * levels + "]" * levels)
    with pytest.raises(ValueError):
        bounded_json.decode('{"a":' * levels + "1" + "}" * levels)


def test_the_limit_itself_is_allowed() -> None:
    levels = bounded_json.MAX_DEPTH
    assert bounded_json.depth(bounded_json.decode("[" * levels + "]" * levels)) == levels


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"x": -Infinity}'])
def test_non_finite_numbers_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a JSON value"):
        bounded_json.decode(text)


def test_depth_counts_without_recursion() -> None:
    value: list = []
    for _ in range(50_000):
        value = [value]
    assert bounded_json.depth(value, stop_after=10) == 11
    assert bounded_json.depth(value) == 50_001
    assert bounded_json.depth({"a": [1, {"b": []}], "c": 2}) == 4


def test_lone_surrogate_halves_become_replacement_characters() -> None:
    """Each would make the text unencodable as UTF-8 (a tokenizer's input); a valid pair stays."""
    value = bounded_json.decode(rb'{"k\ud800": ["a\udc80b", "\ud83d\ude00", "\\ud800"]}')
    assert value == {"k\ufffd": ["a\ufffdb", "\U0001F600", "\\ud800"]}
    for text in value["k\ufffd"]:
        text.encode("utf-8")
    assert bounded_json.decode('"\\udfff"') == "\ufffd"
