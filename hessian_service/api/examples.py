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


def job_examples() -> dict[str, dict[str, Any]]:
    """``POST /jobs`` bodies: an endpoint's own body under ``request``."""
    return {
        "digits_cnn_hessians": {
            "summary": "Hessians of 8 digits as a job: 8 chunks of 784 products, then "
            "GET /jobs/{id}/result",
            "description": "Poll the Location for progress; the result is the /hessian "
            "response (8 x 784 x 784 float32, 19.7 MB in the binary encoding).",
            "value": {
                "operation": "/hessian",
                "request": {
                    "model": "digits_cnn",
                    "inputs": [_tensor([8, 1, 28, 28], digit_image() * 8)],
                    "output_index": 2,
                    "encoding": "binary",
                },
            },
        },
        "quadratic4_jacobian": {
            "summary": "A small /jacobian as a job (finished within a poll)",
            "value": {
                "operation": "jacobian",
                "request": {
                    "model": "quadratic4",
                    "inputs": [_tensor([4], [2.0, 2.0, 2.0, 2.0])],
                },
            },
        },
    }


def _quadratic(**body: Any) -> dict[str, Any]:
    """A request on quadratic4 at x = 2 (f_i(x) = i x_i^2: J = diag(0, 4, 8, 12) and the
    Hessian of output i is 2 i at (i, i), zeros elsewhere)."""
    return {"model": "quadratic4", "inputs": [_tensor([4], [2.0, 2.0, 2.0, 2.0])], **body}


def _digit(**body: Any) -> dict[str, Any]:
    """A request on digits_cnn at the held-out digit."""
    return {"model": "digits_cnn", "inputs": [_tensor([1, 1, 28, 28], digit_image())], **body}


def hvp_examples() -> dict[str, dict[str, Any]]:
    return {
        "quadratic4": {
            "summary": "H v of output 2 of x*x*arange(4) at x = 2, v = (1, 1, 1, 1): "
            "(0, 0, 4, 0); 1 product",
            "value": _quadratic(output_index=2, vectors=_tensor([1, 4], [1.0, 1.0, 1.0, 1.0])),
        },
        "digits_cnn": {
            "summary": "H v of class 2's logit along the digit itself: 784 numbers, 1 "
            "product (the 784x784 Hessian is never formed)",
            "value": _digit(output_index=2, vectors=_tensor([1, 1, 1, 28, 28], digit_image())),
        },
    }


def jvp_examples() -> dict[str, dict[str, Any]]:
    return {
        "quadratic4": {
            "summary": "J v of x*x*arange(4) at x = 2 along (1, 1, 1, 1): (0, 4, 8, 12)",
            "value": _quadratic(vectors=_tensor([1, 4], [1.0, 1.0, 1.0, 1.0])),
        },
    }


def vjp_examples() -> dict[str, dict[str, Any]]:
    return {
        "quadratic4": {
            "summary": "u^T J of x*x*arange(4) at x = 2 for u = (1, 1, 1, 1): (0, 4, 8, 12)",
            "value": _quadratic(vectors=_tensor([1, 4], [1.0, 1.0, 1.0, 1.0])),
        },
        "digits_cnn": {
            "summary": "The gradient of class 2's logit as u^T J with u = e_2: 784 numbers",
            "value": _digit(vectors=_tensor([1, 10], [0.0, 0.0, 1.0] + [0.0] * 7)),
        },
    }


def diagonal_examples() -> dict[str, dict[str, Any]]:
    return {
        "quadratic4": {
            "summary": "Exact diagonal of output 3's Hessian of x*x*arange(4): (0, 0, 0, 6)",
            "value": _quadratic(output_index=3),
        },
        "digits_cnn_exact": {
            "summary": "Exact 784-entry diagonal of class 2's logit's Hessian for a digit",
            "value": _digit(output_index=2, exact=True),
        },
        "digits_cnn_estimate": {
            "summary": "Its stochastic estimate from 64 products, with standard errors",
            "value": _digit(output_index=2, exact=False, max_products=64, seed=0),
        },
    }


def trace_examples() -> dict[str, dict[str, Any]]:
    return {
        "quadratic4": {
            "summary": "Laplacian of sum(x*x*arange(4)): 2 (0 + 1 + 2 + 3) = 12, exact",
            "value": _quadratic(objective={"type": "sum"}),
        },
        "digits_cnn_estimate": {
            "summary": "Hutch++ estimate of class 2's logit's Laplacian for a digit from 60 "
            "products, with its standard error",
            "value": _digit(output_index=2, exact=False, max_products=60, seed=0),
        },
    }


def eigen_examples() -> dict[str, dict[str, Any]]:
    return {
        "quadratic4": {
            "summary": "The 2 largest eigenpairs of sum(x*x*arange(4))'s Hessian diag(0, 2, "
            "4, 6): 6 and 4, eigenvectors e_3 and e_2",
            "value": _quadratic(objective={"type": "sum"}, k=2),
        },
        "digits_cnn": {
            "summary": "Top 5 eigenvalues of class 2's logit's Hessian for a digit, by Lanczos",
            "value": _digit(output_index=2, k=5, which="largest", tol=1e-4),
        },
    }
