"""A matrix as a PNG heatmap: the ``png`` encoding of ``/hessian`` and ``/jacobian``.

Each entry is coloured with the service's one colour map (``wire.colormap.colours``,
symmetric range ``[-limit, limit]``, ``limit`` the largest ``|value|`` unless given), so
the picture can be checked against the numbers. Scaling is nearest-neighbour with an
exact integer rule, so every pixel shows one entry and a reader can map it back:

    pixel column p (of width W) shows matrix column floor((2p + 1) * cols / (2W))

(the centre of the pixel, scaled; rows likewise). The rule is applied with numpy index
arrays rather than Pillow's ``Image.resize(..., NEAREST)``: Pillow computes the same
centres in floating point, and where a centre falls exactly on a boundary between two
entries it picks either side (e.g. 784 entries drawn as 280 pixels: pixels 2, 17, 22, ...
differ from the rule), which no client could reproduce. Pillow encodes the PNG: no
hand-written encoder.

What the picture cannot show travels in headers: the limit of the colour range
(``X-Value-Limit``), the shape of the matrix drawn (``X-Matrix-Shape``, ``rows x cols``),
how many entries were not finite (``X-Non-Finite-Entries``, drawn as zero: white) and,
from the caller, the algorithm that computed it (``X-Derivative-Method``).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from hessian_service.wire import colormap
from hessian_service.wire.binary import Encoded

MEDIA_TYPE = "image/png"
# Without image_size: one pixel per entry, an integer multiple of that for matrices whose
# longest side is under DEFAULT_MIN (a 4x4 Hessian is drawn 256 px, each entry a 64 px
# block), and at most DEFAULT_MAX (a larger matrix is drawn with entries skipped).
DEFAULT_MIN = 256
DEFAULT_MAX = 1024
# zlib level 1: a 784x784 heatmap encodes in a few ms; level 6 took several times longer
# and saved little on these smooth pictures.
COMPRESS_LEVEL = 1

VALUE_LIMIT_HEADER = "X-Value-Limit"
MATRIX_SHAPE_HEADER = "X-Matrix-Shape"
NON_FINITE_HEADER = "X-Non-Finite-Entries"
# Set by the caller (serving.response): the algorithm that computed the matrix.
METHOD_HEADER = "X-Derivative-Method"


def default_size(rows: int, cols: int) -> int:
    """The longest side, in pixels, of a picture drawn without ``image_size``."""
    longest = max(rows, cols, 1)
    if longest < DEFAULT_MIN:
        return longest * -(-DEFAULT_MIN // longest)  # the smallest multiple >= DEFAULT_MIN
    return min(longest, DEFAULT_MAX)


def pixel_shape(rows: int, cols: int, size: int) -> tuple[int, int]:
    """(height, width) in pixels of a ``rows x cols`` matrix whose longest side is drawn
    ``size`` pixels long; the aspect ratio kept, at least one pixel a side."""
    longest = max(rows, cols, 1)
    return (
        max(1, (rows * size + longest // 2) // longest),
        max(1, (cols * size + longest // 2) // longest),
    )


def sources(entries: int, pixels: int) -> np.ndarray:
    """The entry each of ``pixels`` pixels shows along an axis of ``entries`` entries."""
    centres = 2 * np.arange(pixels, dtype=np.int64) + 1
    result: np.ndarray = (centres * entries) // (2 * pixels)
    return result


def encode(matrix: np.ndarray, *, limit: float | None = None, size: int | None = None) -> Encoded:
    """``matrix`` (2-D) as a PNG heatmap, with the headers that say what it shows.

    ``limit`` is the colour range's bound (the largest finite ``|value|`` by default),
    ``size`` the longest side in pixels (``default_size`` by default).
    """
    if matrix.ndim != 2:
        raise ValueError(f"png.encode: a 2-D matrix is drawn, got shape {list(matrix.shape)}")
    values = np.asarray(matrix, dtype=np.float64)
    finite = np.isfinite(values)
    non_finite = int(values.size - np.count_nonzero(finite))
    if non_finite:
        values = np.where(finite, values, 0.0)
    bound = colormap.symmetric_limit(values) if limit is None else float(limit)
    rows, cols = values.shape
    height, width = pixel_shape(rows, cols, default_size(rows, cols) if size is None else size)
    picked = values[np.ix_(sources(rows, height), sources(cols, width))]
    pixels = np.ascontiguousarray(colormap.colours(picked, bound))  # [H, W, 3] uint8: RGB
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=COMPRESS_LEVEL)
    return Encoded(
        out.getvalue(),
        MEDIA_TYPE,
        {
            VALUE_LIMIT_HEADER: repr(bound),
            MATRIX_SHAPE_HEADER: f"{rows}x{cols}",
            NON_FINITE_HEADER: str(non_finite),
        },
    )
