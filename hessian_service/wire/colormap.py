"""The one diverging colour map of the service's pictures: blue < 0 < red, white at zero.

The PNG encoding of ``/hessian`` and ``/jacobian`` (``wire.png``) and the playground
page (which fetches this table from the server) colour a value the same way, so a pixel
of either picture can be checked against the number it shows:

    index = floor((value / limit + 1) * CENTRE + 0.5), clipped to [0, STEPS - 1]

with ``limit`` the symmetric range (the largest ``|value|`` of the matrix unless given),
so zero is always the middle entry, ``CENTRE``. The anchors are ColorBrewer's RdBu
(11 classes, reversed: negative blue, positive red), interpolated linearly in sRGB to an
odd number of steps so that zero has an entry of its own.
"""

from __future__ import annotations

import numpy as np

# ColorBrewer RdBu, 11 classes, from the most negative (dark blue) to the most positive.
ANCHORS = (
    "#053061",
    "#2166ac",
    "#4393c3",
    "#92c5de",
    "#d1e5f0",
    "#f7f7f7",
    "#fddbc7",
    "#f4a582",
    "#d6604d",
    "#b2182b",
    "#67001f",
)
STEPS = 257
CENTRE = (STEPS - 1) // 2


def _table() -> np.ndarray:
    anchors = np.array(
        [[int(code[i : i + 2], 16) for i in (1, 3, 5)] for code in ANCHORS], dtype=np.float64
    )
    at = np.linspace(0.0, len(ANCHORS) - 1.0, STEPS)
    rgb = np.stack([np.interp(at, np.arange(len(ANCHORS)), anchors[:, c]) for c in range(3)], 1)
    table: np.ndarray = np.rint(rgb).astype(np.uint8)
    table.setflags(write=False)
    return table


TABLE = _table()  # [STEPS, 3] uint8 RGB


def symmetric_limit(values: np.ndarray) -> float:
    """The largest ``|value|`` (0.0 for an empty or all-zero matrix)."""
    return float(np.abs(values).max()) if values.size else 0.0


def indices(values: np.ndarray, limit: float | None = None) -> np.ndarray:
    """Each value's entry in ``TABLE`` (int64, the shape of ``values``), for the range
    ``[-limit, limit]`` (the matrix's own symmetric range by default); a zero limit maps
    everything to the centre."""
    flat = np.asarray(values, dtype=np.float64)
    limit = symmetric_limit(flat) if limit is None else float(limit)
    if limit <= 0 or not np.isfinite(limit):
        return np.full(flat.shape, CENTRE, dtype=np.int64)
    scaled = np.floor((flat / limit + 1.0) * CENTRE + 0.5)
    return np.clip(scaled, 0, STEPS - 1).astype(np.int64)


def colours(values: np.ndarray, limit: float | None = None) -> np.ndarray:
    """``values`` as RGB, ``[*values.shape, 3]`` uint8."""
    result: np.ndarray = TABLE[indices(values, limit)]
    return result


def as_json() -> dict[str, object]:
    """The table and its rule, for pages that colour values the same way."""
    return {
        "steps": STEPS,
        "centre": CENTRE,
        "rule": "index = floor((value / limit + 1) * centre + 0.5), clipped to [0, steps - 1]",
        "rgb": TABLE.tolist(),
    }
