"""Request field names (``inputs[0].data``, ``objective.target``) from pydantic error locations.

Pydantic's ``loc`` mixes the request's own keys and indices with the names of union
members it tried (``int``, ``list[int]``, ``constrained-int``, ``TensorObject``) and the
tags of discriminated unions (``cross_entropy``). A client wants the first kind only: the
path it can find in its own body. Where the body is at hand the location is walked
through it (a key that is not in the body is a union tag, unless it is the last part: a
missing field); union member names are recognised by their form either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# Where a location starts outside the body: FastAPI's ("path", "name"), ("query", ...).
_SOURCES = {"body", "path", "query", "header", "cookie"}
# Pydantic's names for union members: lower-case type names, constrained or
# parametrised ones (``constrained-int``, ``list[any]``), and model class names.
_MEMBER = re.compile(r"^(int|float|str|bool|bytes|none|dict|list|any)$|[\[\-]|^[A-Z]")


def _is_member(part: str) -> bool:
    return bool(_MEMBER.search(part))


def _kept(loc: tuple[Any, ...], body: Any) -> Iterable[str | int]:
    node, walkable = body, body is not None
    last = len(loc) - 1
    for i, part in enumerate(loc):
        if isinstance(part, int):
            if walkable and isinstance(node, list) and 0 <= part < len(node):
                node = node[part]
            else:
                walkable = False
            yield part
        elif walkable and isinstance(node, dict) and part in node:
            node = node[part]  # the client's own key, whatever it looks like ("Model")
            yield part
        elif _is_member(part):
            continue
        elif walkable and i != last:
            continue  # a discriminated union's tag: the body has no such key here
        else:
            walkable = False
            yield part


def field_name(loc: Iterable[Any], body: Any = None) -> str:
    """``("body", "inputs", 0, "data")`` -> ``inputs[0].data``; ``body`` when nothing is left.

    ``body`` is the request body the location points into (parsed JSON), when known.
    """
    parts = tuple(loc)
    if parts and parts[0] in _SOURCES:
        parts = parts[1:]
    text = ""
    for part in _kept(parts, body):
        if isinstance(part, int) or (isinstance(part, str) and part.isdigit()):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"
