"""JSON request bodies: their numbers counted before they are parsed, parsed fast.

Why: a JSON number costs about ten times its binary size to parse, and every JSON parser
(jiter, orjson, ``json``) holds the GIL for the whole call, so a worker thread alone does
not keep the event loop free: a 57 MiB body of numbers held it for seconds. So the bytes
of a body that lie *outside* its string literals (numbers, and the punctuation between
them) have their own, lower limit, checked while the body arrives and before anything
is parsed; strings -- base64 ``data`` -- do not count, so base64 bodies keep the whole
body limit.

The count is exact and cheap: ``bytes.find`` (memchr) from quote to quote, in slices of
``STEP`` bytes, and a body may hold ``MAX_STRING_EVENTS`` string literals and escapes
before every later byte is counted as outside (a real request holds a few dozen; a body
of millions of quotes could otherwise make the count itself slow). Nothing here knows
HTTP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable
from typing import Any

import anyio
import orjson
import pydantic_core

from hessian_service.errors import TooLarge

# Bodies up to this size are parsed, validated and decoded on the event loop: at most
# about 0.25 ms of jiter and validation (64 KiB of float32 numbers) and as much again to
# decode them, against one to two hops to a worker thread and back (0.1-0.3 ms each).
INLINE_BODY_BYTES = 1 << 16
STEP = 1 << 20  # bytes searched per call: each find returns within a fraction of a ms
MAX_STRING_EVENTS = 4096  # string literals + backslash escapes tracked one by one
JSON_NUMBER_SETTING = "HESSIAN_MAX_JSON_NUMBER_BYTES"
_QUOTE, _BACKSLASH = b'"', b"\\"


class OutsideStrings:
    """Counts the bytes of a JSON text outside its string literals, fed piece by piece.

    A literal's quotes count as inside. Pieces may split the text anywhere (inside a
    string, between a backslash and the character it escapes). After ``max_events``
    literals and escapes every further byte counts as outside and ``exact`` turns
    False: the count is then an upper bound.
    """

    def __init__(self, max_events: int = MAX_STRING_EVENTS) -> None:
        self.outside = 0
        self.exact = True
        self._events_left = max_events
        self._in_string = False
        self._escaped = False  # the previous piece ended in a string's backslash

    def _event(self) -> bool:
        """Count one literal or escape; False once the budget is spent."""
        self._events_left -= 1
        if self._events_left < 0:
            self.exact = False
        return self.exact

    def feed(self, data: bytes, start: int = 0, end: int | None = None) -> int:
        """Count ``data[start:end]`` (without copying it); return the count so far."""
        end = len(data) if end is None else min(end, len(data))
        pos = start
        while pos < end:
            if not self.exact:
                self.outside += end - pos
                break
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                    pos += 1
                    continue
                quote = data.find(_QUOTE, pos, end)
                stop = end if quote < 0 else quote
                backslash = data.find(_BACKSLASH, pos, stop)
                if backslash >= 0:  # an escape before the next quote: skip what it escapes
                    if not self._event():
                        pos = backslash  # the rest of the piece counts as outside
                        continue
                    pos = backslash + 2
                    if pos > end:
                        self._escaped, pos = True, end
                    continue
                if quote < 0:
                    break  # the literal goes on in the next piece
                self._in_string, pos = False, quote + 1
            else:
                quote = data.find(_QUOTE, pos, end)
                if quote < 0:
                    self.outside += end - pos
                    break
                self.outside += quote - pos
                pos = quote
                if not self._event():
                    continue
                self._in_string, pos = True, quote + 1
        return self.outside


def bytes_outside_strings(body: bytes, step: int = STEP) -> int:
    """The bytes of ``body`` outside its string literals (see ``OutsideStrings``)."""
    counter = OutsideStrings()
    for start in range(0, len(body), step):
        counter.feed(body, start, start + step)
    return counter.outside


class JsonNumbersTooLarge(TooLarge):
    """The body holds more bytes outside JSON strings than the JSON-number limit."""

    def __init__(self, count: int, limit: int, exact: bool, alternative: str) -> None:
        measured = (
            str(count)
            if exact
            else f"{count} (an upper bound: past {MAX_STRING_EVENTS} strings and escapes "
            "every byte counts)"
        )
        super().__init__(
            f"the body holds {measured} bytes of JSON outside string literals (numbers "
            f"and the punctuation between them), over this server's limit of {limit} "
            f"({JSON_NUMBER_SETTING}): a JSON number costs about ten times its binary "
            f"size to parse. {alternative}",
            field="body",
            limit_bytes=limit,
            setting=JSON_NUMBER_SETTING,
            json_number_bytes=count,
        )


async def read_body(
    chunks: AsyncIterable[bytes],
    *,
    json_number_limit: int,
    alternative: str,
    json_length: int | None = None,
) -> bytes:
    """The whole body, its first ``json_length`` bytes (all: None) counted as JSON.

    Raises ``JsonNumbersTooLarge`` (naming ``alternative``, the binary way to send the
    same numbers) once the body is read, if the count is over ``json_number_limit``.
    From the moment it is over, chunks are counted and dropped, not kept, so that a
    refused body costs about the limit in memory, not its own size. A large chunk (a
    streamed body the size-limit middleware gathered) is counted slice by slice with
    the event loop served in between.
    """
    counter = OutsideStrings()
    kept: list[bytes] = []
    received = 0
    json_end = json_length if json_length is not None else -1
    async for chunk in chunks:
        counted_to = len(chunk) if json_end < 0 else max(0, min(len(chunk), json_end - received))
        for start in range(0, counted_to, STEP):
            if start:
                await anyio.sleep(0)
            counter.feed(chunk, start, min(start + STEP, counted_to))
        received += len(chunk)
        if counter.outside <= json_number_limit:
            kept.append(chunk)
        elif kept:
            kept.clear()  # refused: keep draining to count, but hold nothing
    if counter.outside > json_number_limit:
        raise JsonNumbersTooLarge(counter.outside, json_number_limit, counter.exact, alternative)
    return b"".join(kept)


_UTF8_BOM = b"\xef\xbb\xbf"


def parse_json(body: bytes) -> Any:
    """``body`` parsed as ``json.loads`` parses it, about five times faster.

    jiter (pydantic-core's parser) reads what ``json.loads`` reads to the same values
    (NaN and Infinity included, integers exact). When it refuses a body, orjson (as
    fast) finds the error: a ``json.JSONDecodeError`` with the character offset and a
    reason. ``json.loads`` itself decides only the rare bodies both refuse for reasons
    of their own (a byte-order mark, UTF-16, bytes that are not UTF-8) or that orjson
    accepts (nesting deeper than jiter's limit): so its errors -- JSONDecodeError,
    UnicodeDecodeError, RecursionError -- are the only ones raised.
    """
    try:
        return pydantic_core.from_json(body, allow_inf_nan=True)
    except ValueError:
        pass
    if not body.startswith(_UTF8_BOM):
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return json.loads(body)
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as error:
            raise json.JSONDecodeError(error.msg, error.doc, error.pos) from None
    return json.loads(body)
