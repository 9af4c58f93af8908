"""Train and export the bundled models in ``models/``, reproducibly.

Every bundled model is an architecture from :mod:`repository.zoo` plus a ``weights.safetensors``
file and a ``manifest.json``. The three image models (``digits_cnn``, ``mlp_tanh``,
``mlp_relu``) are trained on scikit-learn's bundled 8x8 digits (no download), scaled to
``[0, 1]`` and upscaled bilinearly to 28x28; ``linear4`` and ``quadratic4`` have fixed,
hand-chosen parameters.

Training is single-threaded, seeded and runs with ``torch.use_deterministic_algorithms``,
so two runs on the same machine and library versions write byte-identical weight files.

Run from the repository root as either of::

    .venv/bin/python scripts/train_models.py [--out DIR] [--models NAME ...]
    .venv/bin/python -m scripts.train_models [--out DIR] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # allow ``python scripts/train_models.py``
    sys.path.insert(0, str(REPO_ROOT))

from hessian_service.repository.zoo import build  # noqa: E402

SEED = 0
SCRIPT = "scripts/train_models.py"
DATASET = "sklearn.datasets.load_digits upscaled to 28x28"
DEFAULT_OUT = REPO_ROOT / "hessian_service" / "repository" / "models"
SAMPLE_FILE = "digits_sample.json"
SAMPLE_LABEL = 2
SAMPLE_DECIMALS = 6
"""Decimals kept for each pixel of ``digits_sample.json``."""

IMAGE_MODELS = ("digits_cnn", "mlp_tanh", "mlp_relu")
FIXED_MODELS = ("linear4", "quadratic4")
ALL_MODELS = (*IMAGE_MODELS, *FIXED_MODELS)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings for one image model (Adam with a one-cycle learning-rate schedule)."""

    epochs: int
    max_lr: float
    batch_size: int = 32


TRAIN_CONFIGS: dict[str, TrainConfig] = {
    "digits_cnn": TrainConfig(epochs=25, max_lr=3e-3),
    "mlp_tanh": TrainConfig(epochs=15, max_lr=1e-3),
    "mlp_relu": TrainConfig(epochs=15, max_lr=1e-3),
}

DESCRIPTIONS: dict[str, str] = {
    "digits_cnn": (
        "Small CNN (conv 3x3, tanh, conv 3x3 stride 2, tanh, linear) trained on "
        "scikit-learn's 8x8 digits upscaled to 28x28."
    ),
    "mlp_tanh": (
        "784-256-256-10 MLP with tanh activations trained on scikit-learn's 8x8 digits "
        "upscaled to 28x28."
    ),
    "mlp_relu": (
        "784-256-256-10 MLP with ReLU activations (input Hessian zero almost everywhere) "
        "trained on scikit-learn's 8x8 digits upscaled to 28x28."
    ),
    "linear4": (
        "Affine map nn.Linear(4, 1) with every weight and the bias equal to 0.5; "
        "its Hessian is identically zero."
    ),
    "quadratic4": (
        "Elementwise f(x) = x * x * arange(4) on 4 inputs, whose Hessian is known in closed form."
    ),
}

SHAPES: dict[str, tuple[list[int], list[int]]] = {
    "digits_cnn": ([1, 28, 28], [10]),
    "mlp_tanh": ([1, 28, 28], [10]),
    "mlp_relu": ([1, 28, 28], [10]),
    "linear4": ([4], [1]),
    "quadratic4": ([4], [4]),
}


