"""Train and export the bundled models in ``models/``, reproducibly.

Every bundled model is an architecture from :mod:`repository.zoo` plus a ``weights.safetensors``
file and a ``manifest.json``. The three image models (``digits_cnn``, ``mlp_tanh``,
``mlp_relu``) are trained on scikit-learn's bundled 8x8 digits (no download), scaled to
``[0, 1]`` and upscaled bilinearly to 28x28. The large-input model ``photo_digits_cnn``
(3x64x64, n = 12,288) is trained on the same digits upscaled to 64x64 and blended into
64x64 crops of scikit-learn's two bundled photographs (``load_sample_images``) the way
MNIST-M is made: ``|crop - digit|`` per colour channel, so the digit must be told from a
textured, coloured background. ``linear4`` and ``quadratic4`` have fixed, hand-chosen
parameters.

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
PHOTO_DATASET = (
    "sklearn.datasets.load_digits upscaled to 64x64 and blended as |crop - digit| (MNIST-M "
    "style) into 64x64 RGB crops of sklearn.datasets.load_sample_images (china.jpg, "
    "flower.jpg): 6 crops per training digit from the photos' left 480 columns, one per "
    "held-out digit from the 160 columns right of those"
)
DEFAULT_OUT = REPO_ROOT / "hessian_service" / "repository" / "models"
SAMPLE_FILE = "digits_sample.json"
SAMPLE_LABEL = 2
SAMPLE_DECIMALS = 6
"""Decimals kept for each pixel of ``digits_sample.json``."""
PHOTO_SAMPLE_FILE = "photo_digits_sample.json"
PHOTO_SAMPLE_DECIMALS = 4
"""Decimals kept for each of the 12,288 numbers of ``photo_digits_sample.json`` (the photos
are 8-bit: 1e-4 is under a 40th of one grey level; the file stays near 80 kB)."""
PHOTO_SIZE = 64
PHOTO_CROPS_PER_TRAINING_DIGIT = 6
PHOTO_HELD_OUT_FROM_COLUMN = 480
"""Training backgrounds come from columns ``[0, 480)`` of each 427x640 photo, held-out
ones from ``[480, 640)``: no held-out pixel of a background was seen in training."""

IMAGE_MODELS = ("digits_cnn", "mlp_tanh", "mlp_relu")
PHOTO_MODELS = ("photo_digits_cnn",)
FIXED_MODELS = ("linear4", "quadratic4")
ALL_MODELS = (*IMAGE_MODELS, *PHOTO_MODELS, *FIXED_MODELS)


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
    "photo_digits_cnn": TrainConfig(epochs=10, max_lr=3e-3),
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
    "photo_digits_cnn": (
        "CNN on 3x64x64 colour images, n = 12,288 inputs (conv 3x3 stride 2, tanh, three "
        "times: 8, 16, 32 channels; linear): tells which digit is drawn into a crop of a "
        "photograph, MNIST-M style. Its dense float32 input Hessian is 604 MB: the model for "
        "/hvp, /hessian/diagonal, /hessian/trace and /hessian/eigen."
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
    "photo_digits_cnn": ([3, PHOTO_SIZE, PHOTO_SIZE], [10]),
    "linear4": ([4], [1]),
    "quadratic4": ([4], [4]),
}


@dataclass(frozen=True)
class DigitsSplit:
    """Labelled images as ``[N, C, H, W]`` float32 tensors, split train / held-out."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_28() -> DigitsSplit:
    """Load sklearn's 8x8 digits, scale to [0, 1], upscale to 28x28, split 80/20 stratified."""
    return load_digits_scaled(28)


