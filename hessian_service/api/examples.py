"""Example request bodies shown in the Swagger UI; each one succeeds on the bundled models."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from hessian_service.config import Settings

DIGIT_SAMPLE_FILE = "digits_sample.json"


@lru_cache(maxsize=1)
def digit_image(path: Path | None = None) -> list[float]:
    """A held-out handwritten 2 from the digits data set, 784 numbers (zeros if missing).

    It lives beside the bundled models, in the configured models folder.
    """
    path = path or Settings().models_dir / DIGIT_SAMPLE_FILE
    try:
        data = json.loads(path.read_text())["data"]
    except (OSError, KeyError, ValueError):
        return [0.0] * 784
    return [float(v) for v in data]


def _tensor(shape: list[int], data: list[float]) -> dict[str, Any]:
    return {"name": "x", "shape": shape, "datatype": "FP32", "data": data}


def hessian_examples() -> dict[str, dict[str, Any]]:
    return {
        "digits_cnn": {
            "summary": "784x784 Hessian of class 2's logit for a 1x1x28x28 digit",
            "value": {
                "model": "digits_cnn",
                "inputs": [_tensor([1, 1, 28, 28], digit_image())],
                "output_index": 2,
                "encoding": "base64",
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
    }


def jacobian_examples() -> dict[str, dict[str, Any]]:
    return {
        "digits_cnn": {
            "summary": "10x784 Jacobian of the logits for a 1x1x28x28 digit",
            "value": {
                "model": "digits_cnn",
                "inputs": [_tensor([1, 1, 28, 28], digit_image())],
                "encoding": "base64",
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
    }
