"""A SiLU MLP for TorchScript tests that must see a never-run graph executor.

Instances of one scripted class share their graph executor and its cached plan, so each
test scripts its own subclass of ``FreshSiLU``: no other test has run (and warmed) it.
"""

from __future__ import annotations

import torch
from torch import nn


class FreshSiLU(nn.Module):
    """5 -> 12 (SiLU) -> 2."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 12)
        self.second = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.second(nn.functional.silu(self.first(x))))
