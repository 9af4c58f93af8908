"""The JSON-body reader (``wire.json_body``): the count outside strings, the limit, the parser.

The count is checked against a reference that never scans bytes: ``json.dumps`` writes
a value, and the bytes outside strings are the text's length less the length of every
key and string as ``json.dumps`` writes it alone. Random values (hypothesis, escapes and
non-ASCII included) are fed whole, in random pieces and in tiny steps. ``parse_json`` is
checked against ``json.loads`` value for value.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hessian_service.wire.json_body import (
    JSON_NUMBER_SETTING,
    MAX_STRING_EVENTS,
    JsonNumbersTooLarge,
    OutsideStrings,
    bytes_outside_strings,
    parse_json,
    read_body,
)

# Every character class json.dumps escapes: quotes, backslashes, controls, non-ASCII,
# characters outside the BMP (a surrogate pair with ensure_ascii).
TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from('"\\/\b\f\n\r\t\x00\x1f é€😀'), st.characters(codec="utf-8")
    ),
    max_size=12,
)
NUMBERS = st.one_of(
    st.integers(-(10**30), 10**30), st.floats(allow_nan=False, allow_infinity=False)
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(TEXT, inner, max_size=6)),
    max_leaves=40,
)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)


def reference_outside(value: Any, **dumps: Any) -> tuple[bytes, int]:
    """The text ``json.dumps`` writes, and its bytes outside string literals."""
    text = json.dumps(value, **dumps).encode()
    inside = sum(
        len(json.dumps(s, ensure_ascii=dumps["ensure_ascii"]).encode()) for s in _strings(value)
    )
    return text, len(text) - inside


def fed_in_pieces(text: bytes, cuts: list[int]) -> int:
    counter = OutsideStrings()
    start = 0
    for cut in [*sorted({min(c, len(text)) for c in cuts}), len(text)]:
        counter.feed(text, start, cut)
        start = cut
    assert counter.exact
    return counter.outside


@settings(max_examples=400, derandomize=True, deadline=None)
@given(
    value=JSON_VALUES,
    ensure_ascii=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_count_outside_strings_matches_the_json_dumps_reference(
    value: Any, ensure_ascii: bool, indent: int | None, cuts: list[int]
) -> None:
    text, want = reference_outside(value, ensure_ascii=ensure_ascii, indent=indent)
    assert bytes_outside_strings(text) == want
    assert bytes_outside_strings(text, step=1) == want  # every byte its own piece
    assert bytes_outside_strings(text, step=3) == want
    assert fed_in_pieces(text, cuts) == want
    # Separate pieces (copies), as chunks arrive from the network.
    counter = OutsideStrings()
    for start in range(0, len(text), 5):
        counter.feed(text[start : start + 5])
    assert counter.outside == want


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    raw=st.binary(max_size=60).map(lambda b: bytes(b'"\\a1 '[x % 5] for x in b)),
    step=st.integers(1, 7),
)
def test_the_count_of_any_bytes_does_not_depend_on_where_they_are_cut(
    raw: bytes, step: int
) -> None:
    # Quotes and backslashes in any order, valid JSON or not: pieces never change it.
    assert bytes_outside_strings(raw, step=step) == bytes_outside_strings(raw)


@pytest.mark.parametrize(
    ("text", "outside"),
    [
        (b'[1, "a\\"b", 2]', 8),  # an escaped quote does not end the string
        (b'["\\\\", 3]', 5),  # an escaped backslash does not escape the quote
        (b'["\\\\\\"", 3]', 5),
        (b'{"k": "\\u0022"}', 4),
        (b"123456", 6),
        (b'""', 0),
        (b'"unterminated', 0),
    ],
)
def test_escapes_and_edges(text: bytes, outside: int) -> None:
    assert bytes_outside_strings(text) == outside
    assert bytes_outside_strings(text, step=1) == outside


def test_past_the_string_budget_every_byte_counts_and_the_count_stays_fast() -> None:
    many = b"[" + b'"ab",' * (MAX_STRING_EVENTS + 10) + b"1]"
    counter = OutsideStrings()
    counter.feed(many)
    exact = OutsideStrings(max_events=10**6)
    exact.feed(many)
    assert exact.exact and exact.outside == 1 + (MAX_STRING_EVENTS + 10) + len(b"1]")
    # The first MAX_STRING_EVENTS strings are skipped exactly; from the next one on,
    # every byte counts: an upper bound of the exact count.
    assert not counter.exact
    assert counter.outside == 1 + MAX_STRING_EVENTS + len(b'"ab",') * 10 + len(b"1]")
    assert exact.outside < counter.outside < len(many)
    # 57 MiB of empty strings, or of escapes, or of numbers: each counted in well under
    # a second (memchr in 1 MiB steps; no Python loop per string past the budget).
    for unit in (b'"",', b'"\\\\', b"0.5,"):
        body = unit * ((57 << 20) // len(unit))
        started = time.perf_counter()
        count = bytes_outside_strings(body)
        elapsed = time.perf_counter() - started
        assert count > 0 and elapsed < 0.5, (unit, elapsed)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _read(body: bytes, size: int = 1000, **kwargs: Any) -> bytes:
    async def main() -> bytes:
        return await read_body(_chunks(body, size), alternative="use base64", **kwargs)

    return anyio.run(main)


def test_read_body_returns_the_body_under_the_limit_and_counts_strings_as_free() -> None:
    numbers = json.dumps({"data": [0.25] * 1000}).encode()  # 6,010 bytes outside strings
    assert _read(numbers, json_number_limit=bytes_outside_strings(numbers)) == numbers
    base64_body = json.dumps({"model": "m", "data": "QUJD" * 50_000}).encode()
    assert _read(base64_body, json_number_limit=100) == base64_body  # 200 kB of string


def test_read_body_over_the_limit_names_the_count_the_limit_and_the_setting() -> None:
    body = json.dumps({"model": "m", "data": [1.5] * 10_000}).encode()
    outside = bytes_outside_strings(body)
    with pytest.raises(JsonNumbersTooLarge) as caught:
        _read(body, size=777, json_number_limit=5000)
    error = caught.value
    assert error.extra == {
        "limit_bytes": 5000,
        "setting": JSON_NUMBER_SETTING,
        "json_number_bytes": outside,  # the whole body counted, though refused early
    }
    assert error.field == "body"
    assert f"the body holds {outside} bytes" in error.detail
    assert "limit of 5000 (HESSIAN_MAX_JSON_NUMBER_BYTES)" in error.detail
    assert error.detail.endswith("use base64")


def test_read_body_counts_only_the_json_header_of_a_binary_body() -> None:
    header = b'{"inputs": [{"shape": [4], "parameters": {"binary_data_size": 16}}]}'
    tail = b"0123456789" * 10_000  # raw bytes: no quotes, but not JSON either
    body = header + tail
    limit = bytes_outside_strings(header)
    assert _read(body, size=333, json_number_limit=limit, json_length=len(header)) == body
    with pytest.raises(JsonNumbersTooLarge):
        _read(body, size=333, json_number_limit=limit)  # without the header length: all JSON


@settings(max_examples=200, derandomize=True, deadline=None)
@given(value=JSON_VALUES, special=st.sampled_from([None, math.nan, math.inf, -math.inf]))
def test_parse_json_gives_what_json_loads_gives(value: Any, special: float | None) -> None:
    text = json.dumps([value, special]).encode()
    got, want = parse_json(text), json.loads(text)
    assert json.dumps(got) == json.dumps(want)  # NaN == NaN as text; ints stay ints
    assert repr(got) == repr(want)


@pytest.mark.parametrize(
    ("text", "position"),
    [
        (b"{not json", 1),
        (b"[1,2", 4),
        (b'{"a":\n [1,, 2]}', 10),
        (b'{"a": "\xc3\xa9", "b": x}', 16),
        (b"", 0),
    ],
)
def test_parse_json_errors_are_json_decode_errors_at_the_character(
    text: bytes, position: int
) -> None:
    with pytest.raises(json.JSONDecodeError) as caught:
        parse_json(text)
    assert caught.value.pos == position  # a character offset, as json.loads gives


def test_parse_json_leaves_encodings_to_json_loads() -> None:
    assert parse_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a UTF-8 byte-order mark
    assert parse_json('{"a": [1, 2]}'.encode("utf-16")) == {"a": [1, 2]}
    with pytest.raises(UnicodeDecodeError):
        parse_json(b'{"a": "\xff"}')
    with pytest.raises(json.JSONDecodeError):
        parse_json(b"[" * 5000 + b"]" * 5000)  # too deep: an error, not a RecursionError
    assert parse_json(b"[" * 300 + b"]" * 300) == json.loads(b"[" * 300 + b"]" * 300)