@dataclass(frozen=True)
class DigitsSplit:
    """The digits images as ``[N, 1, 28, 28]`` float32 tensors, split train / held-out."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_28() -> DigitsSplit:
    """Load sklearn's 8x8 digits, scale to [0, 1], upscale to 28x28, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = functional.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    indices = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(
        indices, test_size=0.2, stratify=digits.target, random_state=SEED
    )
    train = torch.as_tensor(train_idx)
    test = torch.as_tensor(test_idx)
    return DigitsSplit(
        x_train=images[train].contiguous(),
        y_train=labels[train].contiguous(),
        x_test=images[test].contiguous(),
        y_test=labels[test].contiguous(),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``."""
    model.eval()
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    return float((predicted == y).float().mean().item())


def train_image_model(name: str, data: DigitsSplit) -> tuple[nn.Module, float]:
    """Train zoo model ``name`` with Adam + cross entropy; return it and its held-out accuracy.

    Minibatches are drawn from a seeded generator and the learning rate follows a one-cycle
    schedule, which makes the final accuracy much less sensitive to the last few steps.
    """
    config = TRAIN_CONFIGS[name]
    torch.manual_seed(SEED)
    model = build(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.max_lr)
    n = data.x_train.shape[0]
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.max_lr, total_steps=config.epochs * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            batch = order[start : start + config.batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    return model, accuracy(model, data.x_test, data.y_test)


def build_linear4() -> nn.Module:
    """``linear4`` with every weight and the bias set to 0.5."""
    model = build("linear4")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.5)
    return model


def manifest(name: str, training: dict[str, Any] | None) -> dict[str, Any]:
    """The ``manifest.json`` content for bundled model ``name``."""
    input_shape, output_shape = SHAPES[name]
    content: dict[str, Any] = {
        "name": name,
        "version": "1",
        "description": DESCRIPTIONS[name],
        "architecture": name,
        "input_shape": input_shape,
        "output_shape": output_shape,
        "weights": "weights.safetensors",
    }
    if training is not None:
        content["training"] = training
    return content


def to_json(content: object, indent: int = 0) -> str:
    """Pretty-print ``content`` as JSON with an indent of 2, keeping lists of scalars on one line.

    Objects are expanded one key per line as ``json.dumps(..., indent=2)`` would; a list
    whose items are all scalars (a shape, the pixels of a sample) stays on a single line.
    """
    pad = "  " * (indent + 1)
    if isinstance(content, dict) and content:
        items = [
            f"{pad}{json.dumps(key)}: {to_json(value, indent + 1)}"
            for key, value in content.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(content, list) and any(isinstance(item, (dict, list)) for item in content):
        items = [pad + to_json(item, indent + 1) for item in content]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(content, separators=(", ", ": "))


def write_json(path: Path, content: object) -> None:
    """Write ``content`` as :func:`to_json` text with a trailing newline."""
    path.write_text(to_json(content) + "\n", encoding="utf-8")


def export(model: nn.Module, name: str, out: Path, training: dict[str, Any] | None) -> None:
    """Write ``out/<name>/weights.safetensors`` (float32) and ``out/<name>/manifest.json``."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        key: tensor.detach().to(torch.float32).contiguous()
        for key, tensor in model.state_dict().items()
    }
    weights = folder / "weights.safetensors"
    save_file(state, str(weights))
    weights.chmod(0o644)  # safetensors creates the file owner-only (0600)
    write_json(folder / "manifest.json", manifest(name, training))


def write_sample(data: DigitsSplit, out: Path) -> None:
    """Write the first held-out image of class 2 to ``out/digits_sample.json``."""
    index = int(torch.nonzero(data.y_test == SAMPLE_LABEL)[0].item())
    image = data.x_test[index : index + 1]
    pixels = [round(float(v), SAMPLE_DECIMALS) for v in image.flatten().tolist()]
    sample = {"label": SAMPLE_LABEL, "shape": list(image.shape), "data": pixels}
    write_json(out / SAMPLE_FILE, sample)


def main(
    out: Path | str = DEFAULT_OUT, models: Sequence[str] = ALL_MODELS
) -> dict[str, float | None]:
    """Train / build ``models`` into ``out``; return each model's held-out accuracy (or None).

    The digits sample file is written whenever an image model is among ``models``. Runs
    single-threaded with deterministic algorithms and float32 defaults, restoring the caller's
    torch settings afterwards.
    """
    unknown = sorted(set(models) - set(ALL_MODELS))
    if unknown:
        raise ValueError(f"unknown models {unknown}; known: {list(ALL_MODELS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_dtype = torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    results: dict[str, float | None] = {}
    try:
        image_models = [name for name in ALL_MODELS if name in models and name in IMAGE_MODELS]
        if image_models:
            data = load_digits_28()
            write_sample(data, out)
            for name in image_models:
                model, acc = train_image_model(name, data)
                training = {
                    "dataset": DATASET,
                    "train_samples": int(data.x_train.shape[0]),
                    "held_out_samples": int(data.x_test.shape[0]),
                    "held_out_accuracy": round(acc, 4),
                    "script": SCRIPT,
                    "seed": SEED,
                }
                export(model, name, out, training)
                results[name] = acc
        if "linear4" in models:
            export(build_linear4(), "linear4", out, None)
            results["linear4"] = None
        if "quadratic4" in models:
            export(build("quadratic4"), "quadratic4", out, None)
            results["quadratic4"] = None
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_default_dtype(previous_dtype)
    return results


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output folder (default: models/)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=ALL_MODELS,
        default=list(ALL_MODELS),
        help="models to build (default: all)",
    )
    return parser.parse_args(argv)


def cli(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: train, export and print a summary table."""
    args = _parse_args(argv)
    started = time.perf_counter()
    results = main(args.out, args.models)
    elapsed = time.perf_counter() - started
    print(f"{'model':<12} {'held-out accuracy':>17}")
    for name, acc in results.items():
        shown = f"{acc:.4f}" if acc is not None else "-"
        print(f"{name:<12} {shown:>17}")
    print(f"wrote {len(results)} models to {args.out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
