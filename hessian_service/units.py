"""Sizes in words: ``format_bytes(2_458_624)`` is ``2.3 MiB`` (for messages, not for wires)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(size: float) -> str:
    """A byte count with a binary unit: whole bytes below 1 KiB, one decimal above."""
    for unit in _UNITS:
        if size < 1024 or unit == _UNITS[-1]:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")
