"""Example request bodies shown in the Swagger UI; each one succeeds on the bundled models.

The first example of an operation is the one Swagger UI fills in, so on /hessian and
/jacobian it is one whose answer a browser shows at once: the digit's result as a PNG
heatmap (Swagger UI draws an image/png response as an image). The answer as numbers is
another matter: 614,656 JSON numbers (2.8 MB) froze Chromium's page for over 7 minutes,
and the base64 string (3.3 MB) is one unreadable line, so those examples come later and
say what they cost.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from hessian_service.config import Settings

DIGIT_SAMPLE_FILE = "digits_sample.json"


def digit_sample(models_dir: Path) -> dict[str, Any] | None:
    """The held-out digit shipped beside the models (``shape``, ``label``, 784 ``data``
    numbers), or None when the models folder has no readable sample file."""
    try:
        sample: dict[str, Any] = json.loads((models_dir / DIGIT_SAMPLE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return sample if isinstance(sample.get("data"), list) else None


@lru_cache(maxsize=1)
def digit_image(path: Path | None = None) -> list[float]:
    """A held-out handwritten 2 from the digits data set, 784 numbers (zeros if missing).

    It lives beside the bundled models, in the configured models folder.
    """
    sample = digit_sample(path.parent if path else Settings().models_dir)
    if sample is None:
        return [0.0] * 784
    return [float(v) for v in sample["data"]]


def _tensor(shape: list[int], data: list[float]) -> dict[str, Any]:
    return {"name": "x", "shape": shape, "datatype": "FP32", "data": data}


def hessian_examples() -> dict[str, dict[str, Any]]:
    return {
        "digits_cnn_png": {
            "summary": "784x784 Hessian of class 2's logit for a digit, as a PNG heatmap "
            "(about 80 kB; shown at once)",
            "description": "One pixel per entry, blue < 0 < red, white at zero; the colour "
            "range is in the X-Value-Limit header. Without `encoding` the answer is "
            "614,656 JSON numbers (2.8 MB), which Swagger UI takes minutes to render.",
            "value": {
                "model": "digits_cnn",
                "inputs": [_tensor([1, 1, 28, 28], digit_image())],
                "output_index": 2,
                "encoding": "png",
            },
        },
        "quadratic4": {
            "summary": "f(x) = x*x*arange(4) at x = 2: Hessian diag(0, 0, 4, 0)",
            "value": {
                "model": "quadratic4",
                "inputs": [_tensor([4], [2.0, 2.0, 2.0, 2.0])],
                "output_index": 2,
            },
        },
        "linear4_mse": {
            "summary": "Linear model with an MSE loss: every entry 0.5",
            "value": {
                "model": "linear4",
                "inputs": [_tensor([4], [1.0, 1.0, 1.0, 1.0])],
                "objective": {"type": "mse", "target": 1.0},
            },
        },
        "linear4_zero": {
            "summary": "Linear model's raw output: exact zeros with a note, not an error",
            "value": {"model": "linear4", "inputs": [_tensor([4], [1.0, 1.0, 1.0, 1.0])]},
        },
        "digits_cnn_base64": {
            "summary": "784x784 as base64: 2,458,624 bytes in a 3.3 MB string that Swagger "
            "UI shows as one unreadable line (seconds to render); for programs",
            "value": {
                "model": "digits_cnn",
                "inputs": [_tensor([1, 1, 28, 28], digit_image())],
                "output_index": 2,
                "encoding": "base64",
            },
        },
    }


def jacobian_examples() -> dict[str, dict[str, Any]]:
    return {
        "digits_cnn_png": {
            "summary": "Gradient of class 2's logit for a digit, as a 28x28 saliency PNG "
            "(280 px; shown at once)",
            "description": "One gradient row of an image model is drawn as the image: "
            "each 10x10 block is one input pixel, blue < 0 < red, white at zero; the "
            "colour range is in the X-Value-Limit header.",
            "value": {
                "model": "digits_cnn",
                "inputs": [_tensor([1, 1, 28, 28], digit_image())],
                "output_index": 2,
                "encoding": "png",
                "image_size": 280,
            },
        },
        "quadratic4": {
            "summary": "Gradient of output 2 of x*x*arange(4) at x = 2: (0, 0, 8, 0)",
            "value": {
                "model": "quadratic4",
                "inputs": [_tensor([4], [2.0, 2.0, 2.0, 2.0])],
                "output_index": 2,
            },
        },
        "digits_cnn_base64": {
            "summary": "10x784 Jacobian of the logits as base64: 31,360 bytes in a 42 kB "
            "string; as JSON it would be 7,840 numbers (92 kB)",
            "value": {
                "model": "digits_cnn",
                "inputs": [_tensor([1, 1, 28, 28], digit_image())],
                "encoding": "base64",
            },
        },
    }