def load_digits_scaled(size: int) -> DigitsSplit:
    """Load sklearn's 8x8 digits, scale to [0, 1], upscale bilinearly to ``size`` x ``size``,
    split 80/20 stratified (the same split at every size)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
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


def _photo_crops(
    photos: torch.Tensor, count: int, columns: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """``count`` seeded ``[3, 64, 64]`` crops of ``photos`` ``[P, 3, H, W]``, each from a
    random photo, at a random row and a random column within ``columns`` ``[lo, hi)``."""
    size = PHOTO_SIZE
    which = torch.randint(0, photos.shape[0], (count,), generator=generator).tolist()
    rows = torch.randint(0, photos.shape[2] - size + 1, (count,), generator=generator).tolist()
    lo, hi = columns
    cols = torch.randint(lo, hi - size + 1, (count,), generator=generator).tolist()
    return torch.stack(
        [
            photos[p, :, r : r + size, c : c + size]
            for p, r, c in zip(which, rows, cols, strict=True)
        ]
    )


def load_photo_digits() -> DigitsSplit:
    """The digits at 64x64 (the split of :func:`load_digits_28`), each blended into RGB
    crops of sklearn's sample photographs as ``|crop - digit|`` (values in [0, 1]).

    Each training digit appears on ``PHOTO_CROPS_PER_TRAINING_DIGIT`` different crops from
    the photos' left columns; each held-out digit on one crop from their right columns.
    """
    from sklearn.datasets import load_sample_images

    digits = load_digits_scaled(PHOTO_SIZE)
    photos = torch.stack(
        [
            torch.tensor(image).permute(2, 0, 1).to(torch.float32) / 255.0
            for image in load_sample_images().images
        ]
    )
    generator = torch.Generator().manual_seed(SEED)
    repeats = PHOTO_CROPS_PER_TRAINING_DIGIT
    train_digits = digits.x_train.repeat(repeats, 1, 1, 1)
    train_crops = _photo_crops(
        photos, train_digits.shape[0], (0, PHOTO_HELD_OUT_FROM_COLUMN), generator
    )
    test_crops = _photo_crops(
        photos, digits.x_test.shape[0], (PHOTO_HELD_OUT_FROM_COLUMN, photos.shape[3]), generator
    )
    return DigitsSplit(
        x_train=(train_crops - train_digits).abs().contiguous(),
        y_train=digits.y_train.repeat(repeats).contiguous(),
        x_test=(test_crops - digits.x_test).abs().contiguous(),
        y_test=digits.y_test.contiguous(),
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


def write_sample(
    data: DigitsSplit, out: Path, file: str = SAMPLE_FILE, decimals: int = SAMPLE_DECIMALS
) -> None:
    """Write the first held-out image of class 2 to ``out/<file>`` (``digits_sample.json``
    by default), each value rounded to ``decimals``."""
    index = int(torch.nonzero(data.y_test == SAMPLE_LABEL)[0].item())
    image = data.x_test[index : index + 1]
    pixels = [round(float(v), decimals) for v in image.flatten().tolist()]
    sample = {"label": SAMPLE_LABEL, "shape": list(image.shape), "data": pixels}
    write_json(out / file, sample)


def _train_and_export(
    names: Sequence[str], data: DigitsSplit, dataset: str, out: Path
) -> dict[str, float | None]:
    """Train each of ``names`` on ``data``, export it with its training record; accuracies."""
    results: dict[str, float | None] = {}
    for name in names:
        model, acc = train_image_model(name, data)
        training = {
            "dataset": dataset,
            "train_samples": int(data.x_train.shape[0]),
            "held_out_samples": int(data.x_test.shape[0]),
            "held_out_accuracy": round(acc, 4),
            "script": SCRIPT,
            "seed": SEED,
        }
        export(model, name, out, training)
        results[name] = acc
    return results


def main(
    out: Path | str = DEFAULT_OUT, models: Sequence[str] = ALL_MODELS
) -> dict[str, float | None]:
    """Train / build ``models`` into ``out``; return each model's held-out accuracy (or None).

    The digits sample file is written whenever an image model is among ``models``, the
    photo sample whenever a photo model is. Runs
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
            results |= _train_and_export(image_models, data, DATASET, out)
        photo_models = [name for name in ALL_MODELS if name in models and name in PHOTO_MODELS]
        if photo_models:
            photo_data = load_photo_digits()
            write_sample(photo_data, out, PHOTO_SAMPLE_FILE, PHOTO_SAMPLE_DECIMALS)
            results |= _train_and_export(photo_models, photo_data, PHOTO_DATASET, out)
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
    print(f"{'model':<16} {'held-out accuracy':>17}")
    for name, acc in results.items():
        shown = f"{acc:.4f}" if acc is not None else "-"
        print(f"{name:<16} {shown:>17}")
    print(f"wrote {len(results)} models to {args.out} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
