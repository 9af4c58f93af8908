"""The bundled models as the benchmarks load them: built from the zoo, weights from disk.

Its own module because bench/run.py, bench/server.py and bench/soak.py all need it: kept in
run.py, it made run.py and server.py import each other (run.py starts the end-to-end part
in server.py).
"""

from __future__ import annotations

from safetensors.torch import load_file
from torch import nn

from hessian_service.config import BUNDLED_MODELS_DIR
from hessian_service.repository.zoo import build


def bundled(name: str) -> nn.Module:
    """The bundled model ``name`` in eval mode with frozen weights, as the server loads it."""
    model = build(name)
    model.load_state_dict(load_file(str(BUNDLED_MODELS_DIR / name / "weights.safetensors")))
    return model.eval().requires_grad_(False)
