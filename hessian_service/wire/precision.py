"""Result precision for the wire: a computed result rounded to float16 or bfloat16.

The derivative is computed in the request's ``precision`` (float32 or float64) and only
then rounded, once, to the ``result_precision`` it is sent in (torch's round-to-nearest-
even ``Tensor.to``): json numbers are the rounded values, base64 and binary carry the
2-byte ``FP16`` / ``BF16`` datatypes of the Open Inference Protocol, half of float32's
bytes. Rounding never widens: a float32 result asked for in float64 is refused, as it
would double the bytes and add no digits.

float16 holds magnitudes up to 65,504. A finite result entry beyond the range of the
asked precision would arrive as infinity, indistinguishable from a real overflow of the
computation, so the result is refused (``InvalidInput`` naming ``result_precision``, with
the largest magnitude and the precisions that hold it) instead of sent wrong. Entries too
small for it (float16's smallest subnormal is 2^-24, about 6e-8) become zero; that is
what rounding means, and ``round_for_wire`` says how many in a note.
"""

from __future__ import annotations

import torch

from hessian_service.errors import InvalidInput

RESULT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
FIELD = "result_precision"


def itemsize(name: str) -> int:
    """Bytes per entry of a result sent in precision ``name``."""
    return torch.empty((), dtype=RESULT_DTYPES[name]).element_size()


def check_narrowing(result_precision: str, compute_precision: str) -> None:
    """Refuse a ``result_precision`` wider than the compute precision, before any work."""
    if itemsize(result_precision) > itemsize(compute_precision):
        raise InvalidInput(
            f"{FIELD}: {result_precision!r} is wider than the compute precision "
            f"{compute_precision!r}; it would add bytes, not digits. Use "
            f'"precision": "{result_precision}" to compute in it, or a result_precision '
            f"of float16, bfloat16 or {compute_precision}",
            field=FIELD,
        )


def round_for_wire(tensor: torch.Tensor, name: str | None) -> tuple[torch.Tensor, list[str]]:
    """``tensor`` rounded to precision ``name`` (None: unchanged), and the notes that
    explain what rounding did; raises ``InvalidInput`` when a finite entry overflows."""
    if name is None or RESULT_DTYPES[name] == tensor.dtype:
        return tensor, []
    dtype = RESULT_DTYPES[name]
    rounded = tensor.to(dtype)
    finite = torch.isfinite(tensor)
    overflowed = finite & ~torch.isfinite(rounded)
    if bool(overflowed.any()):
        largest = float(tensor[finite].abs().max())
        limit = torch.finfo(dtype).max
        raise InvalidInput(
            f"{FIELD}: the result holds {int(overflowed.sum())} entries beyond {name}'s "
            f"range (largest |value| {largest:.6g}, {name} holds up to {limit:.6g}); ask "
            'for "bfloat16" (float32\'s range, 3 significant digits) or leave '
            "result_precision out",
            field=FIELD,
            largest_magnitude=largest,
        )
    flushed = int(((tensor != 0) & (rounded == 0)).sum())
    notes = []
    if flushed:
        tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
        notes.append(
            f"{flushed} nonzero entries are smaller in magnitude than {name} can hold "
            f"(about {tiny:.3g}) and were rounded to 0."
        )
    return rounded, notes
